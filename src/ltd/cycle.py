"""The speculative decoding cycle: one explicit state and five small functions.

``draft -> select -> verify -> accept -> commit``. Only :func:`draft` and :func:`verify`
touch models (through the drafter and the backend); :func:`commit` is the only place
caches change for good.

Every caller drives the cycle through the same stepwise form, so the rules about what a
cycle commits and where output stops live here once::

    state, first = start(target, drafter, prompt, max_new_tokens=..., eos_token_ids=...)
    while not state.done:
        session = begin(state, topk)          # room formula: how deep a draft may go
        while session.can_step and <continue?>:
            session.step()                    # one draft step
        result = finish(state, session, size) # select, verify, accept, commit, EOS/max cut

:func:`decode` (CLI, benchmark, server) asks a controller at each ``<continue?>`` and for
the size; the RL live environments ask an agent; the profiler passes a ``timer`` to time
each stage; the trace recorder uses :func:`begin` and the draft steps alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator, Protocol, Sequence

import numpy as np
import torch

from ltd.acceptance import Accepted, SamplingConfig, accept as accept_tree, target_probs
from ltd.backends.base import Backend
from ltd.controller import Controller, DraftStepState, depth_limit
from ltd.drafting.base import Drafter, NullDrafter
from ltd.drafting.suffix import drafter_signals
from ltd.errors import LtdError
from ltd.limits import check_prompt_fits
from ltd.tree import Selection, Tree, select as select_tree


StageTimer = Callable[[str, float], None]
"""A timing hook: called with a stage name (``draft``, ``select``, ``verify``, ``accept``,
``commit``) and the seconds that stage took. The profiler passes one; decoding passes none."""


class StageTimes(dict):
    """A :data:`StageTimer` that sums the seconds of each stage: ``times["verify"]``."""

    def __call__(self, stage: str, seconds: float) -> None:
        self[stage] = self.get(stage, 0.0) + seconds


class CommitListener(Protocol):
    """Told about every token the target processed and committed (prefill included).

    ``tokens`` are the committed tokens the target just processed (in order), ``logits``
    the target's next-token logits after each of them, ``features`` its hidden features
    there (None when the drafter needs none). This is the free training signal that
    online drafter adaptation learns from; listeners run inside the timed cycle.
    """

    def on_commit(self, tokens: list[int], logits: torch.Tensor, features: torch.Tensor | None) -> None: ...


@dataclass
class DecodeState:
    """Everything the cycle knows about one sequence.

    ``tokens`` is prompt + generated text; its last token is *pending*: chosen by the
    target, not yet processed by it, and the root of the next draft tree. ``produced``
    counts the output tokens handed out so far (after the cut to ``max_new_tokens`` and
    the first end-of-sequence token); ``done`` says the output is complete.
    """

    target: Backend
    drafter: Drafter
    tokens: list[int]
    prompt_length: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generator: torch.Generator | None = None
    listeners: Sequence[CommitListener] = ()
    max_new_tokens: int | None = None  # None: no limit but the context
    eos_token_ids: frozenset[int] = frozenset()
    produced: int = 0
    done: bool = False
    cycles: int = 0  # cycles finished since the prefill

    @property
    def pending(self) -> int:
        return self.tokens[-1]

    @property
    def context_length(self) -> int:
        return len(self.tokens)


@dataclass
class Verified:
    """The target's verdict on a selected tree."""

    selection: Selection
    logits: torch.Tensor  # [n, vocab]
    features: torch.Tensor | None  # [n, F]
    exact: torch.Tensor | None = None  # [n] bool, see TreeOutput.exact


@dataclass
class CycleResult:
    """What one cycle (or the prefill, cycle 0) produced, with its timings."""

    new_tokens: list[int]
    cycle: int
    depth: int = 0
    drafted: int = 0
    size: int = 0
    num_accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0


