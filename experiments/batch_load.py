"""In-process load test of continuous batching: where a batched cycle's time goes.

`ltd bench-load` measures the server end to end; this drives :class:`ltd.batching.BatchedEngine`
directly from C threads (no HTTP), on the first turns of the mixed stream, and splits the wall
time into the target's forwards and the lanes' own work (drafting, acceptance, bookkeeping),
which the lanes do one at a time between forwards. It is the measurement behind the load-aware
greedy controller's cost model (docs/results.md, "Continuous batching").

    OMP_NUM_THREADS=2 .venv/bin/python experiments/batch_load.py --concurrency 1,4 \
        --methods ar,greedy,static,ltd --requests 12 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time

from ltd.batching import BatchedEngine
from ltd.bench.suites import mixed_stream
from ltd.engine import Engine, GenerateConfig
from ltd.runtime import enable_compute_thread, on_compute_thread


def run_level(batched: BatchedEngine, prompts: list[list[int]], cfg: GenerateConfig, clients: int) -> dict:
    """Decode ``prompts`` with ``clients`` threads taking the next prompt as they finish."""
    work: queue.Queue = queue.Queue()
    for p in prompts:
        work.put(p)
    tokens, cycles, drafting, rows, latencies = [0], [0], [0], [0], []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                prompt = work.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            n = c = d = v = 0
            for result in batched.stream(prompt, cfg):
                n += len(result.new_tokens)
                c += 1
                d += result.depth > 0
                v += result.size
            with lock:
                tokens[0] += n
                cycles[0] += c
                drafting[0] += d
                rows[0] += v
                latencies.append(time.perf_counter() - t0)

    pool = batched.pool
    f0, r0, s0 = pool.forwards, pool.rows, pool.forward_seconds
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "tokens_per_second": tokens[0] / wall,
        "wall_seconds": wall,
        "forward_share": (pool.forward_seconds - s0) / wall,
        "forwards": pool.forwards - f0,
        "rows_per_forward": (pool.rows - r0) / max(pool.forwards - f0, 1),
        "tokens_per_cycle": tokens[0] / max(cycles[0], 1),
        "drafting_cycles": drafting[0] / max(cycles[0], 1),
        "drafted_rows_per_cycle": rows[0] / max(cycles[0], 1),
        "lane_work_ms": 1000 * pool.mean_work_seconds,
        "latency_p50": latencies[len(latencies) // 2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--drafter", default=None, help="drafter spec (default: the model's)")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--methods", default="ar,greedy")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--no-compute-thread", action="store_true",
                    help="load and run forwards on whichever thread asks, as before the compute thread")
    args = ap.parse_args()
    if not args.no_compute_thread:
        enable_compute_thread()  # as ltd serve does
    engine = on_compute_thread(Engine.load, args.model, args.drafter)
    questions = mixed_stream()[: args.requests]  # the stream bench-load sends, in order
    prompts = [engine.encode(q.turns[0]) for q in questions]
    batched = BatchedEngine(engine, args.max_batch)
    for method in args.methods.split(","):
        cfg = GenerateConfig(method=method, max_new_tokens=args.max_tokens)
        on_compute_thread(engine.prepare, cfg)
        run_level(batched, prompts[:2], cfg, 1)  # warm-up: kernels, profile, policies
        for c in [int(x) for x in args.concurrency.split(",")]:
            row = run_level(batched, prompts, cfg, c)
            print(json.dumps({"method": method, "clients": c, **{k: round(v, 3) for k, v in row.items()}}), flush=True)


if __name__ == "__main__":
    main()
