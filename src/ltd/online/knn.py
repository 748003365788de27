"""kNN drafting memory: the head's own hidden states, labelled by the target's verdicts.

The gradient learner moves the EAGLE-3 head's weights a little per update; a domain the
head never saw needs far more than that. A nearest-neighbour memory (kNN-LM, Khandelwal
et al. 2020, applied to the drafter) learns in one shot instead. Every position the head
processes leaves its final hidden state (the vector ``lm_head`` scores); once the target
has committed the token two places on, that token is the label. When the head drafts
again, the stored states nearest to its current one vote for their labels, and the
draft distribution becomes ``(1 - w) * head + w * votes``.

Neighbours must share the token the head entry read (``x_{j+1}``, the node being
expanded). Why: the hidden state already encodes that token, so neighbours almost always
share it anyway, and restricting to it turns a search over the whole store into a search
over one token's bucket (a vector compare over the store, then a small matmul), cheap
enough for every cycle on a CPU.

The store spans requests (the stream so far, the current request included), so the
drafter learns a user's domain as it serves. On humaneval (80 prompts, SmolLM2-135M,
shipped head) it raised prequential step-1 agreement with the target from 32% to 64%
in an offline replay (``runs/s11``, session 11 scratch); the live effect is measured by
``ltd bench ... +online=knn``. It changes drafts only, never the output.

Keys depend on the head's weights: a store saved with one head is refused by another
(a fingerprint of the head is saved beside it), and a gradient learner that moves the
head makes older keys drift (``plain+knn`` is allowed; measure before relying on it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ltd.errors import LtdError

log = logging.getLogger(__name__)

KNN_VERSION = 1
KNN_FILES = ("knn.json", "knn.safetensors")


@dataclass
class KnnConfig:
    """kNN memory settings; defaults from the offline replay (session 11)."""

    capacity: int = 32768  # stored positions (the oldest go first)
    k: int = 16  # neighbours that vote
    temperature: float = 0.02  # softmax temperature over cosine similarities
    weight: float = 0.5  # share of the votes in the draft distribution

    def validate(self) -> None:
        if self.capacity < 16 or self.k < 1 or self.temperature <= 0 or not 0.0 < self.weight <= 1.0:
            raise LtdError(
                f"kNN memory needs capacity >= 16, k >= 1, temperature > 0 and 0 < weight <= 1, got {asdict(self)}"
            )


def head_fingerprint(head) -> str:
    """A short hash of the head's output layer: keys stored under one head mean nothing to another."""
    h = hashlib.sha256()
    for name in ("norm.weight", "lm_head.weight"):
        t = dict(head.named_parameters())[name].detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


