"""Drafting cost of the suffix drafter per cycle, with a full global store.

Why: the drafter must stay cheap next to a target step (at most 0.3 ms per cycle with
10^5 stored tokens), however much it has stored. This times what one cycle asks of it
(sync of the committed tokens, the root draft, ``depth - 1`` expansions of the top-k
frontier, end) on one thread, in two regimes: copying a span of the prompt (long
matches, deep chains) and free text (short matches with many occurrences). Tokens are
synthetic: a Zipf-distributed stream (frequent bigrams: many index hits) for the store,
and a prompt the output copies from.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/suffix_cost.py --store-tokens 100000
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ltd.drafting.suffix import SuffixConfig, SuffixDrafter
from ltd.tree import Tree


def _zipf(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return (rng.zipf(1.3, n) % vocab).tolist()


def _cycle(drafter: SuffixDrafter, tokens: list[int], depth: int, topk: int) -> float:
    """One cycle's drafting work, in seconds (the tree bookkeeping of the cycle mimicked)."""
    t0 = time.perf_counter()
    drafter.sync(tokens, None)
    tree = Tree.root(tokens[-1])
    tok, lp = drafter.root(tree, topk)
    frontier = tree.add(tok, torch.zeros_like(tok), lp)
    for _ in range(depth - 1):
        ctok, clp = drafter.expand(tree, frontier, topk)
        cum = tree.scores[frontier].unsqueeze(1) + clp
        added = tree.add(ctok, frontier.unsqueeze(1).expand_as(ctok), cum)
        frontier = added[torch.topk(cum.reshape(-1), min(topk, cum.numel())).indices]
    drafter.end()
    return time.perf_counter() - t0


def _drafter_only(drafter: SuffixDrafter, tokens: list[int], depth: int, topk: int) -> float:
    """The drafter's own calls only (tree growth, which the cycle pays anyway, excluded)."""
    tree = Tree.root(tokens[-1])
    spent = 0.0
    t0 = time.perf_counter()
    drafter.sync(tokens, None)
    tok, lp = drafter.root(tree, topk)
    spent += time.perf_counter() - t0
    frontier = tree.add(tok, torch.zeros_like(tok), lp)
    for _ in range(depth - 1):
        t0 = time.perf_counter()
        ctok, clp = drafter.expand(tree, frontier, topk)
        spent += time.perf_counter() - t0
        cum = tree.scores[frontier].unsqueeze(1) + clp
        added = tree.add(ctok, frontier.unsqueeze(1).expand_as(ctok), cum)
        frontier = added[torch.topk(cum.reshape(-1), min(topk, cum.numel())).indices]
    t0 = time.perf_counter()
    drafter.end()
    return spent + time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store-tokens", type=int, default=100_000)
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--vocab", type=int, default=49152)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    drafter = SuffixDrafter(SuffixConfig(store_tokens=args.store_tokens))
    store = drafter.enable_store()
    while store.requests * 401 < 1.2 * args.store_tokens:  # full, and evicting
        store.add(_zipf(rng, 400, args.vocab))
    print(f"store: {len(store)} tokens, {store.index.entries} index entries, {len(store.lengths)} requests")
    for regime in ("copy", "prose"):
        prompt = _zipf(rng, args.prompt_tokens, args.vocab)
        drafter.reset()
        tokens = list(prompt)
        whole, own = [], []
        for c in range(args.cycles):
            # copy: the output repeats the prompt 4 tokens a cycle; prose: fresh Zipf tokens
            step = prompt[len(tokens) - len(prompt):][:4] if regime == "copy" else _zipf(rng, 4, args.vocab)
            tokens = tokens + (step or _zipf(rng, 4, args.vocab))
            whole.append(_cycle(drafter, tokens, args.depth, args.topk))
            own.append(_drafter_only(drafter, tokens, args.depth, args.topk))
        print(f"{regime:>5}: drafter calls median {1e3 * statistics.median(own):.3f} ms, p90 "
              f"{1e3 * sorted(own)[int(0.9 * len(own))]:.3f} ms; with the tree growth of depth {args.depth} x k {args.topk}: "
              f"median {1e3 * statistics.median(whole):.3f} ms (last match {drafter.stats.match_length}, depth {drafter.stats.depth})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
