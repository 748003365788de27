"""Cut a trained EAGLE-3 head's draft vocabulary to its N most frequent tokens.

The frequencies are the ones training chose the vocabulary by (next tokens and inputs in
the feature cache); the N most frequent of the head's own draft tokens stay, with their
trained weights. Example (the head shipped for smollm2-135m, to fit 25 MB):

    .venv/bin/python scripts/shrink_draft_vocab.py --head runs/s7/head-1m-s2/head \\
        --features runs/smollm2-eagle3/features --size 12288 --out runs/s7/head-12k
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from ltd.drafting.eagle3 import Eagle3Head, shrink_draft_vocab
from ltd.errors import LtdError


def token_columns(features: Path) -> list[dict[str, torch.Tensor]]:
    """Only the token columns of each feature shard (the features themselves are GBs)."""
    manifest = json.loads((features / "manifest.json").read_text())
    out = []
    for name in manifest["shards"]:
        with safe_open(str(features / name), framework="pt") as f:
            out.append({"input_ids": f.get_tensor("input_ids"), "top_ids": f.get_tensor("top_ids")})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", required=True, help="trained head directory")
    ap.add_argument("--features", required=True, help="the feature cache it was trained on")
    ap.add_argument("--size", type=int, required=True, help="new draft vocabulary size")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        head = Eagle3Head.load(args.head)
        if not 0 < args.size <= head.config.draft_vocab_size:
            raise LtdError(f"--size must be in 1..{head.config.draft_vocab_size} (the head's draft vocabulary), got {args.size}")
        counts = torch.zeros(head.config.vocab_size, dtype=torch.long)
        for sh in token_columns(Path(args.features)):
            for col in ("top_ids", "input_ids"):
                ids = sh[col][:, 0] if sh[col].dim() == 2 else sh[col]
                counts += torch.bincount(ids.long(), minlength=head.config.vocab_size)[: head.config.vocab_size]
        own, _ = head.vocab_maps()
        keep = own[torch.argsort(counts[own], descending=True, stable=True)[: args.size]]
        small = shrink_draft_vocab(head, keep)
    except (LtdError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    small.save(args.out)
    size = (Path(args.out) / "model.safetensors").stat().st_size
    print(f"draft vocabulary {head.config.draft_vocab_size} -> {args.size}; {args.out}/model.safetensors {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