class KnnMemory:
    """A ring buffer of (key, read token, label) for head positions whose label is committed."""

    def __init__(self, hidden_size: int, fingerprint: str, cfg: KnnConfig | None = None) -> None:
        self.cfg = cfg or KnnConfig()
        self.cfg.validate()
        self.hidden_size = hidden_size
        self.fingerprint = fingerprint
        cap = self.cfg.capacity
        self.keys = torch.zeros((cap, hidden_size), dtype=torch.float32)
        self.read = torch.full((cap,), -1, dtype=torch.long)  # x_{j+1}: the token the entry read
        self.labels = torch.zeros(cap, dtype=torch.long)  # x_{j+2}: the target's token
        self.size = 0
        self.next = 0  # ring position of the next write
        self.added = 0  # positions stored so far (overwritten ones included)
        self._waiting: list[tuple[int, torch.Tensor]] = []  # (entry j, key) whose label is not committed yet

    def __len__(self) -> int:
        return self.size

    # -- learning ----------------------------------------------------------------------
    @staticmethod
    def keys_of(normed_hidden: torch.Tensor) -> torch.Tensor:
        """Unit-length float32 keys from the head's normed hidden states (the rows ``lm_head`` scores)."""
        return F.normalize(normed_hidden.detach().float().cpu(), dim=-1)

    def observe(self, first_entry: int, keys: torch.Tensor, tokens: Sequence[int]) -> None:
        """Entries ``first_entry ..`` of the current sequence were just computed with ``keys``.

        ``tokens`` is the committed sequence (its last token pending, chosen by the target).
        Entry j read ``tokens[j + 1]`` and is labelled ``tokens[j + 2]`` once that exists;
        entries still unlabelled wait for the next call.
        """
        self._waiting.extend((first_entry + i, keys[i]) for i in range(keys.shape[0]))
        ready = [(j, key) for j, key in self._waiting if j + 2 < len(tokens)]
        self._waiting = [(j, key) for j, key in self._waiting if j + 2 >= len(tokens)]
        if ready:
            self._store(
                torch.stack([key for _, key in ready]),
                torch.tensor([tokens[j + 1] for j, _ in ready], dtype=torch.long),
                torch.tensor([tokens[j + 2] for j, _ in ready], dtype=torch.long),
            )

    def end_sequence(self) -> None:
        """A request ended: entries without a label are dropped."""
        self._waiting = []

    def _store(self, keys: torch.Tensor, read: torch.Tensor, labels: torch.Tensor) -> None:
        cap = self.cfg.capacity
        if keys.shape[0] > cap:
            keys, read, labels = keys[-cap:], read[-cap:], labels[-cap:]
        n = keys.shape[0]
        idx = (torch.arange(n) + self.next) % cap
        with torch.no_grad():
            self.keys[idx] = keys
            self.read[idx] = read
            self.labels[idx] = labels
        self.next = int((self.next + n) % cap)
        self.size = min(cap, self.size + n)
        self.added += n

    # -- drafting ----------------------------------------------------------------------
    def votes(self, query: torch.Tensor, read_token: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(labels, weights) of the k stored neighbours of one key that read ``read_token``; None if none did."""
        rows = torch.nonzero(self.read[: self.size] == read_token).flatten()
        if rows.numel() == 0:
            return None
        sims = self.keys[rows] @ query
        k = min(self.cfg.k, sims.numel())
        top, at = torch.topk(sims, k)
        return self.labels[rows[at]], torch.softmax(top / self.cfg.temperature, dim=0)

    def mix(
        self, logp: torch.Tensor, draft_to_target: torch.Tensor, target_to_draft: torch.Tensor,
        keys: torch.Tensor, read_tokens: Sequence[int], k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (target ids, log-probs) of ``(1 - w) * head + w * votes`` per row.

        ``logp`` [m, draft vocab] is the head's distribution; ``draft_to_target`` maps its
        columns to target ids and ``target_to_draft`` back (-1 outside the draft
        vocabulary: a label there still gets its votes as a candidate). A row with no
        neighbours keeps the head's distribution unchanged.
        """
        w = self.cfg.weight
        out_t = torch.zeros((logp.shape[0], k), dtype=torch.long)
        out_l = torch.full((logp.shape[0], k), float("-inf"))
        for r in range(logp.shape[0]):
            p = logp[r].float().exp()
            found = self.votes(keys[r], int(read_tokens[r]))
            if found is None:
                val, idx = torch.topk(logp[r].float(), min(k, p.numel()))
                out_t[r, : val.numel()], out_l[r, : val.numel()] = draft_to_target[idx], val
                continue
            labels, weights = found
            mixed = p * (1.0 - w)
            d = target_to_draft[labels]
            inside = d >= 0
            mixed.index_add_(0, d[inside], weights[inside] * w)
            val, idx = torch.topk(mixed, min(k, mixed.numel()))
            cand_t, cand_p = draft_to_target[idx], val
            if not bool(inside.all()):  # labels outside the draft vocabulary compete on their votes
                extra_t, inv = torch.unique(labels[~inside], return_inverse=True)
                extra_p = torch.zeros(extra_t.numel()).index_add_(0, inv, weights[~inside] * w)
                cand_t, cand_p = torch.cat([cand_t, extra_t]), torch.cat([cand_p, extra_p])
                cand_p, order = torch.sort(cand_p, descending=True)
                cand_t, cand_p = cand_t[order][:k], cand_p[:k]
            n = cand_t.numel()
            out_t[r, :n], out_l[r, :n] = cand_t, torch.log(cand_p.clamp(min=1e-30))
        return out_t, out_l

    # -- persistence (files inside an online state directory) --------------------------
    def write_files(self, directory: Path) -> None:
        n = self.size
        order = (torch.arange(n) + (self.next - n)) % self.cfg.capacity  # oldest first
        save_file(
            {"keys": self.keys[order].contiguous(), "read": self.read[order].contiguous(), "labels": self.labels[order].contiguous()},
            str(directory / "knn.safetensors"),
        )
        meta = {"version": KNN_VERSION, "config": asdict(self.cfg), "hidden_size": self.hidden_size,
                "head": self.fingerprint, "added": self.added}
        (directory / "knn.json").write_text(json.dumps(meta, indent=2))

    def read_files(self, directory: Path) -> None:
        meta_path, path = directory / "knn.json", directory / "knn.safetensors"
        if not meta_path.is_file() or not path.is_file():
            raise LtdError(f"online state in {directory} has no kNN memory (made without knn); reset it with: ltd online reset {directory}")
        try:
            meta = json.loads(meta_path.read_text())
            t = load_file(str(path))
            keys, read, labels = t["keys"], t["read"], t["labels"]
        except (json.JSONDecodeError, OSError, SafetensorError, KeyError) as exc:
            raise LtdError(f"kNN memory in {directory} is corrupt ({type(exc).__name__}); reset it with: ltd online reset {directory}") from None
        if meta.get("version") != KNN_VERSION or meta.get("hidden_size") != self.hidden_size:
            raise LtdError(f"kNN memory in {directory} was made by another version or head size; reset it with: ltd online reset {directory}")
        if meta.get("head") != self.fingerprint:
            raise LtdError(f"kNN memory in {directory} was built with another draft head; reset it with: ltd online reset {directory}")
        n = keys.shape[0]
        if keys.dim() != 2 or keys.shape[1] != self.hidden_size or read.shape != (n,) or labels.shape != (n,):
            raise LtdError(f"kNN memory in {directory} has inconsistent tensors; reset it with: ltd online reset {directory}")
        self.size = self.next = self.added = 0
        self._store(keys.float(), read.long(), labels.long())
        self.added = int(meta.get("added", n))
        log.info("kNN memory: restored %d positions from %s", self.size, directory)