def start(
    target: Backend,
    drafter: Drafter,
    prompt: Sequence[int],
    sampling: SamplingConfig | None = None,
    seed: int | None = None,
    listeners: Sequence[CommitListener] = (),
    max_new_tokens: int | None = None,
    eos_token_ids: Collection[int] = (),
) -> tuple[DecodeState, CycleResult]:
    """Prefill the prompt and choose the first token (cycle 0).

    With ``max_new_tokens`` and ``eos_token_ids`` the state stops the output there (see
    :func:`finish`); the first token already counts.
    """
    t0 = time.perf_counter()
    sampling = sampling or SamplingConfig()
    prompt = list(prompt)
    if not prompt:
        raise LtdError("the prompt is empty; give some text with --prompt")
    if len(prompt) + 1 > target.max_context:
        raise LtdError(
            f"the prompt has {len(prompt)} tokens but the model's context is {target.max_context}; shorten the prompt"
        )
    generator = None
    if not sampling.greedy:
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else torch.seed() % (2**63))
    target.reset()
    drafter.reset()
    # Listeners learn from every prompt position's logits; otherwise only the last is needed.
    out = target.score(prompt, list(range(-1, len(prompt) - 1)), drafter.feature_layers, last_only=not listeners)
    target.commit(list(range(len(prompt))))
    first = _choose(out.logits[-1], sampling, generator)
    state = DecodeState(
        target, drafter, prompt + [first], len(prompt), sampling, generator, tuple(listeners),
        max_new_tokens=max_new_tokens, eos_token_ids=frozenset(int(e) for e in eos_token_ids),
    )
    drafter.sync(state.tokens, out.features)
    for listener in state.listeners:
        listener.on_commit(prompt, out.logits, out.features)
    first_tokens = emit(state, [first])
    return state, CycleResult(new_tokens=first_tokens, cycle=0, total_seconds=time.perf_counter() - t0)


def _choose(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    if sampling.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(target_probs(logits, sampling), 1, generator=generator))


_NO_NODES = torch.empty(0, dtype=torch.long)  # shared by every session before its first step:
_NO_SCORES = torch.empty(0)  # empty, so nothing can change them in place


