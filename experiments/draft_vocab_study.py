"""Effect of the draft vocabulary size: coverage of the target's next token, and head cost.

Coverage (share of held-out positions whose target top-1 token is inside the draft
vocabulary) bounds the acceptance any head with that vocabulary can reach; the LM-head
time for one draft step (k=8 rows) is its cost. Writes benchmarks/draft-vocab-2026-11-27/results.json.

    .venv/bin/python experiments/draft_vocab_study.py runs/smollm2-eagle3/features
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ltd.bench.machine import machine_info
from ltd.train.features import load_shards, read_manifest
from ltd.train.trainer import build_draft_vocab


def main(feature_dir: str, out: str = "benchmarks/draft-vocab-2026-11-27") -> None:
    d = Path(feature_dir)
    man = read_manifest(d)
    train = load_shards(d, man.shards[:-1])
    held = load_shards(d, man.shards[-1:])[0]
    top1 = held["top_ids"][:, 0].long()
    mask = held["loss_mask"] > 0
    rows = []
    hidden = man.hidden_size
    for size in (2048, 4096, 8192, 16384, 32768, man.vocab_size):
        vocab = build_draft_vocab(train, size, man.vocab_size)
        inside = torch.zeros(man.vocab_size, dtype=torch.bool)
        inside[vocab] = True
        coverage = float(inside[top1][mask].float().mean())
        w = torch.randn(size, hidden)
        x = torch.randn(8, hidden)
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            torch.log_softmax(x @ w.T, dim=-1).topk(8, dim=-1)
            times.append(time.perf_counter() - t0)
        rows.append({"draft_vocab": size, "coverage": round(coverage, 4), "lm_head_ms_k8": round(1000 * statistics.median(times), 3)})
        print(rows[-1])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info("float32", "cpu")
    (out_dir / "results.json").write_text(json.dumps({"machine": info, "features": str(d), "rows": rows}, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
