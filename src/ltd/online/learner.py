"""Online drafter adaptation from verification feedback (OnlineSpec-style).

Every verification already computed the target's distribution at each committed
position: that is a free distillation label for the EAGLE-3 head. The learner listens
to commits (:class:`ltd.cycle.CommitListener`), keeps a window of recent positions
(token, target feature, target top-k log-probs) and every ``update_every`` commits
takes a small gradient step on a subset of the head's parameters. Update time is spent
inside the cycle, so it is counted in throughput.

Variants:
  * ``plain``: AdamW on the distillation loss.
  * ``optimistic``: optimistic online gradient: the step uses ``2 g_t - g_{t-1}`` (the
    previous gradient is the hint for the next one).
  * ``hedge``: an ensemble of learners with different learning rates (0 = frozen);
    before each update every member is scored on the new positions (prequential step-1
    agreement with the target, a proxy for acceptance), Hedge weights follow
    ``exp(eta * cumulative score)``, and the best-weighted member drafts.

Only positions the target verified and committed enter the buffer: rejected draft nodes
never do (their target logits describe contexts that were not taken).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.errors import LtdError
from ltd.fileio import atomic_dir
from ltd.train.trainer import TrainConfig, sequence_loss

log = logging.getLogger(__name__)

GRADIENT_VARIANTS = ("plain", "optimistic", "hedge")  # all --online variants: ltd.online.adapter.VARIANTS
STATE_VERSION = 1
LEARNER_FILES = ("online.json", "online.safetensors")


@dataclass
class OnlineConfig:
    """Online adaptation settings; defaults keep update cost to a few percent of decoding."""

    variant: str = "plain"
    lr: float = 3e-4
    update_every: int = 16  # commits (cycles) between updates
    # window/unroll/lr: tuned offline by scripts/online_tune.py (prequential agreement on a
    # humaneval-then-gsm8k stream); window 32 with one step matched 96 with two at a third of the cost
    window: int = 32  # most recent committed positions used per update
    unroll: int = 1
    params: str = "midlayer"  # midlayer | lm_head | all
    label_topk: int = 8
    hedge_lrs: tuple[float, ...] = (0.0, 1e-4, 3e-4)  # frozen, slow, default: each costs one update
    hedge_eta: float = 4.0

    def validate(self) -> None:
        if self.variant not in GRADIENT_VARIANTS:
            raise LtdError(f"unknown online head variant {self.variant!r}; choose one of {', '.join(GRADIENT_VARIANTS)}")
        if self.params not in ("midlayer", "lm_head", "all"):
            raise LtdError(f"unknown online params {self.params!r}; choose midlayer, lm_head or all")
        if self.update_every < 1 or self.window < 4 or self.unroll < 1:
            raise LtdError("online update_every must be >= 1, window >= 4 and unroll >= 1")


@dataclass
class OnlineStats:
    updates: int = 0
    positions_seen: int = 0
    update_seconds: float = 0.0
    member_scores: list[float] = field(default_factory=list)
    active_member: int = 0


def adaptable_head(drafter) -> Eagle3Drafter:
    """The EAGLE-3 drafter that online learning adapts: the drafter itself, or the model
    half of a hybrid (its n-gram half has nothing to learn)."""
    from ltd.drafting.hybrid import hybrid_part

    return hybrid_part(drafter, "model", Eagle3Drafter,
                       "online adaptation needs an EAGLE-3 head drafter (--drafter builtin:... or a head dir, alone or in a hybrid:ngram+...)")


class OnlineLearner:
    """Adapts an :class:`Eagle3Drafter`'s head while it serves (a hybrid's head too)."""

    def __init__(self, drafter, cfg: OnlineConfig | None = None) -> None:
        drafter = adaptable_head(drafter)
        self.cfg = cfg or OnlineConfig()
        self.cfg.validate()
        self.drafter = drafter
        self.head = drafter.head  # the head the steps train
        self._serving: dict[str, torch.nn.Parameter] | None = None
        if next(drafter.head.parameters()).dtype != torch.float32:
            # Mixed precision: steps of online size vanish below a half-precision weight's
            # resolution, so the steps train a float32 master copy, and after each update the
            # drafter's own head (bfloat16 by default, 2-3x cheaper per draft step) gets the
            # learned weights.
            log.info("online learning: float32 master weights for a %s draft head", next(drafter.head.parameters()).dtype)
            self.head = copy.deepcopy(drafter.head).float()
            self._serving = dict(drafter.head.named_parameters())
        self.embed = drafter.embed
        _, self.t2d_index = self.head.vocab_maps()
        self.params = self._select_params()
        self._names = [n for n, _ in self.params]
        self.train_cfg = TrainConfig(unroll=self.cfg.unroll)
        self.buf: deque[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = deque(maxlen=self.cfg.window + 1)
        self._new_positions = 0
        self._commits = 0
        self.stats = OnlineStats()
        lrs = self.cfg.hedge_lrs if self.cfg.variant == "hedge" else (self.cfg.lr,)
        base = {n: p.detach().clone() for n, p in self.params}
        self.members = [{k: v.clone() for k, v in base.items()} for _ in lrs]
        self.member_lrs = list(lrs)
        self.opt_state = [self._new_opt_state() for _ in lrs]
        self.prev_grad: list[dict[str, torch.Tensor] | None] = [None for _ in lrs]
        self.cum_score = [0.0 for _ in lrs]
        self.stats.member_scores = list(self.cum_score)

    # -- parameters --------------------------------------------------------------------
    def _select_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        sel = self.cfg.params
        out = []
        for n, p in self.head.named_parameters():
            chosen = sel == "all" or n.startswith(sel)
            p.requires_grad_(chosen)  # no gradient work for frozen parts
            if chosen:
                out.append((n, p))
        return out

    def _new_opt_state(self) -> dict:
        return {"step": 0, "m": {n: torch.zeros_like(p) for n, p in self.params}, "v": {n: torch.zeros_like(p) for n, p in self.params}}

    def _load_member(self, i: int) -> None:
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(self.members[i][n])

    def _publish(self) -> None:
        """The drafting member's weights into the drafter's head (cast to its dtype)."""
        if self._serving is None:
            return
        with torch.no_grad():
            for n, p in self.params:
                self._serving[n].copy_(p)

    # -- listening ---------------------------------------------------------------------
    def on_commit(self, tokens: list[int], logits: torch.Tensor, features: torch.Tensor | None) -> None:
        if features is None:
            return
        k = self.cfg.label_topk
        with torch.no_grad():
            logp = torch.log_softmax(logits.float(), dim=-1)
            val, idx = torch.topk(logp, k, dim=-1)
        feats = features.detach().to(torch.float32).cpu().clone()
        for j, tok in enumerate(tokens):
            self.buf.append((int(tok), feats[j], idx[j].cpu().clone(), val[j].cpu().clone()))
        self._new_positions += len(tokens)
        self.stats.positions_seen += len(tokens)
        self._commits += 1
        if self._commits % self.cfg.update_every == 0 and len(self.buf) >= 8:
            t0 = time.perf_counter()
            self.update()
            self.stats.update_seconds += time.perf_counter() - t0

    def _window(self) -> dict[str, torch.Tensor]:
        items = list(self.buf)
        return {
            "input_ids": torch.tensor([t for t, _, _, _ in items], dtype=torch.long),
            "features": torch.stack([f for _, f, _, _ in items]),
            "top_ids": torch.stack([i for _, _, i, _ in items]),
            "top_logp": torch.stack([v for _, _, _, v in items]),
            "loss_mask": torch.ones(len(items), dtype=torch.uint8),
        }

    # -- updates -----------------------------------------------------------------------
    def update(self) -> None:
        """One online step for every member; then the best member drafts."""
        seq = self._window()
        new = min(self._new_positions, len(self.buf) - 1)
        self._new_positions = 0
        was_training = self.head.training
        self.head.train()
        for i, lr in enumerate(self.member_lrs):
            self._load_member(i)
            if self.cfg.variant == "hedge":
                self.cum_score[i] += self._prequential_score(seq, new)
            if lr > 0:
                self._step(i, seq, lr)
                with torch.no_grad():
                    for n, p in self.params:
                        self.members[i][n].copy_(p)
        best = max(range(len(self.members)), key=lambda j: self.cum_score[j]) if self.cfg.variant == "hedge" else 0
        self._load_member(best)
        self._publish()
        self.head.train(was_training)
        self.head.eval()
        self.stats.updates += 1
        self.stats.active_member = best
        self.stats.member_scores = list(self.cum_score)

    @torch.no_grad()
    def _prequential_score(self, seq: dict[str, torch.Tensor], new: int) -> float:
        """Step-1 agreement with the target on the positions that arrived since the last update."""
        _, hits, valid = sequence_loss(self.head, self.embed, seq, self.t2d_index, TrainConfig(unroll=1))
        lo = max(0, valid.numel() - new)
        ok = valid[lo:]
        if not bool(ok.any()):
            return 0.0
        return self.cfg.hedge_eta * float(hits[0][lo:][ok].float().mean())

    def _step(self, i: int, seq: dict[str, torch.Tensor], lr: float) -> None:
        for _, p in self.params:
            p.grad = None
        loss, _, _ = sequence_loss(self.head, self.embed, seq, self.t2d_index, self.train_cfg)
        if not loss.requires_grad:
            return
        loss.backward()
        grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in self.params}
        if self.cfg.variant == "optimistic":
            prev = self.prev_grad[i]
            self.prev_grad[i] = grads
            if prev is not None:
                grads = {n: 2 * g - prev[n] for n, g in grads.items()}
        self._adam(i, grads, lr)
        for _, p in self.params:
            p.grad = None

    def _adam(self, i: int, grads: dict[str, torch.Tensor], lr: float, b1: float = 0.9, b2: float = 0.99) -> None:
        st = self.opt_state[i]
        st["step"] += 1
        t = st["step"]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        scale = min(1.0, 1.0 / (norm + 1e-12))  # clip the global norm at 1
        with torch.no_grad():
            for n, p in self.params:
                g = grads[n] * scale
                st["m"][n].mul_(b1).add_(g, alpha=1 - b1)
                st["v"][n].mul_(b2).addcmul_(g, g, value=1 - b2)
                mhat = st["m"][n] / (1 - b1**t)
                vhat = st["v"][n] / (1 - b2**t)
                p.add_(-lr * mhat / (vhat.sqrt() + 1e-8))

    # -- persistence -------------------------------------------------------------------
    def save_state(self, directory: str | Path) -> None:
        """Save what was learned (atomic: temp dir then rename)."""
        atomic_dir(directory, self.write_files)

    def write_files(self, tmp: Path) -> None:
        """The learner's files (``online.safetensors``, ``online.json``) into a directory."""
        tensors = {}
        for i, member in enumerate(self.members):
            for n, v in member.items():
                tensors[f"member{i}.{n}"] = v.contiguous().cpu()
        save_file(tensors, str(tmp / "online.safetensors"))
        meta = {
            "version": STATE_VERSION,
            "config": asdict(self.cfg),
            "head": {"hidden_size": self.head.config.hidden_size, "draft_vocab_size": self.head.config.draft_vocab_size},
            "cum_score": self.cum_score,
            "stats": asdict(self.stats),
        }
        (tmp / "online.json").write_text(json.dumps(meta, indent=2))

    def load_state(self, directory: str | Path) -> None:
        """Restore a saved state; refuses a corrupt or mismatched one with a clear error."""
        directory = Path(directory)
        meta_path, w_path = directory / "online.json", directory / "online.safetensors"
        if not meta_path.is_file() or not w_path.is_file():
            raise LtdError(f"no online state in {directory}; run without --online-state to start fresh")
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(w_path))
        except (json.JSONDecodeError, OSError, SafetensorError) as exc:
            raise LtdError(f"online state in {directory} is corrupt ({type(exc).__name__}); reset it with: ltd online reset {directory}") from None
        head = {"hidden_size": self.head.config.hidden_size, "draft_vocab_size": self.head.config.draft_vocab_size}
        if meta.get("version") != STATE_VERSION or meta.get("head") != head:
            raise LtdError(f"online state in {directory} was made for another drafter or version; reset it with: ltd online reset {directory}")
        if meta["config"].get("variant") != self.cfg.variant or meta["config"].get("params") != self.cfg.params:
            raise LtdError(
                f"online state in {directory} is for variant {meta['config'].get('variant')}/{meta['config'].get('params')}, "
                f"not {self.cfg.variant}/{self.cfg.params}; use the same --online or reset it"
            )
        try:
            for i, member in enumerate(self.members):
                for n in member:
                    src = tensors[f"member{i}.{n}"]
                    if src.shape != member[n].shape:
                        raise KeyError(n)
                    member[n].copy_(src)
        except KeyError as exc:
            raise LtdError(f"online state in {directory} does not match this drafter (tensor {exc}); reset it") from None
        self.cum_score = list(meta.get("cum_score", self.cum_score))
        best = max(range(len(self.members)), key=lambda j: self.cum_score[j]) if self.cfg.variant == "hedge" else 0
        self._load_member(best)
        self._publish()
        self.stats.active_member = best


def reset_state(directory: str | Path) -> bool:
    """Delete a saved online state; returns whether something was deleted."""
    from ltd.online.adapter import has_state

    directory = Path(directory)
    if directory.is_dir() and has_state(directory):
        shutil.rmtree(directory)
        return True
    return False
