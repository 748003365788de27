"""Time an EAGLE-3 head's root draft step by weight dtype (the default of ``--head-dtype``).

Why: drafts never change the output, so the head's precision is free to trade for speed.
The root step (the head catches up on the 1-3 positions the last cycle committed, then
proposes the first level) is memory-bound on a CPU, so halving the weight bytes should
pay even without native bf16 arithmetic. This times that step for the shipped SmolLM2
head at 200 tokens of context, float32 against bfloat16, median of repeats, and writes
``results.json`` and ``report.md`` to ``--out``. Acceptance is compared by ``ltd bench
--head-dtype`` (commands in benchmarks/README.md, row ``head-dtype``).

    .venv/bin/python experiments/head_dtype.py --threads 2 --out benchmarks/head-dtype-2026-11-27
"""

from __future__ import annotations

from pathlib import Path

import torch

from ltd.bench.machine import machine_info
from ltd.bench.timing import median_ms, micro_bench_args
from ltd.drafting.eagle3 import Eagle3Drafter, load_head
from ltd.engine import builtin_drafter_dir
from ltd.fileio import atomic_write_json, atomic_write_text

CONTEXT = 200
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def root_step_ms(head, rows: int, repeats: int) -> float:
    """Median time of ``root`` on ``rows`` new positions after CONTEXT committed ones."""
    hidden = head.config.hidden_size
    dtype = next(head.parameters()).dtype
    drafter = Eagle3Drafter(head, torch.nn.Embedding(head.config.vocab_size, hidden))
    drafter.sync(list(range(1, CONTEXT + 2)), torch.randn(CONTEXT, 3 * hidden))
    drafter.root(None, 8)
    start = CONTEXT - rows

    def step() -> None:  # forget the last `rows` head entries, then consume them again
        drafter._k, drafter._v = drafter._k[:, :, :start], drafter._v[:, :, :start]
        drafter._consumed = start
        drafter._pending = [torch.randn(rows, 3 * hidden).to(dtype)]
        drafter.root(None, 8)

    return median_ms(step, repeats, warmup=5)


def main() -> None:
    args = micro_bench_args(__doc__.splitlines()[0], repeats=30,
                            extra=lambda ap: ap.add_argument("--head", default="smollm2-135m-eagle3", help="built-in head name"))
    results = {}
    for name, dtype in DTYPES.items():
        head = load_head(builtin_drafter_dir(args.head), dtype=dtype)
        results[name] = {rows: round(root_step_ms(head, rows, args.repeats), 3) for rows in (1, 2, 3)}
    machine = machine_info("float32", "cpu")
    out = Path(args.out)
    atomic_write_json(out / "results.json", {"machine": machine, "threads": args.threads, "head": args.head, "root_step_ms": results})
    lines = [f"# {args.head} root draft step by weight dtype ({machine['cpu_model']}, {args.threads} threads, median ms)", "",
             "| new positions | " + " | ".join(DTYPES) + " |", "|---|" + "---|" * len(DTYPES)]
    lines += [f"| {rows} | " + " | ".join(f"{results[d][rows]:.2f}" for d in DTYPES) + " |" for rows in (1, 2, 3)]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
