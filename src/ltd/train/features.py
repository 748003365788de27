"""Target features for drafter training, computed once and cached on disk in shards.

For each training conversation the target runs once and we keep, per token: the hidden
states entering the EAGLE-3 feature layers (low/middle/high, fp16), and the target's own
top-k next-token log-probabilities (the soft labels: what the drafter must imitate is the
target, not the text). Shards are written atomically with a manifest, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ltd.errors import LtdError
from ltd.fileio import atomic_write, atomic_write_json
from ltd.train.data import iter_conversations, tokenize_conversation

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class FeatureManifest:
    """What a feature cache holds; a mismatched cache is refused, not silently reused."""

    target: str
    data: str
    layer_ids: list[int]
    max_len: int
    label_topk: int
    hidden_size: int
    vocab_size: int
    conversations_seen: int = 0
    tokens: int = 0
    shards: list[str] = field(default_factory=list)

    def compatible(self, other: "FeatureManifest") -> bool:
        keys = ("target", "data", "layer_ids", "max_len", "label_topk", "hidden_size", "vocab_size")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def read_manifest(directory: Path) -> FeatureManifest | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        return FeatureManifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError):
        raise LtdError(f"{path} is corrupt; delete {directory} to recompute the features") from None


BUFFERS = ("input_ids", "loss_mask", "features", "top_ids", "top_logp")


class _ShardWriter:
    """Buffers conversations' tensors and writes them as one shard when asked (atomic)."""

    def __init__(self, out_dir: Path, man: FeatureManifest) -> None:
        self.out_dir, self.man = out_dir, man
        self.buf: dict[str, list[torch.Tensor]] = {k: [] for k in BUFFERS}
        self.lengths: list[int] = []
        self.tokens = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in BUFFERS:
            self.buf[k].append(tensors[k])
        n = int(tensors["input_ids"].numel())
        self.lengths.append(n)
        self.tokens += n

    def flush(self, seen: int) -> None:
        """Write the buffered conversations as the next shard, then the manifest (``seen`` conversations read)."""
        if not self.lengths:
            return
        man = self.man
        name = f"shard_{len(man.shards):05d}.safetensors"
        tensors = {k: torch.cat(v) for k, v in self.buf.items()}
        tensors["lengths"] = torch.tensor(self.lengths, dtype=torch.int64)
        atomic_write(self.out_dir / name, lambda tmp: save_file(tensors, str(tmp)), suffix=".safetensors")
        man.shards.append(name)
        man.tokens += self.tokens
        man.conversations_seen = seen
        atomic_write_json(self.out_dir / MANIFEST, asdict(man))
        for v in self.buf.values():
            v.clear()
        self.lengths.clear()
        self.tokens = 0


@torch.inference_mode()
def conversation_features(model, ids: list[int], mask: list[int], layer_ids: list[int], label_topk: int) -> dict[str, torch.Tensor]:
    """One conversation's target features (the chosen layers, fp16) and top-k next-token labels."""
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    out = model(input_ids=x, output_hidden_states=True)
    feats = torch.cat([out.hidden_states[i][0] for i in layer_ids], dim=-1).to(torch.float16).cpu()
    logp = torch.log_softmax(out.logits[0].float(), dim=-1)
    val, idx = torch.topk(logp, label_topk, dim=-1)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.int32),
        "loss_mask": torch.tensor(mask, dtype=torch.uint8),
        "features": feats,
        "top_ids": idx.to(torch.int32).cpu(),
        "top_logp": val.to(torch.float16).cpu(),
    }


@torch.inference_mode()
def compute_features(
    model,
    tokenizer,
    target_name: str,
    data: str,
    out_dir: Path,
    layer_ids: list[int],
    max_tokens: int,
    max_len: int = 512,
    label_topk: int = 8,
    shard_tokens: int = 32768,
    min_assistant_tokens: int = 16,
) -> FeatureManifest:
    """Fill ``out_dir`` with feature shards until it holds ``max_tokens`` tokens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    want = FeatureManifest(
        target=target_name, data=data, layer_ids=list(layer_ids), max_len=max_len, label_topk=label_topk,
        hidden_size=int(model.config.hidden_size), vocab_size=int(model.config.vocab_size),
    )
    have = read_manifest(out_dir)
    if have is not None and not have.compatible(want):
        raise LtdError(f"feature cache {out_dir} was made with other settings; delete it or choose another --out")
    man = have or want
    if man.tokens >= max_tokens:
        return man
    writer = _ShardWriter(out_dir, man)
    seen = 0
    bar = tqdm(total=max_tokens, initial=man.tokens, unit="tok", desc="target features", smoothing=0.05)
    t0 = time.perf_counter()
    for msgs in iter_conversations(data):
        seen += 1
        if seen <= man.conversations_seen:
            continue
        ids, mask = tokenize_conversation(tokenizer, msgs, max_len)
        if sum(mask) < min_assistant_tokens or len(ids) < 8:
            continue
        writer.add(conversation_features(model, ids, mask, layer_ids, label_topk))
        bar.update(len(ids))
        if writer.tokens >= shard_tokens:
            writer.flush(seen)
        if man.tokens + writer.tokens >= max_tokens:
            break
    writer.flush(seen)
    bar.close()
    rate = (man.tokens) / max(time.perf_counter() - t0, 1e-9)
    log.info("feature cache %s: %d tokens in %d shards (%.0f tokens/s this run)", out_dir, man.tokens, len(man.shards), rate)
    return man


def load_shards(directory: Path, names: list[str]) -> list[dict[str, torch.Tensor]]:
    out = []
    for name in names:
        try:
            out.append(load_file(str(directory / name)))
        except Exception as exc:  # safetensors raises several types for a corrupt file
            raise LtdError(f"feature shard {directory / name} is corrupt ({type(exc).__name__}); delete it and rerun") from None
    return out
