"""Time one linear layer by number of rows: ``F.linear`` against ``(W @ x.T).T``.

Why: the hf backend's kernel plan (ltd.backends.hf_kernels) exists because on some CPUs
the BLAS is slow for exactly the few-row products a verification pass makes. This shows
it for single matrices of SmolLM2's shapes (its 576x49152 LM head and an MLP matrix),
median of repeats, and writes ``results.json`` and ``report.md`` to ``--out``.

    .venv/bin/python experiments/matmul_rows.py --threads 2 --out benchmarks/matmul-rows-2026-11-27
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ltd.bench.machine import machine_info
from ltd.bench.timing import median_ms, micro_bench_args
from ltd.fileio import atomic_write_json, atomic_write_text

SHAPES = {"lm_head 49152x576": (49152, 576), "mlp 1536x576": (1536, 576)}
ROWS = (1, 2, 3, 4, 5, 8, 9, 16, 17)


def main() -> None:
    args = micro_bench_args(__doc__.splitlines()[0], repeats=20)
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
