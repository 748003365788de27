"""Forward cost on a second thread, with and without another thread's OpenMP team alive.

Why: torch's CPU kernels run on one OpenMP team per calling thread (GNU libgomp). Once a
second thread runs multi-threaded work, libgomp manages more threads than cores and stops
spinning between parallel regions, and each of a forward's few hundred regions waits on a
wake-up. A server loads its model on the main thread and decodes on another, so this
measured the slowdown, and the fix ltd serve uses (:class:`ltd.runtime.ComputeThread`: the
main thread keeps one torch thread; loading and forwards run on one thread).

    OMP_NUM_THREADS=2 .venv/bin/python experiments/openmp_teams.py main2   # main loads at 2 threads
    OMP_NUM_THREADS=2 .venv/bin/python experiments/openmp_teams.py main1   # main at 1 thread

Prints the median forward time (ms) by rows, over 200 tokens of context.
"""

from __future__ import annotations

import sys
import threading
import time

import torch

from ltd import cache_ops
from ltd.engine import Engine


def forward_ms(backend, rows: int, ctx: int = 200, reps: int = 7) -> float:
    cache = cache_ops.new_cache(backend.config)
    backend.forward(list(range(1000, 1000 + ctx)), torch.arange(ctx).view(1, -1), None, cache, False, 1)
    times = []
    for _ in range(reps):
        cache_ops.truncate(cache, ctx)
        mask = torch.zeros(1, 1, rows, ctx + rows)
        pos = torch.arange(ctx, ctx + rows).view(1, -1)
        t0 = time.perf_counter()
        backend.forward(list(range(2000, 2000 + rows)), pos, mask, cache, False, 0)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "main2"
    threads = torch.get_num_threads()
    if mode == "main1":
        torch.set_num_threads(1)
    backend = Engine.load("smollm2-135m", drafter="none").backend

    def run(where: str) -> None:
        torch.set_num_threads(threads)
        print(mode, where, " ".join(f"rows {r}: {forward_ms(backend, r):.0f}" for r in (1, 4, 16, 113)), flush=True)

    if mode == "main2":
        run("main thread")
    worker = threading.Thread(target=run, args=("second thread",))
    worker.start()
    worker.join()


if __name__ == "__main__":
    main()
