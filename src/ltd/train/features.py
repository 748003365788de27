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
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ltd.errors import LtdError
from ltd.fileio import atomic_write_json
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
    buf: dict[str, list[torch.Tensor]] = {k: [] for k in ("input_ids", "loss_mask", "features", "top_ids", "top_logp")}
    lengths: list[int] = []
    buf_tokens = 0
    seen = 0
    bar = tqdm(total=max_tokens, initial=man.tokens, unit="tok", desc="target features", smoothing=0.05)
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal buf_tokens
        if not lengths:
            return
        name = f"shard_{len(man.shards):05d}.safetensors"
        tensors = {k: torch.cat(v) for k, v in buf.items()}
        tensors["lengths"] = torch.tensor(lengths, dtype=torch.int64)
        tmp = out_dir / (name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, out_dir / name)
        man.shards.append(name)
        man.tokens += buf_tokens
        man.conversations_seen = seen
        atomic_write_json(out_dir / MANIFEST, asdict(man))
        for v in buf.values():
            v.clear()
        lengths.clear()
        buf_tokens = 0

    for msgs in iter_conversations(data):
        seen += 1
        if seen <= man.conversations_seen:
            continue
        ids, mask = tokenize_conversation(tokenizer, msgs, max_len)
        if sum(mask) < min_assistant_tokens or len(ids) < 8:
            continue
        x = torch.tensor([ids], dtype=torch.long, device=model.device)
        out = model(input_ids=x, output_hidden_states=True)
        feats = torch.cat([out.hidden_states[i][0] for i in layer_ids], dim=-1).to(torch.float16).cpu()
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
        val, idx = torch.topk(logp, label_topk, dim=-1)
        buf["input_ids"].append(torch.tensor(ids, dtype=torch.int32))
        buf["loss_mask"].append(torch.tensor(mask, dtype=torch.uint8))
        buf["features"].append(feats)
        buf["top_ids"].append(idx.to(torch.int32).cpu())
        buf["top_logp"].append(val.to(torch.float16).cpu())
        lengths.append(len(ids))
        buf_tokens += len(ids)
        bar.update(len(ids))
        if buf_tokens >= shard_tokens:
            flush()
        if man.tokens + buf_tokens >= max_tokens:
            break
    flush()
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
