"""Cycles one draft step at a time, replayed from traces or run on the real models.

A *source* walks one sequence cycle by cycle and lets a caller (an RL environment, or
:func:`run_controller` with any :class:`ltd.control.Controller`) decide, step by step,
whether to draft deeper, and then how many nodes to verify:

    source.start(index)            # a new sequence
    source.begin_cycle()
    while source.can_step and <continue?>: source.step()
    outcome = source.finish(size)  # select, verify, accept, commit; moves on

:class:`ReplaySource` reads recorded trees and times cycles with a
:class:`~ltd.rl.latency.LatencyModel`; :class:`LiveSource` runs the real drafter and
target through :mod:`ltd.cycle`'s stepwise form (``begin``, draft steps, ``finish``), the
same functions :func:`ltd.cycle.decode` uses, and measures wall time. Both expose the same views of
the cycle in progress, so observations built from them are identical in kind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from ltd.control import Controller, DraftStepState
from ltd.cycle import CycleResult, begin, size_state
from ltd.cycle import finish as finish_cycle
from ltd.cycle import start as start_sequence
from ltd.errors import LtdError
from ltd.limits import check_prompt_fits
from ltd.rl.latency import LatencyModel
from ltd.rl.traces import TraceSet


@dataclass
class CycleOutcome:
    """One finished cycle."""

    position: int  # output index of the pending token before the cycle
    context_length: int
    depth: int
    drafted: int
    size: int  # drafted nodes verified
    accepted: int  # drafted tokens accepted
    tokens: int  # tokens the cycle added (accepted + bonus, cut to what the output needs)
    seconds: float
    new_tokens: tuple[int, ...] = ()

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_cycle_result(self, cycle: int = 0) -> CycleResult:
        return CycleResult(
            new_tokens=list(self.new_tokens),
            cycle=cycle,
            depth=self.depth,
            drafted=self.drafted,
            size=self.size,
            num_accepted=self.accepted,
            total_seconds=self.seconds,
        )


class CycleSource(Protocol):
    """What the environments and :func:`run_controller` need from a cycle driver."""

    latency: LatencyModel
    topk: int
    max_depth: int

    @property
    def num_sequences(self) -> int: ...
    @property
    def done(self) -> bool: ...
    @property
    def started(self) -> bool: ...
    @property
    def depth(self) -> int: ...
    @property
    def can_step(self) -> bool: ...
    @property
    def context_length(self) -> int: ...
    @property
    def committed_length(self) -> int: ...

    def start(self, index: int) -> None: ...
    def begin_cycle(self) -> None: ...
    def step(self) -> None: ...
    def candidate_scores(self) -> np.ndarray: ...
    def drafted_nodes(self) -> tuple[np.ndarray, np.ndarray]: ...
    def signals(self) -> np.ndarray | None: ...
    def step_state(self) -> DraftStepState: ...
    def charge(self, seconds: float) -> None: ...
    def charge_policy(self, kind: str, measured: float | None = None) -> None: ...
    def finish(self, size: int) -> CycleOutcome: ...


class ReplaySource:
    """Cycles replayed from recorded traces; time from a latency model.

    From position p, drafting d steps and verifying V nodes accepts L drafted tokens
    (exactly as live, see :mod:`ltd.rl.traces`) and moves to p + L + 1.

    With a ``family`` of cost tables (:func:`ltd.rl.latency.cost_family`), each sequence
    is timed by one of them, drawn at its start (seeded): ``latency`` is the current one,
    which the environments' rewards and cost observations read.
    """

    def __init__(self, traces: TraceSet, latency: LatencyModel, family: Sequence[LatencyModel] | None = None,
                 seed: int = 0) -> None:
        self.family = list(family) if family else []
        for member in self.family:
            if member.draft_topk != traces.topk:
                raise LtdError(f"a cost table of the family has topk {member.draft_topk}, the traces {traces.topk}")
        self._family_rng = np.random.default_rng(seed)
        if latency.draft_topk != traces.topk:
            raise LtdError(
                f"the latency profile was measured with topk {latency.draft_topk} but the traces use topk "
                f"{traces.topk}; re-run ltd profile --topk {traces.topk}"
            )
        self.traces = traces
        self.latency = latency
        self.topk = traces.topk
        self.max_depth = traces.max_depth
        self.max_size = traces.max_size
        self._indices = [i for i, s in enumerate(traces.sequences) if s.num_positions > 0]
        if not self._indices:
            raise LtdError("the traces hold no decision points; record more or longer outputs")
        self._seq = None
        self._p = 0
        self._depth = 0
        self._seconds = 0.0

    @property
    def num_sequences(self) -> int:
        return len(self._indices)

    @property
    def sequence_key(self) -> str:
        return self._seq.key if self._seq is not None else ""

    def start(self, index: int) -> None:
        self._seq = self.traces.sequences[self._indices[index % len(self._indices)]]
        if self.family:
            self.latency = self.family[int(self._family_rng.integers(len(self.family)))]
        self._p = 0
        self._depth = 0
        self._seconds = 0.0

    @property
    def started(self) -> bool:
        return self._seq is not None

    @property
    def done(self) -> bool:
        return self._seq is None or self._p >= self._seq.num_positions

    @property
    def position(self) -> int:
        return self._p

    def _pos(self):
        return self._seq[self._p]

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def can_step(self) -> bool:
        return self._depth < int(self._seq.arrays["depth"][self._p])

    @property
    def context_length(self) -> int:
        return int(self._seq.prompt.size) + self._p + 1

    @property
    def committed_length(self) -> int:
        return self.context_length - 1

    def begin_cycle(self) -> None:
        if self.done:
            raise RuntimeError("the sequence is finished; call start()")
        self._depth = 0
        self._seconds = 0.0

    def step(self) -> None:
        if not self.can_step:
            raise RuntimeError("draft depth limit reached")
        self._depth += 1  # its cost is part of latency.cycle_seconds at finish()

    def candidate_scores(self) -> np.ndarray:
        return self._pos().candidate_scores(self._depth)

    def drafted_nodes(self) -> tuple[np.ndarray, np.ndarray]:
        pos = self._pos()
        n = pos.nodes_up_to(self._depth)
        return pos.scores[1:n], pos.depths[1:n]

    def signals(self) -> np.ndarray | None:
        """The drafter's signals recorded at this position, once the root step is drafted."""
        return self._pos().signals if self._depth > 0 else None

    def step_state(self) -> DraftStepState:
        pos = self._pos()
        return DraftStepState(self._depth, torch.from_numpy(self.candidate_scores().copy()), self.context_length,
                              pos.tree(self._depth), self.topk, self.signals())

    def charge(self, seconds: float) -> None:
        """Replay ignores measured host time; costs come from the latency model."""

    def charge_policy(self, kind: str, measured: float | None = None) -> None:
        self._seconds += self.latency.depth_policy_seconds if kind == "depth" else self.latency.size_policy_seconds

    def finish(self, size: int) -> CycleOutcome:
        seq, p, d = self._seq, self._p, self._depth
        pos = self._pos()
        drafted = pos.drafted(d)
        if self.max_size is not None and d > 0:
            size = min(size, self.max_size)
        v = min(max(size, 0), drafted) if d > 0 else 0
        accepted = seq.accepted(p, d, v) if v > 0 else 0
        seconds = self._seconds + self.latency.cycle_seconds(d, v, self.committed_length)
        # the recorded output already ends where live decoding stopped (max tokens or EOS)
        new = tuple(int(t) for t in seq.output[p + 1 : p + 2 + accepted])
        tokens = len(new)
        self._p = p + accepted + 1
        self._depth = 0
        self._seconds = 0.0
        return CycleOutcome(p, int(seq.prompt.size) + p + 1, d, drafted, v, accepted, tokens, seconds, new)


