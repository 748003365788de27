"""The speculative decoding cycle: one explicit state and five small functions.

``draft -> select -> verify -> accept -> commit``. Only :func:`draft` and :func:`verify`
touch models (through the drafter and the backend); :func:`commit` is the only place
caches change for good. :func:`decode` is the one generator that drives the cycle; the
CLI, the benchmark, the RL environments and the server all consume it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import torch

from ltd.acceptance import Accepted, SamplingConfig, accept as accept_tree, target_probs
from ltd.backends.base import Backend
from ltd.controller import Controller, DraftStepState
from ltd.drafting.base import Drafter
from ltd.errors import LtdError
from ltd.tree import Selection, Tree, select as select_tree


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
    target, not yet processed by it, and the root of the next draft tree.
    """

    target: Backend
    drafter: Drafter
    tokens: list[int]
    prompt_length: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generator: torch.Generator | None = None
    listeners: Sequence[CommitListener] = ()

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
) -> tuple[DecodeState, CycleResult]:
    """Prefill the prompt and choose the first token (cycle 0)."""
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
    state = DecodeState(target, drafter, prompt + [first], len(prompt), sampling, generator, tuple(listeners))
    drafter.sync(state.tokens, out.features)
    for listener in state.listeners:
        listener.on_commit(prompt, out.logits, out.features)
    return state, CycleResult(new_tokens=[first], cycle=0, total_seconds=time.perf_counter() - t0)


def _choose(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    if sampling.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(target_probs(logits, sampling), 1, generator=generator))


class DraftSession:
    """Tree expansion one step at a time.

    Step 1 proposes the root's top-k children; each later step expands the current
    frontier (k nodes) into k*k candidates, all kept in the tree, of which the k best by
    cumulative log-probability form the next frontier (EAGLE-2 dynamic tree). The cycle
    drives it with a controller; the live RL environment drives it with agent actions.
    """

    def __init__(self, state: DecodeState, topk: int, max_depth: int) -> None:
        self.state = state
        self.topk = topk
        self.max_depth = max_depth
        self.tree = Tree.root(state.pending)
        self.frontier = torch.empty(0, dtype=torch.long)
        self.last_scores = torch.empty(0)
        self.step_count = 0
        self.step_seconds: list[float] = []
        self._open = False

    @property
    def can_step(self) -> bool:
        return self.step_count < self.max_depth

    def observe(self) -> DraftStepState:
        return DraftStepState(self.step_count, self.last_scores, self.state.context_length, self.tree, self.topk)

    def step(self) -> None:
        """One drafter forward: add one level of candidates to the tree."""
        if not self.can_step:
            raise RuntimeError("draft depth limit reached")
        t0 = time.perf_counter()
        drafter = self.state.drafter
        self._open = True
        if self.step_count == 0:
            tokens, logp = drafter.root(self.tree, self.topk)
            self.frontier = self.tree.add(tokens, torch.zeros_like(tokens), logp)
            self.last_scores = logp
        else:
            ctok, clp = drafter.expand(self.tree, self.frontier, self.topk)  # [f, k]
            cum = self.tree.scores[self.frontier].unsqueeze(1) + clp
            parents = self.frontier.unsqueeze(1).expand_as(ctok)
            added = self.tree.add(ctok, parents, cum)
            keep = torch.topk(cum.reshape(-1), min(self.topk, cum.numel())).indices
            self.frontier = added[keep]
            self.last_scores = cum.reshape(-1)
        self.step_count += 1
        self.step_seconds.append(time.perf_counter() - t0)

    def finish(self) -> Tree:
        """Release the drafter's speculative state and return the tree."""
        if self._open:
            self.state.drafter.end()
            self._open = False
        return self.tree


def draft(state: DecodeState, controller: Controller, topk: int, max_depth: int) -> Tree:
    """Expand a draft tree step by step while the controller says continue."""
    session = DraftSession(state, topk, max_depth)
    try:
        while session.can_step and controller.continue_drafting(session.observe()):
            session.step()
    finally:
        tree = session.finish()
    return tree


def select(tree: Tree, size: int) -> Selection:
    """The root plus the best ``size`` nodes, closed under parents."""
    return select_tree(tree, size)


def verify(state: DecodeState, selection: Selection) -> Verified:
    """One target forward over the selected tree (root = pending token)."""
    if state.target.speculative_length:
        raise RuntimeError("target has uncommitted speculative entries")
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
    sub = verified.selection.tree
    state.target.commit(accepted.path)
    new = [int(sub.tokens[i]) for i in accepted.path[1:]] + [accepted.bonus]
    state.tokens.extend(new)
    feats = verified.features[accepted.path] if verified.features is not None else None
    state.drafter.sync(state.tokens, feats)
    if state.listeners:
        processed = [int(sub.tokens[i]) for i in accepted.path]
        logits = verified.logits[accepted.path]
        for listener in state.listeners:
            listener.on_commit(processed, logits, feats)
    return new


def run_cycle(state: DecodeState, controller: Controller, topk: int, cycle: int) -> CycleResult:
    """draft -> select -> verify -> accept -> commit, timed."""
    t0 = time.perf_counter()
    # Leave room in the context for the root and the deepest drafted node.
    room = state.target.max_context - state.target.committed_length - 1
    tree = draft(state, controller, topk, max_depth=room)
    t1 = time.perf_counter()
    step_state = DraftStepState(tree.max_depth, torch.empty(0), state.context_length, tree, topk)
    size = controller.choose_size(step_state) if tree.num_drafted else 0
    selection = select(tree, size)
    verified = verify(state, selection)
    accepted = accept(state, verified)
    new = commit(state, verified, accepted)
    t2 = time.perf_counter()
    result = CycleResult(
        new_tokens=new,
        cycle=cycle,
        depth=tree.max_depth,
        drafted=tree.num_drafted,
        size=selection.tree.num_drafted,
        num_accepted=accepted.num_accepted,
        draft_seconds=t1 - t0,
        verify_seconds=t2 - t1,
        total_seconds=t2 - t0,
    )
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
    if max_new_tokens < 1:
        raise LtdError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > target.max_context:
        raise LtdError(
            f"prompt ({len(prompt)} tokens) + max-new-tokens ({max_new_tokens}) exceeds the model's context of "
            f"{target.max_context}; shorten the prompt or lower --max-new-tokens"
        )
    eos = set(int(e) for e in eos_token_ids)
    state, first = start(target, drafter, prompt, sampling, seed, listeners)
    produced = 0
    result = first
    cycle = 0
    while True:
        room = max_new_tokens - produced
        cut = result.new_tokens[:room]
        for i, tok in enumerate(cut):
            if tok in eos:
                cut = cut[: i + 1]
                break
        produced += len(cut)
        done = produced >= max_new_tokens or (cut and cut[-1] in eos)
        result.new_tokens = cut
        yield result
        if done:
            return
        cycle += 1
        result = run_cycle(state, controller, topk, cycle)
