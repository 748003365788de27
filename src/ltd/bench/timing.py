"""Median wall time of a callable: the micro-benchmarks in experiments/ share one timer, so
their numbers are taken the same way (warm-up calls first, then the median of repeats,
which a shared, noisy machine disturbs least)."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def micro_bench_args(description: str, repeats: int, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The common command line of a micro-benchmark script (``--threads``, ``--repeats``,
    ``--out`` and any ``extra`` options); applies the thread count and a fixed seed."""
    import torch

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--out", required=True)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args