class LiveSource:
    """Cycles of the real models (:mod:`ltd.cycle`), timed with the wall clock.

    The measured time covers the draft steps, select, verify, accept and commit, plus
    whatever callers :meth:`charge` (e.g. a rule controller's calls); the agent's own
    decisions, made outside, are charged from the latency model (:meth:`charge_policy`).
    """

    def __init__(
        self,
        target,
        drafter,
        prompts: Sequence[Sequence[int]],
        latency: LatencyModel,
        *,
        topk: int,
        max_depth: int,
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        if not prompts:
            raise LtdError("the live environment needs at least one prompt")
        if latency.draft_topk != topk:
            raise LtdError(f"the latency profile was measured with topk {latency.draft_topk}, not {topk}; re-run ltd profile --topk {topk}")
        for p in prompts:
            check_prompt_fits(p, max_new_tokens, target.max_context)
        self.target = target
        self.drafter = drafter
        self.prompts = [list(p) for p in prompts]
        self.latency = latency
        self.topk = topk
        self.max_depth = max_depth
        self.max_new_tokens = max_new_tokens
        self.eos = frozenset(int(e) for e in eos_token_ids)
        self.state = None
        self.session = None
        self._seconds = 0.0

    @property
    def num_sequences(self) -> int:
        return len(self.prompts)

    def start(self, index: int) -> None:
        self._close_session()
        self.state, _ = start_sequence(self.target, self.drafter, self.prompts[index % len(self.prompts)],
                              max_new_tokens=self.max_new_tokens, eos_token_ids=self.eos)

    def _close_session(self) -> None:
        if self.session is not None:
            self.session.finish()
            self.session = None

    @property
    def started(self) -> bool:
        return self.state is not None

    @property
    def done(self) -> bool:
        return self.state is None or self.state.done

    @property
    def position(self) -> int:
        return self.state.produced - 1

    @property
    def depth(self) -> int:
        return self.session.step_count if self.session is not None else 0

    @property
    def can_step(self) -> bool:
        return self.session is not None and self.session.can_step

    @property
    def context_length(self) -> int:
        return self.state.context_length

    @property
    def committed_length(self) -> int:
        return self.target.committed_length

    def begin_cycle(self) -> None:
        if self.done:
            raise RuntimeError("the sequence is finished; call start()")
        self._close_session()
        self.session = begin(self.state, self.topk, self.max_depth)
        self._seconds = 0.0

    def step(self) -> None:
        t0 = time.perf_counter()
        self.session.step()
        self._seconds += time.perf_counter() - t0

    def candidate_scores(self) -> np.ndarray:
        return self.session.last_scores.detach().cpu().numpy().astype(np.float32)

    def drafted_nodes(self) -> tuple[np.ndarray, np.ndarray]:
        tree = self.session.tree
        return tree.scores[1:].numpy(), tree.depths[1:].numpy()

    def signals(self) -> np.ndarray | None:
        return self.session.signals()

    def step_state(self) -> DraftStepState:
        return self.session.observe()

    def charge(self, seconds: float) -> None:
        self._seconds += seconds

    def charge_policy(self, kind: str, measured: float | None = None) -> None:
        if measured is not None:
            self._seconds += measured
        else:
            self._seconds += self.latency.depth_policy_seconds if kind == "depth" else self.latency.size_policy_seconds

    def finish(self, size: int) -> CycleOutcome:
        p, ctx = self.position, self.state.context_length
        session, self.session = self.session, None
        t0 = time.perf_counter()
        result = finish_cycle(self.state, session, size)
        seconds = self._seconds + time.perf_counter() - t0
        self._seconds = 0.0
        return CycleOutcome(p, ctx, result.depth, result.drafted, result.size, result.num_accepted,
                            len(result.new_tokens), seconds, tuple(result.new_tokens))


def is_learned(controller, kind: str, step: int = 0) -> bool:
    """Whether a controller decides ``kind`` ("depth" at draft step ``step``, or "size")
    with an LTD policy, whose calls cost time (modelled in replay, measured live)."""
    from ltd.control.learned import LTDController

    if not isinstance(controller, LTDController):
        return False
    if kind == "depth":
        return controller.asks_depth_policy(step)
    return controller.size_policy is not None


def draft_with(source: CycleSource, controller: Controller) -> None:
    """Draft the current cycle while ``controller`` says continue (as :func:`ltd.cycle.draft`)."""
    while source.can_step:
        state = source.step_state()
        t0 = time.perf_counter()
        go = controller.continue_drafting(state)
        dt = time.perf_counter() - t0
        if is_learned(controller, "depth", state.step):
            source.charge_policy("depth", dt)
        else:
            source.charge(dt)
        if not go:
            break
        source.step()


def size_with(source: CycleSource, controller: Controller) -> int:
    """The controller's verification size for the drafted tree (as :func:`ltd.cycle.run_cycle`)."""
    if source.depth == 0:
        return 0
    st = source.step_state()
    state = size_state(st.tree, st.context_length, st.topk, st.signals)
    t0 = time.perf_counter()
    size = int(controller.choose_size(state))
    dt = time.perf_counter() - t0
    if is_learned(controller, "size"):
        source.charge_policy("size", dt)
    else:
        source.charge(dt)
    return size


def run_controller(source: CycleSource, controller: Controller, index: int, max_cycles: int | None = None) -> list[CycleOutcome]:
    """Decode sequence ``index`` of ``source`` with ``controller``; one outcome per cycle.

    Controllers with an ``observe_result(CycleResult)`` method (feedback rules such as
    :class:`ltd.control.learned.HeuristicController`) are told each cycle's result.
    """
    observe = getattr(controller, "observe_result", None)
    source.start(index)
    outcomes = []
    while not source.done and (max_cycles is None or len(outcomes) < max_cycles):
        source.begin_cycle()
        draft_with(source, controller)
        outcome = source.finish(size_with(source, controller))
        outcomes.append(outcome)
        if observe is not None:
            observe(outcome.as_cycle_result(len(outcomes)))
    return outcomes
