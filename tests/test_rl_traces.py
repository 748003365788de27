"""Traces, counterfactual replay and the oracle.

The keystone: the accepted length that replay computes from a recorded tree equals what
the real cycle (verify + accept on the target) accepts for the same tree and (d, V).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import hf_greedy
from ltd.backends.hf import HFBackend
from ltd.control import StaticController
from ltd.control.learned import HeuristicController
from ltd.cycle import DraftSession, accept, select, start, verify
from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.drafting.lm import LMDrafter
from ltd.errors import LtdError
from ltd.rl.latency import LatencyModel
from ltd.rl.oracle import compare, oracle, oracle_sequence, replay_controller
from ltd.rl.traces import (
    PositionRecord,
    TraceSequence,
    TraceSet,
    accepted_length,
    record,
    record_sequence,
)
from ltd.tree import Tree
from test_rl_common import MAX_DEPTH, MAX_NEW, MAX_SIZE, PROMPTS, TOPK, hand_latency, noisy_copy, tiny_engine

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def drafter_model(tiny_model):
    return noisy_copy(tiny_model)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_model, drafter_model):
    out = tmp_path_factory.mktemp("traces")
    engine = tiny_engine(tiny_model, drafter_model)
    record(engine, PROMPTS, max_depth=MAX_DEPTH, topk=TOPK, max_new_tokens=MAX_NEW, out_dir=out, max_size=MAX_SIZE,
           keys=[f"p{i}" for i in range(len(PROMPTS))], progress=False)
    return out


def test_record_writes_manifest_and_greedy_outputs(recorded, tiny_model):
    traces = TraceSet.load(recorded)
    man = json.loads((recorded / "manifest.json").read_text())
    assert man["format"] == "ltd-traces" and man["topk"] == TOPK and man["max_size"] == MAX_SIZE
    assert man["machine"]["cpu_model"]
    assert [s.key for s in traces.sequences] == ["p0", "p1", "p2"]
    for seq, prompt in zip(traces.sequences, PROMPTS):
        assert seq.prompt.tolist() == prompt
        assert seq.output.tolist() == hf_greedy(tiny_model, prompt, MAX_NEW)
        assert seq.num_positions == MAX_NEW - 1
        pos = seq[3]
        assert pos.context_length == len(prompt) + 4 and pos.continuation.tolist() == seq.output[4:].tolist()
        assert pos.depth == MAX_DEPTH
        # unpruned level counts: k, then k*k per level
        assert pos.level_counts.tolist() == [0, 3, 12, 21, 30]
        assert len(pos.tokens) <= 1 + MAX_DEPTH * MAX_SIZE  # pruned to what V <= 8 can select
        assert np.isfinite(pos.candidate_scores(1)).sum() == TOPK and pos.candidate_scores(2).size == TOPK * TOPK


def test_record_resumes_and_refuses_other_settings(recorded, tiny_model, drafter_model):
    before = {p.name: p.stat().st_mtime_ns for p in recorded.glob("seq-*.npz")}
    engine = tiny_engine(tiny_model, drafter_model)
    prompts = PROMPTS + [[40, 41, 42]]
    record(engine, prompts, max_depth=MAX_DEPTH, topk=TOPK, max_new_tokens=MAX_NEW, out_dir=recorded, max_size=MAX_SIZE,
           keys=[f"p{i}" for i in range(len(prompts))], progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in recorded.glob("seq-*.npz")}
    assert {k: after[k] for k in before} == before  # finished prompts were skipped
    assert len(after) == 4
    with pytest.raises(LtdError, match="use another --out"):
        record(engine, PROMPTS, max_depth=MAX_DEPTH + 1, topk=TOPK, max_new_tokens=MAX_NEW, out_dir=recorded,
               max_size=MAX_SIZE, progress=False)


def test_fast_accepted_length_equals_select_reference(recorded):
    traces = TraceSet.load(recorded)
    lengths = []
    for seq in traces.sequences:
        for p in range(seq.num_positions):
            pos = seq[p]
            for d in range(0, MAX_DEPTH + 1):
                for v in (1, 2, 3, 5, 8):
                    ref = accepted_length(pos, d, v)
                    assert seq.accepted(p, d, v) == ref, (seq.key, p, d, v)
                    lengths.append(ref)
    counts = np.bincount(lengths)
    assert counts[0] and counts[1] and counts[2], f"the test drafter should give varied acceptance: {counts}"


@pytest.mark.parametrize("kind", ["lm", "eagle3"])
def test_replay_accepted_length_equals_live(kind, tiny_model, drafter_model, tiny_head):
    """Draft live at each position, run the real verify/accept on the same tree and (d, V),
    and compare with the replay answer from the recorded tree (unpruned here)."""
    if kind == "lm":
        make = lambda: LMDrafter(HFBackend(drafter_model))  # noqa: E731
    else:
        make = lambda: Eagle3Drafter(tiny_head, tiny_model.get_input_embeddings())  # noqa: E731
    prompt = PROMPTS[1]
    out = hf_greedy(tiny_model, prompt, 16)
    target = HFBackend(tiny_model)
    records = record_sequence(target, make(), prompt, out, max_depth=MAX_DEPTH, topk=TOPK)
    seq = TraceSequence.from_records("live", prompt, out, records, TOPK, MAX_DEPTH)
    checked = positive = 0
    for p in range(0, len(out) - 1 - MAX_DEPTH, 2):
        for d, v in ((1, 1), (2, 2), (2, 5), (3, 3), (4, 12), (4, 30)):
            drafter = make()
            state, first = start(target, drafter, prompt + out[:p])
            assert first.new_tokens == [out[p]]
            session = DraftSession(state, TOPK, d)
            while session.can_step:
                session.step()
            tree = session.finish()
            rec = seq[p].tree(d)
            assert tree.tokens.tolist() == rec.tokens.tolist() and tree.parents.tolist() == rec.parents.tolist()
            assert torch.allclose(tree.scores, rec.scores, atol=1e-4)
            verified = verify(state, select(tree, v))
            live = accept(state, verified).num_accepted
            assert live == seq.accepted(p, d, v) == accepted_length(seq[p], d, v), (p, d, v)
            target.rollback()
            checked += 1
            positive += live > 0
    assert checked >= 12
    if kind == "lm":
        assert positive >= 3


COPY_TEXT = (
    "The quick brown fox jumps over the lazy dog near the river bank while the sun sets slowly behind the hills. "
    "Scientists have discovered that many species of birds use the magnetic field of the earth to navigate. "
)


@pytest.mark.e2e
def test_replay_equals_live_for_suffix_chains_at_depth_32():
    """Suffix-drafted trees 32 deep on the embedded model copying a passage: replay's
    accepted length and drafter signals equal the live cycle's at every (d, V) tried,
    long accepted chains included."""
    from ltd.drafting.suffix import SuffixDrafter
    from ltd.models import load_model

    depth = 32
    loaded = load_model("smollm2-135m")
    prompt = loaded.tokenizer.encode(COPY_TEXT + COPY_TEXT + "The quick brown fox")
    out = hf_greedy(loaded.model, prompt, 48)
    target = HFBackend(loaded.model)
    records = record_sequence(target, SuffixDrafter(), prompt, out, max_depth=depth, topk=TOPK)
    seq = TraceSequence.from_records("suffix", prompt, out, records, TOPK, depth)
    longest = checked = 0
    for p in range(0, len(out) - 1, 6):
        for d, v in ((1, 1), (8, 8), (32, 32), (32, 64)):
            drafter = SuffixDrafter()
            state, first = start(target, drafter, prompt + out[:p])
            session = DraftSession(state, TOPK, d)
            while session.can_step:
                session.step()
            signals = session.signals()
            tree = session.finish()
            assert tree.tokens.tolist() == seq[p].tree(d).tokens.tolist()
            assert signals is not None and signals.tolist() == seq[p].signals.tolist(), p
            verified = verify(state, select(tree, v))
            live = accept(state, verified).num_accepted
            assert live == seq.accepted(p, d, v) == accepted_length(seq[p], d, v), (p, d, v)
            target.rollback()
            longest, checked = max(longest, live), checked + 1
    assert checked >= 28
    assert longest >= 16, f"copying the passage should accept long suffix chains, longest {longest}"


# -- a hand-made trace with a hand-computed optimum ----------------------------------------


def _hand_tree(root: int, continuation: list[int], good: bool) -> PositionRecord:
    """k=2, depth 2. With ``good`` the greedy continuation is the best node of each level."""
    c0 = continuation[0] if good and continuation else 90
    c1 = continuation[1] if good and len(continuation) > 1 else 92
    tree = Tree.root(root)
    tree.add(torch.tensor([c0, 91]), torch.tensor([0, 0]), torch.tensor([-0.1, -2.0]))
    tree.add(torch.tensor([c1, 93, 94, 95]), torch.tensor([1, 1, 2, 2]), torch.tensor([-0.2, -3.0, -2.5, -4.0]))
    cands = [torch.tensor([-0.1, -2.0]), torch.tensor([-0.2, -3.0, -2.5, -4.0])]
    return PositionRecord(tree, cands, [1e-3, 1e-3])


def hand_sequence() -> TraceSequence:
    prompt, output = [1, 2], [10, 11, 12, 13, 14, 15]
    good = [True, False, True, False, True]
    records = [_hand_tree(output[p], output[p + 1 :], good[p]) for p in range(len(output) - 1)]
    return TraceSequence.from_records("hand", prompt, output, records, topk=2, max_depth=2)


def hand_costs() -> LatencyModel:
    # draft step 1 s, verify of n tokens 10 + (n - 1) s, no overhead, free policies
    return LatencyModel(draft_topk=2, draft_step_seconds=[1.0, 1.0], verify_tokens=[1, 2, 3],
                        verify_contexts=[1], verify_seconds=[[10.0, 11.0, 12.0]])


def test_oracle_dp_matches_hand_computed_optimum():
    seq = hand_sequence()
    assert [seq.accepted(0, d, v) for d, v in ((1, 1), (1, 2), (2, 1), (2, 2))] == [1, 1, 1, 2]
    assert all(seq.accepted(1, d, v) == 0 for d in (1, 2) for v in (1, 2))
    assert seq.accepted(4, 2, 2) == 1  # the continuation ends
    sched = oracle_sequence(seq, hand_costs(), sizes=(1, 2))
    # best[4] = AR 10; best[3] = 20; best[2] = (2,2) -> end: 14; best[1] = 24;
    # best[0] = min(AR 34, (1,1) -> p2: 12 + 14 = 26, (2,1): 27, (2,2) -> p3: 34) = 26
    assert sched.seconds == pytest.approx(26.0)
    assert [(a["position"], a["depth"], a["size"], a["accepted"]) for a in sched.actions] == [(0, 1, 1, 1), (2, 2, 2, 2)]
    assert sched.tokens == 5 and sched.tokens_per_second == pytest.approx(5 / 26)


def test_controllers_in_replay_against_the_oracle():
    traces = TraceSet.from_sequences([hand_sequence()], topk=2, max_depth=2)
    lat = hand_costs()
    static = replay_controller(traces, lat, StaticController(depth=2, topk=2, size=2))
    # p0 (2,2) L=2 -> p3 L=0 -> p4 L=1 -> end: 3 cycles of 14 s, 3 + 1 + 1 tokens
    assert static.seconds == pytest.approx(42.0) and static.tokens == 5
    report = compare(traces, lat, {"static": StaticController(depth=2, topk=2, size=2),
                                   "heuristic": lambda: HeuristicController(depth=1, topk=2, size=2, max_depth=2)}, sizes=(1, 2))
    rows = {r["name"]: r for r in report["results"]}
    assert rows["oracle"]["fraction_of_oracle"] == 1.0
    assert rows["static"]["fraction_of_oracle"] == pytest.approx(26 / 42, abs=1e-4)
    assert rows["ar"]["seconds"] == pytest.approx(50.0)
    assert 0 < rows["heuristic"]["fraction_of_oracle"] <= 1.0


def test_oracle_on_recorded_traces_beats_every_static_choice(recorded):
    traces = TraceSet.load(recorded)
    lat = hand_latency()
    best = oracle(traces, lat)
    for d in (1, 2, 4):
        for v in (1, 4, 8):
            t = replay_controller(traces, lat, StaticController(depth=d, topk=TOPK, size=v))
            assert t.tokens == best.tokens
            assert t.seconds >= best.seconds - 1e-9, (d, v)


class _ChatTokenizer:
    """A tiny tokenizer with a chat template over numbers: "5 6 7" <-> [5, 6, 7]; a user
    turn is marked by 1, an assistant turn by 2."""

    eos_token_id = None
    chat_template = "numbers"

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False):
        ids = []
        for m in messages:
            ids += [1 if m["role"] == "user" else 2] + [int(w) for w in m["content"].split()]
        return ids + [2] if add_generation_prompt else ids

    def __len__(self) -> int:
        return 96


def test_record_runs_every_turn_of_multiturn_questions(tmp_path, tiny_model, drafter_model):
    """A multiturn question records both turns (the second after the target's own first
    reply, as ltd bench runs it); other questions record their first turn."""
    from ltd.bench.suites import Question
    from ltd.engine import Engine
    from ltd.models import LoadedModel
    from ltd.rl.prompts import question_prompts, resolve_prompts

    engine = Engine(LoadedModel("tiny", tiny_model, _ChatTokenizer()), LMDrafter(HFBackend(drafter_model)))
    questions = [Question("multiturn", 7, "c", ("5 6 7 8", "9 10"), all_turns=True),
                 Question("alpaca", 3, "w", ("11 12 13", "14 15"))]
    keys, prompts = question_prompts(engine, questions)
    assert keys == ["multiturn/7", "multiturn/7/turn2", "alpaca/3"]
    out = tmp_path / "traces"
    record(engine, prompts, keys=keys, max_depth=MAX_DEPTH, topk=TOPK, max_new_tokens=MAX_NEW, out_dir=out,
           max_size=MAX_SIZE, progress=False)
    seqs = {s.key: s for s in TraceSet.load(out).sequences}
    assert set(seqs) == set(keys)
    first = hf_greedy(tiny_model, [1, 5, 6, 7, 8, 2], MAX_NEW)
    second_prompt = [1, 5, 6, 7, 8, 2, *first, 1, 9, 10, 2]
    assert seqs["multiturn/7"].output.tolist() == first
    assert seqs["multiturn/7/turn2"].prompt.tolist() == second_prompt
    assert seqs["multiturn/7/turn2"].output.tolist() == hf_greedy(tiny_model, second_prompt, MAX_NEW)
    assert seqs["multiturn/7/turn2"].num_positions == MAX_NEW - 1
    # the live environment's prompts are the same turns
    assert resolve_prompts(engine, keys, prompts, MAX_NEW)[1] == second_prompt
    # a resumed run finds the second turn's prompt from the stored first output, and skips both
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("seq-*.npz")}
    record(engine, prompts, keys=keys, max_depth=MAX_DEPTH, topk=TOPK, max_new_tokens=MAX_NEW, out_dir=out,
           max_size=MAX_SIZE, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("seq-*.npz")} == before