class DraftSession:
    """Tree expansion one step at a time.

    Step 1 proposes the root's top-k children; each later step expands the current
    frontier (k nodes) into k*k candidates, all kept in the tree, of which the k best by
    cumulative log-probability (ties: the earlier candidate) form the next frontier
    (EAGLE-2 dynamic tree). The cycle drives it with a controller; the live RL
    environment drives it with agent actions.

    With ``whole`` and a drafter that knows its whole tree after the root
    (:class:`ltd.drafting.base.WholeTreeDrafter`, e.g. the suffix drafter), step 1 adds
    that whole tree at once, at most ``max_depth`` deep and shaped by the same rule, and
    the session is complete: ``step_count`` becomes the tree's depth and ``step_seconds``
    holds the step's time first and zeros for the levels it added for free.
    """

    def __init__(
        self, state: DecodeState, topk: int, max_depth: int, timer: StageTimer | None = None, whole: bool = False
    ) -> None:
        self.state = state
        self.timer = timer
        self.topk = topk
        self.max_depth = max_depth
        self.whole = whole
        self._tree: Tree | None = None  # built on first use: a cycle that drafts nothing never needs it
        self.frontier = _NO_NODES  # replaced (never changed in place) by each step
        self.last_scores = _NO_SCORES
        self.step_count = 0
        self.step_seconds: list[float] = []
        self._open = False
        self._complete = False  # the whole tree was added: nothing is left to draft

    @property
    def can_step(self) -> bool:
        return not self._complete and self.step_count < self.max_depth

    @property
    def tree(self) -> Tree:
        """The tree drafted so far: the root alone until the first step."""
        if self._tree is None:
            self._tree = Tree.root(self.state.pending)
        return self._tree

    @property
    def drafted(self) -> int:
        """Drafted nodes so far, without building a tree when there are none."""
        return self._tree.num_drafted if self._tree is not None else 0

    def observe(self) -> DraftStepState:
        return DraftStepState(self.step_count, self.last_scores, self.state.context_length, self.tree, self.topk, self.signals())

    def signals(self):
        """The drafter's signals of this cycle (:func:`ltd.drafting.suffix.drafter_signals`), once the root step ran."""
        return drafter_signals(self.state.drafter) if self.step_count > 0 else None

    def step(self) -> None:
        """One drafter forward: add one level of candidates to the tree."""
        if not self.can_step:
            raise RuntimeError("draft depth limit reached")
        t0 = time.perf_counter()
        drafter = self.state.drafter
        self._open = True
        if self.step_count == 0 and self.whole and hasattr(drafter, "draft_tree"):
            self._step_whole(drafter, t0)
            return
        if self.step_count == 0:
            tokens, logp = drafter.root(self.tree, self.topk)
            self.frontier = self.tree.add(tokens, torch.zeros_like(tokens), logp)
            self.last_scores = logp
        else:
            ctok, clp = drafter.expand(self.tree, self.frontier, self.topk)  # [f, k]
            cum = self.tree.scores[self.frontier].unsqueeze(1) + clp
            parents = self.frontier.unsqueeze(1).expand_as(ctok)
            added = self.tree.add(ctok, parents, cum)
            # the k best; a stable sort keeps ties in candidate order (beam_flatten's rule)
            keep = torch.argsort(cum.reshape(-1), descending=True, stable=True)[: self.topk]
            self.frontier = added[keep]
            self.last_scores = cum.reshape(-1)
        self.step_count += 1
        self._timed(t0, 1)

    def _step_whole(self, drafter, t0: float) -> None:
        """The drafter's whole tree in one :meth:`~ltd.tree.Tree.add_subtree`."""
        draft = drafter.draft_tree(self.topk, self.max_depth)
        depth = draft.depth
        if depth:
            added = self.tree.add_subtree(draft.tokens, draft.parents, draft.scores, draft.depths)
            deepest = np.nonzero(draft.depths == depth)[0]  # numpy: a torch boolean index costs more than the rest
            self.frontier = added[torch.from_numpy(deepest)]
            self.last_scores = torch.from_numpy(draft.scores[deepest])
        self.step_count = max(depth, 1)  # one step that found nothing still counts as one
        self._complete = True
        self._timed(t0, self.step_count)

    def _timed(self, t0: float, levels: int) -> None:
        """Record a step's time; the levels after its first one came free."""
        seconds = time.perf_counter() - t0
        self.step_seconds.append(seconds)
        self.step_seconds.extend([0.0] * (levels - 1))
        if self.timer is not None:
            self.timer("draft", seconds)

    def release(self) -> None:
        """Release the drafter's speculative state (idempotent)."""
        if self._open:
            self.state.drafter.end()
            self._open = False

    def finish(self) -> Tree:
        """Release the drafter's speculative state and return the tree (idempotent)."""
        self.release()
        return self.tree


def draft_room(state: DecodeState) -> int:
    """Draft levels that fit the context: the root and the deepest drafted node need a
    position each after the committed context (``context_length - 1`` tokens)."""
    return state.target.max_context - state.context_length


def begin(
    state: DecodeState, topk: int, max_depth: int | None = None, timer: StageTimer | None = None, whole: bool = False
) -> DraftSession:
    """Open a cycle: a draft session at most ``max_depth`` levels deep (default: as deep as
    the context allows); ``whole``: a drafter that can draft its whole tree at once does
    (see :class:`DraftSession`)."""
    room = draft_room(state)
    depth = room if max_depth is None else min(max_depth, room)
    return DraftSession(state, topk, max(0, depth), timer, whole)


def draft(session: DraftSession, controller: Controller) -> Tree:
    """Draft step by step while the controller says continue; returns the finished tree."""
    _draft(session, controller)
    return session.tree


def _draft(session: DraftSession, controller: Controller) -> None:
    """:func:`draft` without handing out the tree (which builds one even when nothing was drafted)."""
    try:
        while session.can_step and controller.continue_drafting(session.observe()):
            session.step()
    finally:
        session.release()


def size_state(tree: Tree, context_length: int, topk: int, signals=None) -> DraftStepState:
    """What a controller sees when it chooses the verification size of a drafted tree."""
    return DraftStepState(tree.max_depth, torch.empty(0), context_length, tree, topk, signals)


def select(tree: Tree, size: int) -> Selection:
    """The root plus the best ``size`` nodes, closed under parents."""
    return select_tree(tree, size)


