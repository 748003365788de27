"""Measuring a machine's cycle costs: the verification grid, real cycles, the quick profile.

The measuring core that ``ltd profile`` (:mod:`ltd.rl.latency`, the full grid over
contexts, for training policies) and the quick profile of cost-aware methods share. It
sits in the control layer, beside the cost table it fills, so that the engine can
measure a machine on first use without importing the RL package.

:func:`quick_profile` measures the few numbers a cost-aware controller needs -- the
verification cost of a handful of token counts at one context (1 token = a plain step),
the drafter's step costs and the per-cycle overhead -- in a time budget: a couple of
seconds on a 135M model (about 10 s on one busy core), at most about 30 s on a 1.5B one.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Sequence

import numpy as np
import torch

from ltd.control.costs import LatencyModel

log = logging.getLogger(__name__)

QUICK_VERIFY_TOKENS = (1, 2, 3, 5, 9, 17, 33)  # V + 1 for V = 0, 1, 2, 4, 8, 16, 32
QUICK_CONTEXT = 128
QUICK_BUDGET_SECONDS = 10.0


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def bushy_parents(n: int, k: int) -> list[int]:
    """A k-ary tree of ``n`` nodes in index order (root parent -1): the shape of a draft tree."""
    return [-1] + [(i - 1) // max(k, 1) for i in range(1, n)]


def measure_verify(target, feature_layers, tokens: Sequence[int], contexts: Sequence[int], topk: int, repeats: int, rng) -> list[list[float]]:
    """Median forward cost on the (context, tokens) grid.

    Measured in rounds: each round visits every grid point once, in a shuffled order, so
    a slow spell of a shared machine spreads over all points instead of inflating a few
    of them (measuring one point ``repeats`` times in a row made neighbouring points
    disagree by 50% and more here). Round 0 is a warm-up.
    """
    times: dict[tuple[int, int], list[float]] = {(c, n): [] for c in contexts for n in tokens}
    prefixes = {c: rng.integers(0, target.vocab_size, size=c).tolist() for c in contexts}
    drafts = {n: (rng.integers(0, target.vocab_size, size=n).tolist(), bushy_parents(n, topk)) for n in tokens}
    for r in range(repeats + 1):
        for ctx in rng.permutation(list(contexts)).tolist():
            if r == 0 or len(contexts) > 1:  # one context stays committed from round to round
                target.reset()
                target.score(prefixes[ctx], list(range(-1, ctx - 1)), last_only=True)
                target.commit(list(range(ctx)))
            for n in rng.permutation(list(tokens)).tolist():
                ids, parents = drafts[n]
                t0 = time.perf_counter()
                target.score(ids, parents, feature_layers)
                dt = time.perf_counter() - t0
                target.rollback()
                if r:  # round 0 is a warm-up
                    times[(ctx, n)].append(dt)
    grid = [[median(times[(c, n)]) for n in tokens] for c in contexts]
    for c, row in zip(contexts, grid):
        log.info("verify at context %d: %s ms", c, ", ".join(f"{1e3 * t:.1f}" for t in row))
    target.reset()
    return grid


def measure_cycles(target, drafter, topk: int, max_depth: int, size: int, context: int, cycles: int, rng, controller=None,
                   prompt=None):
    """Real cycles (draft to max depth, select, verify, accept, commit): per-step draft
    times, per-cycle overhead (select, accept and commit), optionally the controller's
    per-call costs, and the median drafting time of a cycle. The cycles are
    :mod:`ltd.cycle`'s own, timed through its stage hook.

    ``prompt(rng, context)`` makes each cycle run's prompt (default: random tokens, on
    which model-free drafters find nothing to draft)."""
    from ltd.cycle import StageTimes, begin, draft_room, finish, size_state, start

    steps: list[list[float]] = []
    drafting: list[float] = []  # all draft steps of a cycle
    overhead: list[float] = []
    depth_calls: list[float] = []
    size_calls: list[float] = []
    state = None
    done = 0
    while done < cycles + 1:
        if state is None or draft_room(state) < max_depth + 1:
            ids = prompt(rng, context) if prompt is not None else rng.integers(0, target.vocab_size, size=context).tolist()
            state, _ = start(target, drafter, ids)
        session = begin(state, topk, max_depth, whole=True)  # as decoding drafts (a whole tree at once where it can)
        while session.can_step:
            session.step()
            if controller is not None:
                obs_state = session.observe()
                t0 = time.perf_counter()
                controller.continue_drafting(obs_state)
                depth_calls.append(time.perf_counter() - t0)
        if controller is not None:
            final = size_state(session.tree, state.context_length, topk)
            t0 = time.perf_counter()
            controller.choose_size(final)
            size_calls.append(time.perf_counter() - t0)
        times = StageTimes()
        finish(state, session, size, timer=times)
        if done:  # cycle 0 is a warm-up
            steps.append(session.step_seconds)
            drafting.append(sum(session.step_seconds))
            overhead.append(times["select"] + times["accept"] + times["commit"])
        done += 1
    target.reset()
    drafter.reset()
    per_step = [median([s[i] for s in steps if len(s) > i]) for i in range(max(len(s) for s in steps))]
    return per_step, median(overhead), median(depth_calls), median(size_calls), median(drafting)


def repeating_prompt(rng, vocab_size: int, context: int, period: int = 24) -> list[int]:
    """``context`` tokens repeating a random ``period``-token span: model-free drafters find
    matches in it and draft, so their measured step costs are those of real drafting."""
    span = rng.integers(0, vocab_size, size=period).tolist()
    return (span * (context // period + 1))[:context]


def quick_profile(
    target,
    drafter,
    *,
    topk: int = 8,
    verify_tokens: Sequence[int] = QUICK_VERIFY_TOKENS,
    context: int = QUICK_CONTEXT,
    budget_seconds: float = QUICK_BUDGET_SECONDS,
    model_name: str = "",
    drafter_name: str = "",
    machine: dict | None = None,
    seed: int = 0,
) -> LatencyModel:
    """A small :class:`LatencyModel` in about ``budget_seconds`` at most.

    Measures, at one context: the verification forward of each count in ``verify_tokens``
    (the one-token entry is what a plain step costs; costs are made non-decreasing in the
    token count, as forwards are), the drafter's first two step costs and the per-cycle
    overhead from a few real cycles (a whole-tree drafter costs all in its first step). The number of rounds over the
    verification counts follows from the time of the first (warm-up) round, between 3 and
    7 (each visits every count once, in a shuffled order, so a slow spell of a shared
    machine spreads over all counts), so large models stay inside the budget.
    """
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    tokens = sorted({int(t) for t in verify_tokens if 1 <= int(t)})
    ctx = max(1, min(int(context), int(target.max_context) - tokens[-1] - 8))
    tokens = [t for t in tokens if ctx + t + 1 <= target.max_context] or [1]
    with torch.inference_mode():
        steps, overhead, _, _, _ = measure_cycles(
            target, drafter, topk, max_depth=2, size=min(8, tokens[-1] - 1) or 1, context=ctx, cycles=1, rng=rng,
            prompt=lambda r, c: repeating_prompt(r, target.vocab_size, c),
        )
        t0 = time.perf_counter()
        log.info("quick cost profile: draft steps and overhead from real cycles in %.1f s", t0 - t_start)
        # one warm-up round times a round; then as many as the budget leaves (3..7)
        measure_verify(target, drafter.feature_layers, tokens, [ctx], topk, 0, rng)
        per_round = time.perf_counter() - t0
        left = budget_seconds - (time.perf_counter() - t_start) - per_round  # the next call warms up again
        repeats = int(max(3, min(7, left / max(per_round, 1e-9))))
        grid = measure_verify(target, drafter.feature_layers, tokens, [ctx], topk, repeats, rng)
    # a forward over more tokens never costs less: a noisy median below a smaller count's is lifted to it
    grid = [np.maximum.accumulate(np.asarray(grid[0])).tolist()]
    log.info("quick cost profile: %d verify rounds at context %d in %.1f s", repeats, ctx, time.perf_counter() - t_start)
    return LatencyModel(
        draft_topk=topk,
        draft_step_seconds=steps,
        verify_tokens=tokens,
        verify_contexts=[ctx],
        verify_seconds=grid,
        cycle_overhead_seconds=overhead,
        model=model_name,
        drafter=drafter_name,
        repeats=repeats,
        machine=dict(machine or {}),
    )
