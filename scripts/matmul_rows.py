"""Time one linear layer by number of rows: ``F.linear`` against ``(W @ x.T).T``.

Why: the hf backend's kernel plan (ltd.backends.hf_kernels) exists because on some CPUs
the BLAS is slow for exactly the few-row products a verification pass makes. This shows
it for single matrices of SmolLM2's shapes (its 576x49152 LM head and an MLP matrix),
median of repeats, and writes ``results.json`` and ``report.md`` to ``--out``.

    .venv/bin/python scripts/matmul_rows.py --threads 2 --out benchmarks/matmul-rows
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ltd.bench.machine import machine_info
from ltd.fileio import atomic_write_json, atomic_write_text

SHAPES = {"lm_head 49152x576": (49152, 576), "mlp 1536x576": (1536, 576)}
ROWS = (1, 2, 3, 4, 5, 8, 9, 16, 17)


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    for name, shape in SHAPES.items():
        w = torch.randn(*shape)
        rows = {}
        for m in ROWS:
            x = torch.randn(m, shape[1])
            rows[m] = {
                "linear_ms": round(median_ms(lambda: F.linear(x, w), args.repeats), 3),
                "wxt_ms": round(median_ms(lambda: (w @ x.t()).t(), args.repeats), 3),
            }
        results[name] = rows
    out = Path(args.out)
    atomic_write_json(out / "results.json", {"machine": machine_info("float32", "cpu"), "threads": args.threads, "results": results})
    lines = [f"# F.linear against (W @ x.T).T by rows ({machine_info('float32', 'cpu')['cpu_model']}, {args.threads} threads, fp32, median ms)", ""]
    for name, rows in results.items():
        lines += [f"## {name}", "", "| rows | F.linear | (W @ x.T).T |", "|---|---|---|"]
        lines += [f"| {m} | {r['linear_ms']:.2f} | {r['wxt_ms']:.2f} |" for m, r in rows.items()]
        lines.append("")
    atomic_write_text(out / "report.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
