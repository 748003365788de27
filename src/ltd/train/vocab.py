"""Draft vocabularies chosen by how often the target produces each token.

Why: the output layer is most of an EAGLE-3 head's bytes (draft vocabulary x hidden size).
Training picks the draft vocabulary as the most frequent tokens of its feature cache
(the target's next tokens and the inputs), and the same counts let a trained head be cut
later to a size budget without retraining: the rarest rows go, the others keep their
trained weights (``ltd drafter shrink-vocab``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ltd.drafting.eagle3 import Eagle3Head, load_head, save_head, shrink_draft_vocab
from ltd.errors import LtdError
from ltd.train.features import read_manifest

log = logging.getLogger(__name__)

#: the token columns of a feature shard that the counts read
TOKEN_COLUMNS = ("top_ids", "input_ids")


def token_counts(shards: list[dict[str, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """How often each target id occurs as a next token (top-1 label) or as an input."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for sh in shards:
        for col in TOKEN_COLUMNS:
            ids = sh[col][:, 0] if sh[col].dim() == 2 else sh[col]
            counts += torch.bincount(ids.long(), minlength=vocab_size)[:vocab_size]
    return counts


def read_token_columns(features: str | Path) -> list[dict[str, torch.Tensor]]:
    """Only the token columns of each shard of a feature cache (the features are GBs)."""
    directory = Path(features)
    manifest = read_manifest(directory)
    if manifest is None:
        raise LtdError(f"no feature cache in {directory} (manifest.json missing); give the --features the head was trained on")
    out = []
    for name in manifest.shards:
        try:
            with safe_open(str(directory / name), framework="pt") as f:
                out.append({col: f.get_tensor(col) for col in TOKEN_COLUMNS})
        except (OSError, SafetensorError) as exc:
            raise LtdError(f"feature shard {directory / name} is missing or corrupt ({exc}); recompute the features") from None
    return out


def shrink_to_most_frequent(head: Eagle3Head, counts: torch.Tensor, size: int) -> Eagle3Head:
    """A copy of ``head`` keeping the ``size`` most frequent of its own draft tokens.

    Ties keep the lower target id (a stable sort), so the result does not depend on the
    order of the draft vocabulary.
    """
    if not 0 < size <= head.config.draft_vocab_size:
        raise LtdError(f"--size must be in 1..{head.config.draft_vocab_size} (the head's draft vocabulary), got {size}")
    own, _ = head.vocab_maps()
    order = torch.argsort(counts[own], descending=True, stable=True)
    return shrink_draft_vocab(head, own[order[:size]])


def shrink_head_vocab(head_dir: str | Path, features: str | Path, size: int, out_dir: str | Path) -> Eagle3Head:
    """Load a head, cut its draft vocabulary by the feature cache's counts, save it to ``out_dir``."""
    head = load_head(head_dir)
    counts = token_counts(read_token_columns(features), head.config.vocab_size)
    small = shrink_to_most_frequent(head, counts, size)
    save_head(small, out_dir)
    log.info("draft vocabulary %d -> %d written to %s", head.config.draft_vocab_size, size, out_dir)
    return small
