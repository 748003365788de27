"""The cycle's stepwise form, its commit and its output cut, exercised directly.

``decode``, the RL live source, the profiler and the trace recorder all drive the cycle
through ``start``, ``begin``, draft steps and ``finish``; these tests pin what those
functions do on their own: the commit keeps exactly the accepted path in the target's
cache (also when that path is not a prefix of the verified nodes), ``emit`` cuts output
at the first end-of-sequence token and at ``max_new_tokens``, and a hand-driven loop of
the steps equals ``decode``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import TINY_MAX_POS, assert_same_tokens, hf_greedy, run_decode, run_general_stages
from ltd.acceptance import Accepted
from ltd.backends.hf import HFBackend
from ltd.control import StaticController
from ltd.cycle import (
    DecodeState,
    StageTimes,
    begin,
    commit,
    draft_room,
    emit,
    finish,
    select,
    start,
    verify,
)
from ltd.drafting.base import NullDrafter
from ltd.drafting.lm import LMDrafter
from ltd.tree import Tree

PROMPT = [3, 17, 42, 8, 77, 5, 23, 61, 9]
MAX_NEW = 24


def _branchy_tree(pending: int) -> Tree:
    """root -> a, root -> b, b -> c: the path root, b, c is not a prefix of the node order."""
    tree = Tree.root(pending)
    tree.add(torch.tensor([10, 20]), torch.tensor([0, 0]), torch.tensor([-0.5, -1.0]))
    tree.add(torch.tensor([30]), torch.tensor([2]), torch.tensor([-1.5]))
    return tree


@torch.inference_mode()
def test_commit_keeps_a_non_prefix_path_like_a_fresh_prefill(tiny_model):
    """After committing root, b, c out of [root, a, b, c], the cache must be the one a
    plain prefill of the same tokens builds: the next scores agree to rounding."""
    target = HFBackend(tiny_model)
    state, _ = start(target, NullDrafter(), PROMPT)
    pending = state.pending
    selection = select(_branchy_tree(pending), 3)
    verified = verify(state, selection)
    new = commit(state, verified, Accepted(path=[0, 2, 3], bonus=55))

    assert new == [20, 30, 55]
    assert state.tokens == PROMPT + [pending, 20, 30, 55]
    assert target.committed_length == len(PROMPT) + 3 and target.speculative_length == 0
    got = target.score([55], [-1]).logits[0]

    fresh = HFBackend(tiny_model)
    ref = fresh.score(state.tokens, list(range(-1, len(state.tokens) - 1))).logits[-1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_commit_of_a_prefix_and_of_the_root_alone(tiny_model):
    """A rejected draft commits only the root; the pending token then becomes context."""
    target = HFBackend(tiny_model)
    state, _ = start(target, NullDrafter(), PROMPT)
    pending = state.pending
    verified = verify(state, select(_branchy_tree(pending), 3))
    assert commit(state, verified, Accepted(path=[0], bonus=7)) == [7]
    assert target.committed_length == len(PROMPT) + 1
    got = target.score([7], [-1]).logits[0]
    ref = HFBackend(tiny_model).score(PROMPT + [pending, 7], list(range(-1, len(PROMPT) + 1))).logits[-1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [0, 2])
def test_a_cycle_refuses_a_cache_with_uncommitted_tree_entries(tiny_model, size):
    """Both verify paths (a tree, and the root alone) refuse to start over a verify that
    was never committed: those entries would silently corrupt the context."""
    state, _ = start(HFBackend(tiny_model), LMDrafter(HFBackend(tiny_model)), PROMPT)
    verify(state, select(_branchy_tree(state.pending), 3))
    session = begin(state, 2, 1)
    session.step()
    with pytest.raises(RuntimeError, match="uncommitted speculative entries"):
        finish(state, session, size)


def _state(max_new: int | None, eos: set[int], context: int = 10, max_context: int = 1000) -> DecodeState:
    target = SimpleNamespace(max_context=max_context)
    return DecodeState(target, NullDrafter(), list(range(context)), context - 1, max_new_tokens=max_new,
                       eos_token_ids=frozenset(eos))


@given(
    chunks=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=5), min_size=1, max_size=8),
    max_new=st.integers(1, 20),
    eos=st.sets(st.integers(0, 6), max_size=2),
)
def test_emit_cuts_at_the_first_eos_and_at_max_new_tokens(chunks, max_new, eos):
    """Feeding cycles' tokens through emit yields the stream cut at the first eos (kept)
    or after max_new tokens, whichever comes first; done is set exactly then."""
    stream = [t for c in chunks for t in c]
    expected = stream[:max_new]
    for i, t in enumerate(expected):
        if t in eos:
            expected = expected[: i + 1]
            break
    ends = len(expected) == max_new or (expected and expected[-1] in eos)

    state = _state(max_new, eos)
    out: list[int] = []
    for chunk in chunks:
        if state.done:
            break
        state.tokens.extend(chunk)  # what commit does before the cut
        out.extend(emit(state, chunk))
    assert out == expected
    assert state.produced == len(expected)
    assert state.done == bool(ends)


def test_emit_without_limits_stops_only_when_the_context_is_full():
    state = _state(None, set(), context=8, max_context=10)
    state.tokens.append(1)
    assert emit(state, [1]) == [1] and not state.done  # room for one more level
    state.tokens.append(2)
    assert emit(state, [2]) == [2] and state.done
    assert draft_room(state) == 0


def test_stepwise_cycle_equals_decode_and_reports_stage_times(tiny_model):
    """start, begin, draft steps, finish by hand: the same tokens and cycle results as
    decode with the same static shape, and the timing hook hears every stage."""
    depth, topk, size = 3, 2, 5
    ref_tokens, ref_results = run_decode(HFBackend(tiny_model), LMDrafter(HFBackend(tiny_model)),
                                         StaticController(depth, topk, size), PROMPT, MAX_NEW)
    state, first = start(HFBackend(tiny_model), LMDrafter(HFBackend(tiny_model)), PROMPT, max_new_tokens=MAX_NEW)
    tokens, results = list(first.new_tokens), [first]
    times = StageTimes()
    while not state.done:
        session = begin(state, topk, depth, timer=times)
        while session.can_step:
            session.step()
        results.append(finish(state, session, size, timer=times))
        tokens.extend(results[-1].new_tokens)
    assert tokens == ref_tokens == hf_greedy(tiny_model, PROMPT, MAX_NEW)
    assert [(r.cycle, r.depth, r.size, r.num_accepted, r.new_tokens) for r in results] == [
        (r.cycle, r.depth, r.size, r.num_accepted, r.new_tokens) for r in ref_results
    ]
    assert set(times) == {"draft", "select", "verify", "accept", "commit"}
    assert all(s >= 0 for s in times.values())


def test_stepwise_cycle_stops_at_eos(tiny_model):
    """finish stops the sequence at the eos token, which is kept, like transformers."""
    ref_full = hf_greedy(tiny_model, PROMPT, MAX_NEW)
    pos = next(i for i in range(4, MAX_NEW) if ref_full[i] not in ref_full[:i])
    eos = ref_full[pos]
    state, first = start(HFBackend(tiny_model), LMDrafter(HFBackend(tiny_model)), PROMPT,
                         max_new_tokens=MAX_NEW, eos_token_ids=[eos])
    tokens = list(first.new_tokens)
    while not state.done:
        session = begin(state, 4)
        for _ in range(4):
            session.step()
        tokens.extend(finish(state, session, 12).new_tokens)
    assert_same_tokens(tokens, hf_greedy(tiny_model, PROMPT, MAX_NEW, eos_token_id=eos), tiny_model, PROMPT, "eos")
    assert tokens[-1] == eos and state.produced == pos + 1


def test_begin_leaves_room_for_the_deepest_node(tiny_model):
    """The draft depth is capped so the root and the deepest node fit the context."""
    prompt = [1 + i % 90 for i in range(TINY_MAX_POS - 4)]
    state, _ = start(HFBackend(tiny_model), NullDrafter(), prompt)
    assert draft_room(state) == TINY_MAX_POS - len(state.tokens) == 3
    assert begin(state, 2, 8).max_depth == 3
    assert begin(state, 2, 2).max_depth == 2
    assert begin(state, 2).max_depth == 3


@pytest.mark.parametrize("size", [-3, 0])
def test_finish_with_no_size_verifies_the_root_alone(tiny_model, size):
    state, _ = start(HFBackend(tiny_model), LMDrafter(HFBackend(tiny_model)), PROMPT)
    session = begin(state, 2, 2)
    session.step()
    result = finish(state, session, size)
    assert result.size == 0 and result.num_accepted == 0 and len(result.new_tokens) == 1
    assert result.new_tokens == hf_greedy(tiny_model, PROMPT, 2)[1:]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_root_cycles_equal_the_general_stages(tiny_model, temperature):
    """A cycle with nothing drafted takes a shortcut (one token through the target, no
    tree); it must emit what the general select/verify/accept/commit stages emit, greedy
    (then also transformers' own greedy output) and sampled (same seed, same draws)."""
    from ltd.acceptance import SamplingConfig

    sampling = SamplingConfig(temperature=temperature)
    ctrl = StaticController(depth=0, topk=1, size=0)
    got, results = run_decode(HFBackend(tiny_model), NullDrafter(), ctrl, PROMPT, 12, sampling=sampling, seed=5)
    assert got == run_general_stages(HFBackend(tiny_model), PROMPT, 12, sampling, seed=5)
    if sampling.greedy:
        assert got == hf_greedy(tiny_model, PROMPT, 12)
    assert all(r.depth == 0 and r.drafted == 0 and r.size == 0 and r.num_accepted == 0 for r in results[1:])


def test_a_drafter_that_cannot_draft_asks_the_controller_nothing(tiny_model):
    class OnlyObserves:
        topk = 1

        def __init__(self):
            self.results = 0

        def continue_drafting(self, state):
            raise AssertionError("asked to draft with a NullDrafter")

        def choose_size(self, state):
            raise AssertionError("asked for a size with nothing drafted")

        def observe_result(self, result):
            self.results += 1

    ctrl = OnlyObserves()
    got, results = run_decode(HFBackend(tiny_model), NullDrafter(), ctrl, PROMPT, 6)
    assert got == hf_greedy(tiny_model, PROMPT, 6)
    assert ctrl.results == len(results) - 1


def test_root_cycle_reports_every_stage_and_feeds_listeners(tiny_model):
    """The root-only shortcut still times the four stages (the profiler reads them) and
    still tells listeners what the target processed, with its logits."""
    seen = []

    class Listener:
        def on_commit(self, tokens, logits, features):
            seen.append((list(tokens), logits))

    state, _ = start(HFBackend(tiny_model), NullDrafter(), PROMPT, listeners=[Listener()])
    pending = state.pending
    times = StageTimes()
    result = finish(state, begin(state, 1), 0, timer=times)
    assert set(times) == {"select", "verify", "accept", "commit"} and times["verify"] > 0
    assert result.new_tokens == hf_greedy(tiny_model, PROMPT, 2)[1:]
    tokens, logits = seen[-1]
    assert tokens == [pending] and logits.shape[0] == 1 and int(logits[0].argmax()) == result.new_tokens[0]


def test_score_next_is_the_argmax_of_score(tiny_model):
    a, b = HFBackend(tiny_model), HFBackend(tiny_model)
    for backend in (a, b):
        backend.score(PROMPT, list(range(-1, len(PROMPT) - 1)))
        backend.commit(list(range(len(PROMPT))))
    assert a.score_next(PROMPT[0]) == int(b.score([PROMPT[0]], [-1]).logits[0].argmax())
    assert a.speculative_length == 1  # still speculative: committed or rolled back as usual
