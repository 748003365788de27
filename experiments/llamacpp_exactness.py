#!/usr/bin/env python
"""Greedy static trees on the llama.cpp backend against its plain greedy loop.

For every prompt x drafter x tree shape: generate with ``ltd.cycle.decode`` and a
StaticController, compare token for token with ``greedy_generate`` (one decode per token),
and count the cycles whose accepted path left the tree's first-child chain and was cut
there (``cut``), the commits that had to move accepted KV cells (``compactions``) and
their time. ``--no-cut`` turns off the per-node exactness marks, so acceptance uses every
node (what the backend does with stock kernels). ``--compaction-cost N`` times commits
at N tokens of context instead.

Exact outputs need batch-size-independent kernels: a llama-cpp-python built with
``CMAKE_ARGS=-DGGML_LLAMAFILE=OFF`` and ``LTD_LLAMACPP_EXACT=1`` (the script sets it).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/llamacpp_exactness.py --shapes 4x4x8,6x4x16 --drafters self,ngram
    OMP_NUM_THREADS=1 .venv/bin/python experiments/llamacpp_exactness.py --target qwen2.5-coder-1.5b \\
        --draft-model qwen2.5-coder-0.5b --drafters self --prompts code --new-tokens 48
    OMP_NUM_THREADS=1 .venv/bin/python experiments/llamacpp_exactness.py --compaction-cost 300
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("LTD_LLAMACPP_EXACT", "1")

import torch  # noqa: E402

import ltd.cycle  # noqa: E402
from ltd.drafting.base import ReversedDrafter  # noqa: E402
from ltd.backends.llamacpp import LlamaCppBackend, LlamaCppModel, exact_decoding  # noqa: E402
from ltd.control import StaticController  # noqa: E402
from ltd.drafting.lm import LMDrafter  # noqa: E402
from ltd.drafting.ngram import NgramDrafter  # noqa: E402
from ltd.models import registry_gguf  # noqa: E402
from ltd.registry import REGISTRY  # noqa: E402

CHAT = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works in simple terms.",
    "List five tips for staying productive while working from home.",
    "What is the capital of France and why is it famous?",
    "Describe the water cycle step by step.",
    "Give me a recipe for pancakes.",
]
CODE = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a function in JavaScript that returns the sum of an array of numbers.",
    "Explain what a binary search tree is and give a short Python implementation.",
]
ARTICLE = (
    "The quick brown fox jumps over the lazy dog near the river bank while the sun sets slowly behind the hills. "
    "Scientists have discovered that many species of birds use the magnetic field of the earth to navigate during "
    "migration. In the early days of computing, programs were written on punched cards and fed into enormous "
    "machines that filled entire rooms. A good cup of coffee depends on fresh beans, the right grind, clean water, "
    "and a careful eye on temperature and time. The city council met on Tuesday to discuss the new budget, which "
    "includes funding for parks, libraries, and road repairs. "
)


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def tokenize(model: LlamaCppModel, text: str) -> list[int]:
    lc = model.llama_cpp
    raw = text.encode()
    buf = (lc.llama_token * (len(raw) + 16))()
    n = lc.llama_tokenize(model.vocab, raw, len(raw), buf, len(buf), True, True)
    return list(buf[:n])


def prompts_for(model: LlamaCppModel, which: str, context: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    if which in ("chat", "all"):
        out.update({f"chat{i}": tokenize(model, chat(t)) for i, t in enumerate(CHAT)})
    if which in ("code", "all"):
        out.update({f"code{i}": tokenize(model, chat(t)) for i, t in enumerate(CODE)})
    if which in ("long", "all"):
        body = tokenize(model, ARTICLE * 8)[: context - 12]
        out["long"] = body + tokenize(model, "\nSummarize the text above.\n")[1:]
    return out


def run_one(target, drafter, shape, prompt, n_new, ref):
    d, k, v = shape
    raw: list[int] = []
    accept_tree = ltd.cycle.accept_tree

    def counting(*args, **kwargs):
        acc = accept_tree(*args, **kwargs)
        raw.append(len(acc.path))
        return acc

    ltd.cycle.accept_tree = counting
    c0, s0 = target.compactions, target.compaction_seconds
    t0 = time.perf_counter()
    try:
        results = list(ltd.cycle.decode(target, drafter, StaticController(depth=d, topk=k, size=v), prompt, n_new, topk=k))
    finally:
        ltd.cycle.accept_tree = accept_tree
    got = [t for r in results for t in r.new_tokens]
    first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    cycles = results[1:]
    return {
        "equal": got == ref,
        "first_difference": first,
        "cycles": len(cycles),
        "accepted": sum(r.num_accepted for r in cycles),
        "cut": sum(n > 1 + r.num_accepted for n, r in zip(raw, cycles)),
        "compactions": target.compactions - c0,
        "compaction_ms": 1e3 * (target.compaction_seconds - s0),
        "seconds": time.perf_counter() - t0,
    }


def compaction_cost(model: LlamaCppModel, context: int, threads: int, repeats: int) -> dict:
    """Commit time at ``context`` tokens: a chain prefix (no move) vs paths that left it."""
    b = LlamaCppBackend(model, threads=threads, max_context=max(1024, context + 64))
    base = tokenize(model, ARTICLE * 40)[:context]
    tokens = [504, 3525, 314, 2683, 359, 1115, 30, 42, 7]
    parents = [-1, 0, 0, 0, 0, 1, 2, 6, 7]  # first-child chain 0 -> 1 -> 5; child 2 leads to 6 -> 7 -> 8
    out = {}
    for name, keep in [("chain [0,1,5]", [0, 1, 5]), ("off-chain [0,2]", [0, 2]), ("off-chain [0,2,6,7,8]", [0, 2, 6, 7, 8])]:
        verify, commit = [], []
        for _ in range(repeats):
            b.reset()
            b.score(base, list(range(-1, len(base) - 1)), last_only=True)
            b.commit(list(range(len(base))))
            t0 = time.perf_counter()
            b.score(tokens, parents)
            t1 = time.perf_counter()
            b.commit(keep)
            verify.append(1e3 * (t1 - t0))
            commit.append(1e3 * (time.perf_counter() - t1))
        out[name] = {"verify_ms": statistics.median(verify), "commit_ms": statistics.median(commit), "commit_ms_max": max(commit)}
        print(f"context {context}, commit {name}: {out[name]['commit_ms']:.2f} ms median (max {max(commit):.2f}); "
              f"verifying the 9-node tree {out[name]['verify_ms']:.0f} ms", flush=True)
    b.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft-model", default=None, help="registry model drafting for 'self' (default: the target)")
    ap.add_argument("--drafters", default="self,ngram", help="comma list of self, reversed, ngram")
    ap.add_argument("--shapes", default="4x4x8", help="comma list of DEPTHxTOPKxSIZE")
    ap.add_argument("--prompts", default="all", choices=["all", "chat", "code", "long"])
    ap.add_argument("--context", type=int, default=300, help="tokens of the long prompt")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-cut", action="store_true", help="accept on every node's logits (no exactness marks)")
    ap.add_argument("--compaction-cost", type=int, default=0, metavar="N", help="only time commits at N tokens of context")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    model = LlamaCppModel(registry_gguf(REGISTRY[args.target]))
    exact = exact_decoding(model.llama_cpp)
    print(f"target {args.target}, exact kernels: {exact}, llama_cpp from {os.path.dirname(model.llama_cpp.__file__)}", flush=True)
    if args.compaction_cost:
        compaction_cost(model, args.compaction_cost, args.threads, args.repeats)
        return 0
    dmodel = LlamaCppModel(registry_gguf(REGISTRY[args.draft_model])) if args.draft_model else model
    target = LlamaCppBackend(model, threads=args.threads, max_context=2048)
    target.mark_exact = not args.no_cut
    drafter_backend = LlamaCppBackend(dmodel, threads=args.threads, max_context=2048)
    makers = {
        "self": lambda: LMDrafter(drafter_backend),
        "reversed": lambda: ReversedDrafter(LMDrafter(drafter_backend)),
        "ngram": NgramDrafter,
    }
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for pname, prompt in prompts_for(model, args.prompts, args.context).items():
        ref = target.greedy_generate(prompt, args.new_tokens)
        for dname in args.drafters.split(","):
            for shape in shapes:
                row = {"prompt": pname, "prompt_tokens": len(prompt), "drafter": dname, "shape": "x".join(map(str, shape))}
                row.update(run_one(target, makers[dname](), shape, prompt, args.new_tokens, ref))
                rows.append(row)
                diff = "equal" if row["equal"] else f"DIFFERS at {row['first_difference']}"
                print(f"{pname} ({len(prompt)} tokens) {dname} {row['shape']}: {diff}; {row['cycles']} cycles, "
                      f"{row['accepted']} accepted, {row['cut']} cut, {row['compactions']} compactions "
                      f"({row['compaction_ms']:.1f} ms), {row['seconds']:.1f} s", flush=True)
    n_comp = sum(r["compactions"] for r in rows)
    ms = sum(r["compaction_ms"] for r in rows)
    print(f"{sum(r['equal'] for r in rows)}/{len(rows)} runs equal plain greedy; {sum(r['cycles'] for r in rows)} cycles, "
          f"{sum(r['accepted'] for r in rows)} accepted, {sum(r['cut'] for r in rows)} cut; {n_comp} compactions"
          + (f", {ms / n_comp:.2f} ms per compacting commit" if n_comp else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "exact_kernels": exact, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
