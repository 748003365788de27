"""Train an EAGLE-3 style head on cached target features.

Training-time test (EAGLE-3): the head is unrolled ``unroll`` steps on its own outputs.
Step s at index t reads the step-(s-1) output at t-1 and the token x_{t+1}, sits at
position t and predicts x_{t+2}; it attends to step-1 entries up to t-s+1 (the context a
draft rooted there would see) and to its own chain's entries of steps 2..s, exactly as a
draft node attends to the context and its ancestors at inference.

Labels are the target's own top-k next-token distribution (soft labels), restricted to
the reduced draft vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ltd.drafting.eagle3 import Eagle3Config, Eagle3Head, init_random_head, load_head, save_head
from ltd.errors import LtdError
from ltd.train.vocab import token_counts

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of head training; defaults are the shipped recipe."""

    draft_vocab: int = 8192
    unroll: int = 3
    step_decay: float = 0.8
    epochs: float = 2.0
    lr: float = 6e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 0.5
    batch_tokens: int = 2048  # sequences are accumulated up to this many tokens per update
    eval_every: int = 200
    eval_sequences: int = 24
    checkpoint_every: int = 200
    seed: int = 0
    max_seq_len: int = 512


def build_draft_vocab(shards: list[dict[str, torch.Tensor]], size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent target next tokens (sorted ids): the reduced draft vocabulary."""
    counts = token_counts(shards, vocab_size)
    size = min(size, vocab_size)
    top = torch.topk(counts, size).indices
    return torch.sort(top).values


def split_sequences(shard: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    out = []
    start = 0
    for n in shard["lengths"].tolist():
        end = start + n
        out.append({k: shard[k][start:end] for k in ("input_ids", "loss_mask", "features", "top_ids", "top_logp")})
        start = end
    return out


def ttt_mask(t: int, step: int, device) -> torch.Tensor:
    """Boolean [t, step*t] mask over keys cat(K_1..K_step) for queries of step ``step``."""
    idx = torch.arange(t, device=device)
    parts = [idx.view(-1, 1) - (step - 1) >= idx.view(1, -1)]  # K_1: j <= i - step + 1
    for s2 in range(2, step + 1):
        parts.append(idx.view(1, -1) == (idx.view(-1, 1) - (step - s2)))
    return torch.cat(parts, dim=1)


def soft_targets(seq: dict[str, torch.Tensor], t2d_index: torch.Tensor, n_valid: int):
    """Soft label rows for indices 0..n_valid-1 (the target's distribution at t+1)."""
    ids = seq["top_ids"][1 : n_valid + 1].long()  # [n, k]
    logp = seq["top_logp"][1 : n_valid + 1].float()
    draft_ids = t2d_index[ids]  # -1 where outside the draft vocabulary
    p = logp.exp() * (draft_ids >= 0)
    mass = p.sum(-1, keepdim=True)
    valid = (mass.squeeze(-1) > 0) & (seq["loss_mask"][1 : n_valid + 1] > 0)
    p = p / mass.clamp(min=1e-8)
    top1 = t2d_index[seq["top_ids"][1 : n_valid + 1, 0].long()]
    return draft_ids.clamp(min=0), p, valid, top1


def unrolled_forward(head: Eagle3Head, embed: torch.nn.Embedding, seq: dict[str, torch.Tensor], unroll: int):
    """Logits of each unrolled step for one sequence: list of [n, draft_vocab]."""
    t = seq["input_ids"].numel() - 1  # indices 0..t-1 have a next token x_{t+1}
    feats = seq["features"][:t].float().unsqueeze(0)
    tok = seq["input_ids"][1 : t + 1].long()
    emb = embed(tok).unsqueeze(0).detach()
    pos = torch.arange(t).unsqueeze(0)
    keys, values, logits = [], [], []
    hidden = head.fc(feats)
    for s in range(1, unroll + 1):
        mask = ttt_mask(t, s, feats.device).unsqueeze(0)
        past_k = torch.cat(keys, dim=2) if keys else None
        past_v = torch.cat(values, dim=2) if values else None
        # keys of earlier steps come first in the mask, then this step's own keys
        out, k, v = head.midlayer(emb, hidden, pos, mask, past_k, past_v)
        keys.append(k)
        values.append(v)
        logits.append(head.logits(out[0]))
        hidden = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # parent output at t-1
    return logits


def sequence_loss(head, embed, seq, t2d_index, cfg: TrainConfig):
    """Weighted soft cross-entropy over unrolled steps, plus per-step top-1 hits."""
    logits = unrolled_forward(head, embed, seq, cfg.unroll)
    n = logits[0].shape[0]
    ids, p, valid, top1 = soft_targets(seq, t2d_index, n)
    total = torch.zeros(())
    count = 0
    hits = []
    for s, lg in enumerate(logits, start=1):
        ok = valid.clone()
        ok[: s - 1] = False  # step s needs a chain of s-1 earlier entries
        logp = F.log_softmax(lg.float(), dim=-1)
        ce = -(p * logp.gather(-1, ids)).sum(-1)
        if ok.any():
            total = total + (cfg.step_decay ** (s - 1)) * ce[ok].mean()
            count += 1
        hits.append((lg.argmax(-1) == top1) & ok & (top1 >= 0))
    return total / max(count, 1), hits, valid


@torch.no_grad()
def evaluate(head, embed, seqs, t2d_index, cfg: TrainConfig) -> dict[str, float]:
    """Per-step top-1 agreement with the target, and the expected accepted chain length."""
    head.eval()
    step_hits = [0] * cfg.unroll
    step_n = [0] * cfg.unroll
    chain_total, chain_n = 0.0, 0
    covered, positions = 0, 0
    for seq in seqs:
        top1 = t2d_index[seq["top_ids"][1:, 0].long()]
        keep = seq["loss_mask"][1:] > 0
        covered += int(((top1 >= 0) & keep).sum())
        positions += int(keep.sum())
        _, hits, valid = sequence_loss(head, embed, seq, t2d_index, cfg)
        n = valid.numel()
        for s in range(cfg.unroll):
            ok = valid.clone()
            ok[:s] = False
            step_hits[s] += int(hits[s].sum())
            step_n[s] += int(ok.sum())
        # chain rooted at r: step s sits at index r+s-1
        for r in range(n - cfg.unroll + 1):
            if not bool(valid[r]):
                continue
            length = 0
            for s in range(cfg.unroll):
                if bool(hits[s][r + s]):
                    length += 1
                else:
                    break
            chain_total += length + 1  # + bonus token
            chain_n += 1
    head.train()
    out = {f"acc_step{s + 1}": step_hits[s] / max(step_n[s], 1) for s in range(cfg.unroll)}
    out["chain_accept_len"] = chain_total / max(chain_n, 1)
    out["vocab_coverage"] = covered / max(positions, 1)  # target top-1 inside the draft vocabulary
    return out


def _save_checkpoint(out_dir: Path, head: Eagle3Head, opt, sched, state: dict) -> None:
    """Atomic: write into a temp directory, then swap it in."""
    tmp = out_dir / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_head(head, tmp, dtype=torch.float32)
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), **state}, tmp / "trainer_state.pt")
    final = out_dir / "checkpoint"
    old = out_dir / "checkpoint.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def train_head(
    feature_shards: list[dict[str, torch.Tensor]],
    eval_shards: list[dict[str, torch.Tensor]],
    target_config,
    embed_weight: torch.Tensor,
    layer_ids: list[int],
    out_dir: Path,
    cfg: TrainConfig,
    resume: bool = False,
    init_from: Path | None = None,
) -> Eagle3Head:
    """Train (or resume) a head; writes checkpoints, TensorBoard logs and the final head.

    ``init_from`` starts from an existing head (continued training with a new schedule);
    its draft vocabulary is kept.
    """
    from torch.utils.tensorboard import SummaryWriter  # optional (tensorboard, the rl extra) and slow to import

    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    embed = torch.nn.Embedding.from_pretrained(embed_weight.float(), freeze=True)
    head, state = _start_head(feature_shards, target_config, layer_ids, out_dir, cfg, resume, init_from)
    head.train()
    _, t2d_index = head.vocab_maps()

    seqs = [s for sh in feature_shards for s in split_sequences(sh)]
    eval_seqs = [s for sh in eval_shards for s in split_sequences(sh)][: cfg.eval_sequences]
    tokens = sum(s["input_ids"].numel() for s in seqs)
    total_steps = max(1, int(cfg.epochs * max(1, tokens // cfg.batch_tokens)))
    params = [p for p in head.parameters() if p.requires_grad]
    opt, sched = _optimizer(params, cfg, total_steps, state)
    writer = SummaryWriter(str(out_dir / "tb"))
    (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log.info("training on %d tokens (%d sequences), %d steps", tokens, len(seqs), total_steps)
    bar = tqdm(total=total_steps, initial=state["step"], desc="train head", unit="step")
    t0 = time.perf_counter()
    step = state["step"]
    stream = _SequenceStream(len(seqs), cfg.seed)
    stream.skip(state.get("consumed", 0))  # a resumed run continues the same data order
    while step < total_steps:
        opt.zero_grad(set_to_none=True)
        loss, parts = _accumulate_batch(head, embed, seqs, stream, t2d_index, cfg)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
        writer.add_scalar("train/tokens_per_s", parts / max(1e-9, time.perf_counter() - t0), step)
        t0 = time.perf_counter()
        if step % cfg.eval_every == 0 or step == total_steps:
            _log_eval(evaluate(head, embed, eval_seqs, t2d_index, cfg), step, writer, out_dir)
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            _save_checkpoint(out_dir, head, opt, sched, {"step": step, "consumed": stream.consumed, "best": state["best"]})
    bar.close()
    writer.close()
    save_head(head, out_dir / "head", dtype=torch.float16)
    return head


def _start_head(feature_shards, target_config, layer_ids, out_dir: Path, cfg: TrainConfig, resume: bool, init_from: Path | None):
    """The head to train and the trainer state: a checkpoint's, an ``--init`` head's or a fresh one's."""
    ckpt = out_dir / "checkpoint"
    if resume and ckpt.is_dir():
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        log.info("resuming from step %d", state["step"])
        return load_head(ckpt), state
    if init_from is not None:
        head = load_head(init_from)
        if head.config.target_hidden_size != int(target_config.hidden_size) or head.config.vocab_size != int(target_config.vocab_size):
            raise LtdError(f"--init head {init_from} does not fit this target; start without --init")
        return head, {"step": 0, "best": 0.0}
    if resume:
        log.warning("--resume given but no checkpoint in %s; starting fresh", out_dir)
    mcfg = Eagle3Config.for_target(target_config, cfg.draft_vocab)
    mcfg.eagle_aux_hidden_state_layer_ids = list(layer_ids)
    vocab = build_draft_vocab(feature_shards, mcfg.draft_vocab_size, mcfg.vocab_size)
    return init_random_head(mcfg, seed=cfg.seed, draft_ids=vocab), {"step": 0, "best": 0.0}


def _optimizer(params, cfg: TrainConfig, total_steps: int, state: dict):
    """AdamW with linear warm-up then cosine decay to 5%, restored from ``state`` when resuming."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, min(cfg.warmup_steps, total_steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        prog = (step - warmup) / max(1, total_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    if state["step"]:
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    return opt, sched


def _accumulate_batch(head, embed, seqs, stream, t2d_index, cfg: TrainConfig) -> tuple[float, int]:
    """Backpropagate whole sequences until a batch holds ``batch_tokens``; (mean loss, tokens)."""
    parts = 0
    loss_sum = 0.0
    while parts < cfg.batch_tokens:
        seq = seqs[stream.next()]
        n = seq["input_ids"].numel()
        loss, _, _ = sequence_loss(head, embed, seq, t2d_index, cfg)
        (loss * n / cfg.batch_tokens).backward()
        loss_sum += float(loss.detach()) * n
        parts += n
    return loss_sum / parts, parts


def _log_eval(metrics: dict, step: int, writer, out_dir: Path) -> None:
    for k, v in metrics.items():
        writer.add_scalar(f"eval/{k}", v, step)
    log.info("step %d eval %s", step, {k: round(v, 4) for k, v in metrics.items()})
    with (out_dir / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


class _SequenceStream:
    """Shuffled epochs over sequence indices, reproducible from a seed and a count."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.consumed = 0

    def next(self) -> int:
        if not self.order:
            self.order = list(range(self.n))
            self.rng.shuffle(self.order)
        self.consumed += 1
        return self.order.pop()

    def skip(self, count: int) -> None:
        for _ in range(count):
            self.next()