def _require_committed(target) -> None:
    """A verify must start from a committed cache: leftover tree entries mean a missed commit."""
    if target.speculative_length:
        raise RuntimeError("target has uncommitted speculative entries")


def verify(state: DecodeState, selection: Selection) -> Verified:
    """One target forward over the selected tree (root = pending token)."""
    _require_committed(state.target)
    sub = selection.tree
    out = state.target.score(sub.tokens, sub.parents, state.drafter.feature_layers)
    return Verified(selection=selection, logits=out.logits, features=out.features, exact=out.exact)


def accept(state: DecodeState, verified: Verified) -> Accepted:
    """The longest root path the target agrees with, plus its bonus token.

    Greedy, on a backend that marks which logits equal plain decoding's bit for bit
    (``Verified.exact``), the path stops before the first node that is not exact: that
    node's token is still the argmax of its (exact) parent's logits, so it becomes the
    bonus, and every emitted token is the one plain greedy decoding would choose.
    """
    acc = accept_tree(verified.selection.tree, verified.logits, state.sampling, state.generator)
    if verified.exact is not None and state.sampling.greedy:
        exact = verified.exact.tolist()
        for t in range(1, len(acc.path)):
            if not exact[acc.path[t]]:
                return Accepted(path=acc.path[:t], bonus=int(verified.selection.tree.tokens[acc.path[t]]))
    return acc


def commit(state: DecodeState, verified: Verified, accepted: Accepted) -> list[int]:
    """Keep the accepted path in the target cache, extend the sequence, tell the drafter.

    Returns the tokens this cycle added (accepted drafted tokens, then the bonus).
    """
    tokens = verified.selection.tree.tokens.tolist()
    feats = verified.features[accepted.path] if verified.features is not None else None
    logits = verified.logits[accepted.path] if state.listeners else None
    return _commit_path(state, accepted.path, [tokens[i] for i in accepted.path], accepted.bonus, logits, feats)


def _commit_path(
    state: DecodeState,
    path: list[int],
    processed: list[int],
    bonus: int,
    logits: torch.Tensor | None,
    features: torch.Tensor | None,
) -> list[int]:
    """:func:`commit` given the accepted ``path`` of speculative entries, the tokens
    there (``processed``, root first) and their logits and features (listeners, drafter)."""
    state.target.commit(path)
    new = processed[1:] + [bonus]
    state.tokens.extend(new)
    state.drafter.sync(state.tokens, features)
    for listener in state.listeners:
        listener.on_commit(processed, logits, features)
    return new


def _root_cycle(state: DecodeState, timer: StageTimer | None) -> list[int]:
    """Verify, accept and commit a tree of the root alone: one token through the target.

    The rules of :func:`verify`, :func:`accept` and :func:`commit` on a one-node tree (the
    root is always accepted, the bonus is the target's choice from its logits) without
    building a selection, walking a tree or copying logits a greedy choice does not need
    (:meth:`~ltd.backends.base.Backend.score_next`). This is every cycle when nothing is
    drafted, so it is what plain decoding through the cycle costs.
    """
    target, pending = state.target, state.pending
    _require_committed(target)
    t0 = time.perf_counter()
    layers = state.drafter.feature_layers
    if state.sampling.greedy and layers is None and not state.listeners:
        bonus, logits, feats = target.score_next(pending), None, None
    else:
        out = target.score([pending], [-1], layers)
        bonus, logits, feats = _choose(out.logits[0], state.sampling, state.generator), out.logits, out.features
    t1 = time.perf_counter()
    new = _commit_path(state, [0], [pending], bonus, logits, feats)
    if timer is not None:
        for stage, seconds in (("select", 0.0), ("verify", t1 - t0), ("accept", 0.0), ("commit", time.perf_counter() - t1)):
            timer(stage, seconds)
    return new


def emit(state: DecodeState, new: Sequence[int]) -> list[int]:
    """The output cut: the part of a cycle's ``new`` tokens that the output keeps.

    Keeps at most ``max_new_tokens - produced`` tokens, up to and including the first
    end-of-sequence token (kept, like transformers' ``generate``), and marks the state
    done when either limit is reached or the context has no room for another cycle.
    """
    cut = list(new)
    if state.max_new_tokens is not None:
        cut = cut[: max(state.max_new_tokens - state.produced, 0)]
    for i, tok in enumerate(cut):
        if tok in state.eos_token_ids:
            cut = cut[: i + 1]
            state.done = True
            break
    state.produced += len(cut)
    if state.max_new_tokens is not None and state.produced >= state.max_new_tokens:
        state.done = True
    if draft_room(state) < 1:
        state.done = True
    return cut


