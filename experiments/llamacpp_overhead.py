"""Our plain loop (method ``ar``) against the backend's own plain decoding, interleaved.

Why: when a policy declines to draft, every cycle is a one-token ``ar`` cycle through
the speculative machinery (tree, selection, verify, accept, commit, output cut). On the
llama.cpp backend that loop must run at plain llama.cpp's speed (method ``llama.cpp``,
the bindings' own greedy loop); on the hf backend at transformers' ``generate`` (method
``hf``). The machine may be shared, so the two methods alternate per prompt and round
(the order flips every round) and the report is the median of the per-pair speed ratios
ar/reference, not absolute times. On llama.cpp it also reports the time each loop spends
outside ``llama_decode`` per token, and the same with ``llama_decode`` stubbed out (no
model work at all: the loops' pure Python cost, the least noisy number on a busy machine;
both loops are called as the engine calls them, without end-of-sequence stops so that
every token counts). ``--profile`` adds a cProfile of the ``ar`` runs, with
per-call costs, to see where the Python time of a cycle goes. Outputs are checked equal.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python experiments/llamacpp_overhead.py \\
        --backend llamacpp --threads 1 --prompts 5 --max-new-tokens 64 --rounds 5 --profile
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python experiments/llamacpp_overhead.py \\
        --backend hf --threads 1 --prompts 5 --max-new-tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import subprocess
import time

import torch

from ltd.cycle import decode
from ltd.drafting.base import NullDrafter
from ltd.engine import Engine, GenerateConfig

PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in a few sentences why the sky is blue.",
    "List five tips for writing clear documentation.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet.",
    "Give a short recipe for pancakes.",
    "How does a hash table handle collisions?",
    "Translate 'good morning, how are you?' into French and Spanish.",
)


def cpu_name() -> str:
    """The CPU model and its vector extensions (timings depend on both)."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), "unknown")
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return "unknown"
    ext = sorted({f for f in flags if f == "avx2" or f.startswith("avx512")})
    return f"{name} ({' '.join(ext) or 'no avx2'})"


def timed(engine: Engine, prompt: list[int], method: str, max_new_tokens: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    result = engine.generate(prompt, GenerateConfig(method=method, max_new_tokens=max_new_tokens))
    return time.perf_counter() - t0, result.tokens


class DecodeClock:
    """Sums the seconds spent inside ``llama_decode`` (the model's work): what remains of a
    run's time is the Python loop around it, the part this script is about."""

    def __init__(self, module) -> None:
        self.module, self.inner, self.seconds = module, module.llama_decode, 0.0

    def __enter__(self) -> "DecodeClock":
        def timed_decode(ctx, batch):
            t0 = time.perf_counter()
            try:
                return self.inner(ctx, batch)
            finally:
                self.seconds += time.perf_counter() - t0

        self.module.llama_decode = timed_decode
        return self

    def __exit__(self, *exc) -> None:
        self.module.llama_decode = self.inner


def stubbed_python_cost(engine: Engine, prompt: list[int], tokens: int, repeats: int) -> dict[str, float]:
    """Median seconds per token of each loop with ``llama_decode`` a no-op (after one real
    decode has filled the logits buffer): what the loop itself costs, model aside."""
    backend, lc = engine.backend, engine.backend.lc
    controller = engine.controller_for(GenerateConfig(method="ar"))
    loops = {
        engine.reference_method: lambda: backend.greedy_generate(prompt, tokens),
        "ar": lambda: [t for r in decode(backend, NullDrafter(), controller, prompt, tokens, topk=1) for t in r.new_tokens],
    }
    per_token: dict[str, list[float]] = {m: [] for m in loops}
    real = lc.llama_decode
    lc.llama_decode = lambda ctx, batch: 0
    try:
        for _ in range(repeats):
            for m, loop in loops.items():
                t0 = time.perf_counter()
                n = len(loop())
                per_token[m].append((time.perf_counter() - t0) / n)
    finally:
        lc.llama_decode = real
    return {m: statistics.median(v) for m, v in per_token.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backend", default="llamacpp", choices=("llamacpp", "hf"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also cProfile the ar runs (after the timed rounds)")
    ap.add_argument("--top", type=int, default=25, help="profile rows to print")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, drafter="none", backend=args.backend, threads=args.threads)
    ref = engine.reference_method
    prompts = [engine.encode(p) for p in PROMPTS[: args.prompts]]
    for p in prompts:  # warm-up (first-call allocations, caches)
        timed(engine, p, ref, 8)
        timed(engine, p, "ar", 8)
    ratios: list[float] = []
    secs: dict[str, list[float]] = {ref: [], "ar": []}
    outside: dict[str, list[float]] = {ref: [], "ar": []}  # seconds per token outside llama_decode
    tokens = 0
    for r in range(args.rounds):
        for p in prompts:
            order = (ref, "ar") if r % 2 == 0 else ("ar", ref)
            got = {}
            for m in order:
                if args.backend == "llamacpp":
                    with DecodeClock(engine.backend.lc) as clock:
                        got[m] = timed(engine, p, m, args.max_new_tokens)
                    outside[m].append((got[m][0] - clock.seconds) / len(got[m][1]))
                else:
                    got[m] = timed(engine, p, m, args.max_new_tokens)
            if got["ar"][1] != got[ref][1]:
                raise SystemExit(f"outputs differ between ar and {ref} on a prompt of {len(p)} tokens")
            for m in order:
                secs[m].append(got[m][0])
            ratios.append(got[ref][0] / got["ar"][0])  # speed of ar relative to the reference
            tokens += len(got["ar"][1])
    print(f"cpu: {cpu_name()}")
    print(f"backend {args.backend}, {args.threads} thread(s), {len(prompts)} prompts x {args.max_new_tokens} tokens x {args.rounds} rounds")
    if ratios:
        per_token = {m: statistics.median(s) / (tokens / len(ratios)) * 1e3 for m, s in secs.items()}
        print(f"outputs equal: yes ({tokens} tokens)")
        print(f"ar/{ref} speed ratio: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
        print("median ms per token: " + ", ".join(f"{m} {v:.3f}" for m, v in per_token.items()))
    if outside[ref]:
        print("median us per token outside llama_decode: " + ", ".join(f"{m} {statistics.median(v) * 1e6:.0f}" for m, v in outside.items()))
    if args.backend == "llamacpp":
        stub = stubbed_python_cost(engine, prompts[0], 256, 21)
        print("median us per token with llama_decode stubbed out: " + ", ".join(f"{m} {v * 1e6:.1f}" for m, v in stub.items()))
    if args.profile:
        prof = cProfile.Profile()
        cycles = 0
        prof.enable()
        for p in prompts:
            cycles += engine.generate(p, GenerateConfig(method="ar", max_new_tokens=args.max_new_tokens)).cycles
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf).sort_stats("tottime")
        stats.print_stats(args.top)
        print(f"cProfile of ar, {cycles} cycles (tottime order; divide by cycles for per-cycle cost):")
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
