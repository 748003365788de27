"""Drafting cost of the suffix drafter per cycle, with a full global store.

Why: the drafter must stay cheap next to a target step (at most 0.3 ms per cycle with
10^5 stored tokens), however much it has stored. This times what one cycle asks of it
through the cycle's own draft session (:class:`ltd.cycle.DraftSession`): the sync of the
committed tokens, then the whole tree in one step (what decoding does) or, for
comparison, the root and ``depth - 1`` expansions of the top-k frontier (the per-level
path a hybrid takes), and the end. One thread, two regimes: copying a span of the
prompt (long matches, deep chains) and free text (short matches with many occurrences).
Tokens are synthetic: a Zipf-distributed stream (frequent bigrams: many index hits) for
the store, and a prompt the output copies from. ``ltd profile --store-tokens N`` measures
the same on a real model with real text.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/suffix_cost.py --store-tokens 100000
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from ltd.cycle import DecodeState, begin
from ltd.drafting.suffix import SuffixConfig, SuffixDrafter


@dataclass
class _Room:
    """Only what a draft session reads from a target: how many positions it has."""

    max_context: int = 1 << 30


def _zipf(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return (rng.zipf(1.3, n) % vocab).tolist()


def _cycle(state: DecodeState, depth: int, topk: int, whole: bool) -> tuple[float, int]:
    """One cycle's drafting (sync, draft session, end): seconds and the tree's size."""
    t0 = time.perf_counter()
    state.drafter.sync(state.tokens, None)
    session = begin(state, topk, depth, whole=whole)
    while session.can_step:
        session.step()
    tree = session.finish()
    return time.perf_counter() - t0, tree.num_drafted


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
        times: dict[bool, list[float]] = {True: [], False: []}
        sizes: list[int] = []
        for whole in (True, False):
            drafter.reset()
            state = DecodeState(_Room(), drafter, list(prompt), len(prompt) - 1)
            for _ in range(args.cycles):
                # copy: the output repeats the prompt 4 tokens a cycle; prose: fresh Zipf tokens
                step = prompt[len(state.tokens) - len(prompt):][:4] if regime == "copy" else []
                state.tokens = state.tokens + (step or _zipf(rng, 4, args.vocab))
                seconds, size = _cycle(state, args.depth, args.topk, whole)
                times[whole].append(seconds)
                if whole:
                    sizes.append(size)
        own = times[True]
        print(f"{regime:>5}: drafting per cycle (whole tree, depth {args.depth} x k {args.topk}) median "
              f"{1e3 * statistics.median(own):.3f} ms, p90 {1e3 * sorted(own)[int(0.9 * len(own))]:.3f} ms; "
              f"per-level path median {1e3 * statistics.median(times[False]):.3f} ms "
              f"(last match {drafter.stats.match_length}, depth {drafter.stats.depth}, whole trees of {statistics.median(sizes):.0f} nodes (median))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