def finish(state: DecodeState, session: DraftSession, size: int, timer: StageTimer | None = None) -> CycleResult:
    """Close a cycle: select ``size`` drafted nodes, verify, accept, commit, cut the output.

    The result's ``new_tokens`` are the tokens the output keeps (see :func:`emit`);
    ``verify_seconds`` and ``total_seconds`` cover this call, ``draft_seconds`` the
    session's draft steps. ``timer`` (if given) is told each stage's seconds. With
    nothing to verify but the root (nothing drafted, or ``size`` 0) the stages run as
    one token through the target (:func:`_root_cycle`).
    """
    t0 = time.perf_counter()
    session.release()
    drafted = session.drafted
    size = max(int(size), 0) if drafted else 0
    if size == 0:
        new, selected, num_accepted = _root_cycle(state, timer), 0, 0
    else:
        t1 = time.perf_counter()
        selection = select(session.tree, size)
        t2 = time.perf_counter()
        verified = verify(state, selection)
        t3 = time.perf_counter()
        accepted = accept(state, verified)
        t4 = time.perf_counter()
        new = commit(state, verified, accepted)
        t5 = time.perf_counter()
        if timer is not None:
            for stage, seconds in (("select", t2 - t1), ("verify", t3 - t2), ("accept", t4 - t3), ("commit", t5 - t4)):
                timer(stage, seconds)
        selected, num_accepted = selection.tree.num_drafted, accepted.num_accepted
    state.cycles += 1
    draft_seconds = sum(session.step_seconds)
    seconds = time.perf_counter() - t0
    return CycleResult(
        new_tokens=emit(state, new),
        cycle=state.cycles,
        depth=session.tree.max_depth if drafted else 0,
        drafted=drafted,
        size=selected,
        num_accepted=num_accepted,
        draft_seconds=draft_seconds,
        verify_seconds=seconds,
        total_seconds=draft_seconds + seconds,
    )


def run_cycle(state: DecodeState, controller: Controller, topk: int) -> CycleResult:
    """One controller-driven cycle: draft, choose the size, finish; timed."""
    t0 = time.perf_counter()
    # a whole-tree drafter adds every level in one step, so the controller's own depth
    # cap (a static tree's D) bounds the session instead of its per-level answers
    session = begin(state, topk, depth_limit(controller), whole=True)
    if not isinstance(state.drafter, NullDrafter):  # it cannot draft: nothing to ask the controller
        _draft(session, controller)
    t1 = time.perf_counter()
    size = controller.choose_size(size_state(session.tree, state.context_length, topk, session.signals())) if session.drafted else 0
    result = finish(state, session, size)
    t2 = time.perf_counter()
    result.draft_seconds = t1 - t0
    result.verify_seconds = t2 - t1
    result.total_seconds = t2 - t0
    controller.observe_result(result)
    return result


def decode(
    target: Backend,
    drafter: Drafter,
    controller: Controller,
    prompt: Sequence[int],
    max_new_tokens: int,
    topk: int = 8,
    sampling: SamplingConfig | None = None,
    eos_token_ids: Sequence[int] = (),
    seed: int | None = None,
    listeners: Sequence[CommitListener] = (),
) -> Iterator[CycleResult]:
    """Yield one :class:`CycleResult` per cycle (prefill first) until done.

    Stops after ``max_new_tokens`` tokens (the last cycle's tokens are cut to fit), at
    an end-of-sequence token (kept, like transformers' ``generate``), or when the
    context is full.
    """
    check_prompt_fits(prompt, max_new_tokens, target.max_context)
    state, result = start(target, drafter, prompt, sampling, seed, listeners, max_new_tokens, eos_token_ids)
    yield result
    while not state.done:
        yield run_cycle(state, controller, topk)
