"""Greedy expected-throughput control from the machine's measured costs (CaDDTree-style).

A drafted node's cumulative score is a log-probability on one calibrated scale (the
EAGLE-3 head's; the n-gram and suffix drafters are calibrated to it), so ``exp(score)``
is taken as the probability that the node is accepted. A cycle that verifies the V best
nodes then yields ``1 + sum of their probabilities`` tokens on average (the bonus token
plus the expected accepted length) and costs, by the measured cost table
(:class:`ltd.control.costs.LatencyModel`), the draft steps so far plus one forward over
V + 1 tokens plus the per-cycle overhead; V = 0 is a plain step. The controller keeps
the V with the most expected tokens per second, and drafts one more level only while
that could still raise the best ratio.

Where verification is nearly linear in tokens (llama.cpp with SmolLM2: 9 tokens cost
~83 ms against 15 ms for one), only long confident chains beat a plain step, so this
mostly chooses V = 0; where it is flat (a wide CPU or GPU), it verifies bushy trees.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ltd.control.base import MAX_DEPTH, MAX_SIZE, ControllerBase, validate_static
from ltd.control.costs import LatencyModel
from ltd.controller import DraftStepState
from ltd.defaults import DEFAULT_TOPK
from ltd.errors import LtdError


def best_size(
    probs: np.ndarray, draft_seconds: float, verify: np.ndarray, overhead: float, base_tokens: float = 0.0
) -> tuple[int, float]:
    """The verification size V with the most expected tokens per modelled second.

    ``probs`` are acceptance probabilities sorted in decreasing order; ``verify[i]`` is
    the cost of a forward over ``i + 1`` tokens (at least ``len(probs) + 1`` entries).
    ``base_tokens`` are tokens the same forward yields anyway (the other sequences of a
    batch; ``verify`` then starts after their rows), so V maximises the whole batch's
    tokens per second. Returns (V, its expected tokens per second); on a tie the smaller V.
    """
    n = probs.size
    tokens = base_tokens + 1.0 + np.concatenate(([0.0], np.cumsum(probs)))
    seconds = draft_seconds + verify[: n + 1] + overhead
    ratio = tokens / seconds
    v = int(np.argmax(ratio))
    return v, float(ratio[v])


def node_probs(tree) -> np.ndarray:
    """Acceptance probabilities of a tree's drafted nodes, decreasing (padding left out)."""
    scores = tree.scores[1:]
    scores = scores[torch.isfinite(scores)]
    if scores.numel() == 0:
        return np.zeros(0)
    probs = np.exp(scores.double().numpy())
    return -np.sort(-probs)[:MAX_SIZE]


class ThroughputController(ControllerBase):
    """Drafting depth and verification size that maximise expected tokens per second.

    Each cycle:

    - **Size**: V = argmax over 0..drafted of ``(1 + sum of the V best probabilities) /
      (draft seconds + verify(V + 1) + overhead)`` (:func:`best_size`); V = 0 decodes
      plainly (the root alone).
    - **Depth**: before each draft step, the best ratio now is compared with an upper
      bound on the ratio after one more level: a frontier node's children share at most
      its own probability, so the bound adds, for every frontier node (the root before
      the first step), one child as likely as the node itself, at the cost of one more
      draft step. Drafting stops when even that bound does not beat the best ratio now.
    - **History**: the bound is optimistic, so on a backend where drafting rarely pays,
      the controller would still spend a draft step (and a verification) every cycle.
      After each cycle that drafted, it scores the cycle by its tokens per modelled
      second in units of a plain step's (above 1: drafting paid) and keeps a running
      average. When the average falls below 1, it decodes plainly without drafting for a
      pause of 1 cycle, then drafts again to probe; each probe that does not pay doubles
      the pause (up to ``max_pause`` cycles), a probe that pays resets it. So a stretch of
      prose on a linear-cost backend costs one probe every ``max_pause`` tokens, and a
      copy-heavy stretch is found again within that many tokens.

    - **Load**: in a batch (:mod:`ltd.batching`, :meth:`bind_load`) one forward verifies
      every sequence's nodes, so V maximises the batch's tokens per second: the other
      sequences' rows (those already queued, the batch's recent mean for each still
      drafting) come before
      this one's on the cost curve, and their tokens (the batch's recent mean per
      cycle) are counted in, and so is the time the other lanes spend on their own work
      (drafting, acceptance: the lanes take turns, so a batch's cycle lasts all of it
      plus the forward). As the batch grows, the rows a draft adds cost more than
      they bring, and V shrinks, down to 0.

    ``costs`` is the machine's cost table: the engine's quick profile (measured once per
    machine and cached) or a full ``ltd profile`` file. The decisions use modelled
    seconds only, never the wall clock, so they are reproducible.
    """

    def __init__(self, costs: LatencyModel, *, topk: int = DEFAULT_TOPK, max_depth: int = 32, max_pause: int = 16,
                 smoothing: float = 0.3) -> None:
        validate_static(min(max_depth, MAX_DEPTH), topk, 1)
        if max_depth < 1 or max_pause < 1 or not 0.0 < smoothing <= 1.0:
            raise LtdError("the greedy controller needs max_depth >= 1, max_pause >= 1 and 0 < smoothing <= 1")
        if not costs.draft_step_seconds:
            raise LtdError("the cost profile has no draft steps (measured without a drafter); re-run ltd profile --drafter ...")
        self.costs = costs
        self.topk = topk
        self.max_depth = max_depth
        self.max_pause = max_pause
        self.smoothing = smoothing
        self._curve = np.zeros(0)
        self._curve_context = -1
        self._load: Callable[[], object] | None = None
        self.reset()

    def bind_load(self, probe: Callable[[], object]) -> None:
        """Decide as one sequence of a batch: ``probe()`` returns its current
        :class:`ltd.backends.packed.BatchLoad`."""
        self._load = probe

    def reset(self) -> None:
        """Start a new sequence: forget the history."""
        self.gain: float | None = None  # running tokens per modelled second of drafting cycles, in plain steps
        self.pause = 0  # cycles left to decode without drafting
        self.backoff = 1  # the next pause
        self._context = 0

    # -- the cost model ------------------------------------------------------------------
    def _verify(self, tokens: int, context: int) -> np.ndarray:
        """Verification costs of 1..``tokens`` tokens (cached; a few tokens of context drift do not matter)."""
        if self._curve.size < tokens or abs(context - self._curve_context) > 16:
            self._curve = self.costs.verify_curve(max(tokens, 2 * self._curve.size, 64), context)
            self._curve_context = context
        return self._curve

    def _others(self, context: int) -> tuple[int, float, int, float]:
        """(rows, tokens, context, seconds) of this cycle that are the other sequences' of
        the batch: (0, 0, context, 0) alone. Every row then attends over all the batch's
        cache entries (masked), which is the context the cost curve needs; the seconds
        are the others' own work between forwards (drafting, acceptance), which the lanes
        do one at a time, so a cycle of the batch lasts all of it plus the forward."""
        if self._load is None:
            return 0, 0.0, context, 0.0
        load = self._load()
        others = load.active - 1
        if others <= 0:
            return 0, 0.0, context, 0.0
        # the lanes still drafting will ask for what lanes asked for lately, not for one row:
        # each lane assuming the others stay plain would have all of them draft at once
        rows = load.queued_rows + round(max(others - load.queued, 0) * max(load.mean_rows, 1.0))
        return rows, others * load.mean_tokens, max(context, load.slots), others * load.mean_work_seconds

    def _best(self, probs: np.ndarray, draft_seconds: float, others: tuple[int, float, int, float]) -> tuple[int, float]:
        rows, tokens, context, busy = others
        verify = self._verify(rows + probs.size + 1, context)[rows:]
        return best_size(probs, busy + draft_seconds, verify, self.costs.cycle_overhead_seconds, tokens)

    # -- acceptance chances (experiments/acceptance_calibration.py overrides these) -------
    def _node_probs(self, state: DraftStepState) -> np.ndarray:
        """The drafted nodes' acceptance chances, in the order verification takes them."""
        return node_probs(state.tree)

    def _frontier_probs(self, scores: np.ndarray, state: DraftStepState) -> np.ndarray:
        """The chances of the frontier nodes with cumulative ``scores`` (a child is never
        likelier than its parent, which bounds the next level)."""
        return np.exp(scores)

    # -- the controller protocol ---------------------------------------------------------
    def continue_drafting(self, state: DraftStepState) -> bool:
        step, context = state.step, state.context_length
        if step >= self.max_depth:
            return False
        if step == 0:
            if context < self._context:  # a shorter context: a new sequence
                self.reset()
            self._context = context
            if self.pause > 0:
                return False
            probs, frontier = np.zeros(0), np.ones(1)  # the root: its best child may be certain
        else:
            cand = state.candidate_scores
            cand = cand[torch.isfinite(cand)]
            if cand.numel() == 0:
                return False  # the drafter has nothing below this level
            probs = self._node_probs(state)
            frontier = self._frontier_probs(torch.topk(cand, min(self.topk, cand.numel())).values.double().numpy(), state)
        drafted = self.costs.draft_seconds(step)
        others = self._others(context)
        _, now = self._best(probs, drafted, others)
        bound_probs = -np.sort(-np.concatenate([probs, frontier]))[:MAX_SIZE]
        _, bound = self._best(bound_probs, drafted + self.costs.draft_step(step), others)
        return bound > now * (1.0 + 1e-9)

    def choose_size(self, state: DraftStepState) -> int:
        others = self._others(state.context_length)
        v, _ = self._best(self._node_probs(state), self.costs.draft_seconds(state.step), others)
        return v

    def observe_result(self, result) -> None:
        """Score a drafting cycle against a plain step; pause drafting while it does not pay."""
        if result.depth <= 0:
            self.pause = max(self.pause - 1, 0)
            return
        rows, tokens, context, busy = self._others(self._context)
        if rows:  # in a batch: the batch's tokens per second against its plain step's
            verify = self._verify(rows + result.size + 1, context)
            overhead = busy + self.costs.cycle_overhead_seconds
            modelled = self.costs.draft_seconds(result.depth) + verify[rows + result.size] + overhead
            paid = (tokens + result.num_accepted + 1) / modelled * (verify[rows] + overhead) / (tokens + 1)
        else:
            modelled = self.costs.cycle_seconds(result.depth, result.size, context)
            paid = (result.num_accepted + 1) * self.costs.ar_seconds(context) / modelled
        self.gain = paid if self.gain is None else (1 - self.smoothing) * self.gain + self.smoothing * paid
        if self.gain < 1.0:
            self.pause, self.backoff = self.backoff, min(2 * self.backoff, self.max_pause)
            self.gain = None  # the probe after the pause is judged on its own
        elif paid >= 1.0:
            self.backoff = 1

