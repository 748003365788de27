"""Stream memory (``--online memory``): the n-gram drafter searches the sequences it served."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import hf_greedy, make_tiny_head, mean_accepted, run_decode
from ltd.backends.hf import HFBackend
from ltd.control import StaticController
from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.drafting.hybrid import HybridDrafter
from ltd.drafting.ngram import NgramDrafter, build_trie
from ltd.errors import LtdError
from ltd.online import OnlineAdapter, StreamMemory, parse_variant, reset_state
from ltd.online.adapter import OnlineParts
from ltd.online.memory import SEP
from ltd.online.reliability import OnlineReliability
from ltd.tree import Tree

PROMPT = [5, 17, 33, 2, 41, 8, 19, 60]


def _root_tokens(drafter: NgramDrafter, tokens: list[int], k: int = 4) -> list[int]:
    drafter.sync(tokens, None)
    toks, logps = drafter.root(Tree.__new__(Tree), k)
    drafter.end()
    return [t for t, lp in zip(toks.tolist(), logps.tolist()) if lp != float("-inf")]


def test_memory_keeps_the_last_tokens_with_separators():
    mem = StreamMemory(capacity=16)
    mem.add([1, 2, 3])
    mem.add([4, 5])
    assert mem.tokens.tolist() == [SEP, 1, 2, 3, SEP, 4, 5]
    mem.add(list(range(10, 30)))
    assert len(mem) == 16 and mem.tokens.tolist() == list(range(14, 30))
    assert mem.sequences == 3
    with pytest.raises(LtdError, match="capacity"):
        StreamMemory(capacity=2)


def test_trie_continuations_stop_at_a_separator():
    arr = np.asarray([7, 8, 9, SEP, 7, 8, 1, 2], dtype=np.int64)
    trie = build_trie(arr, [1, 5], max_len=4)  # after "7 8": "9" (then the separator) and "1 2"
    assert sorted(trie.children) == [1, 9]
    assert trie.children[9].children == {}
    assert list(trie.children[1].children) == [2]


def test_ngram_drafter_drafts_from_remembered_sequences():
    drafter = NgramDrafter()
    drafter.memory = StreamMemory()
    drafter.reset()
    drafter.sync([3, 4, 50, 51, 52, 53, 54], None)  # a served sequence
    drafter.reset()  # the next request: the previous one is remembered
    assert drafter.memory.sequences == 1
    # "51 52" never occurs in the new context, only in memory: the memory continues it
    assert _root_tokens(drafter, [9, 10, 51, 52]) == [53]
    # the context's own match of the same length wins over the memory's
    assert _root_tokens(drafter, [51, 52, 11, 9, 51, 52]) == [11]
    # without memory nothing is found
    plain = NgramDrafter()
    assert _root_tokens(plain, [9, 10, 51, 52]) == []


def test_memory_is_lossless_and_a_repeated_request_accepts_more(tiny_model):
    """Served sequences make the next similar request cheaper; the output never changes."""
    backend = HFBackend(tiny_model)
    ref = hf_greedy(tiny_model, PROMPT, 40)
    for drafter_kind in ("ngram", "hybrid"):
        ngram = NgramDrafter()
        if drafter_kind == "hybrid":
            head = make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=3)
            drafter = HybridDrafter(ngram, Eagle3Drafter(head, tiny_model.get_input_embeddings()), model_depth=1)
        else:
            drafter = ngram
        adapter = OnlineAdapter(drafter, "memory")
        assert ngram.memory is adapter.memory
        # the memory learns from finished sequences, not from commits: the engine registers
        # no listener for it, so the prefill computes only the last position's logits
        assert not adapter.learns_from_commits
        first, r1 = run_decode(backend, drafter, StaticController(4, 4, 8), PROMPT, 40)
        second, r2 = run_decode(backend, drafter, StaticController(4, 4, 8), PROMPT, 40)
        assert first == ref and second == ref
        assert adapter.memory.sequences == 1  # the first request, remembered when the second began
        assert mean_accepted(r2) > mean_accepted(r1) and mean_accepted(r2) >= 3.0


def test_variants_and_their_errors(tiny_model):
    assert parse_variant("plain") == OnlineParts("plain", knn=False, memory=False)
    assert parse_variant("memory") == OnlineParts(None, knn=False, memory=True)
    assert parse_variant("hedge+memory") == OnlineParts("hedge", knn=False, memory=True)
    assert parse_variant("knn+memory") == OnlineParts(None, knn=True, memory=True)
    assert parse_variant("plain+knn") == OnlineParts("plain", knn=True, memory=False)
    with pytest.raises(LtdError, match="unknown online variant"):
        parse_variant("memory+plain")
    with pytest.raises(LtdError, match="unknown online variant"):
        parse_variant("memory+knn")
    head = make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=3)
    with pytest.raises(LtdError, match="n-gram drafter"):
        OnlineAdapter(Eagle3Drafter(head, tiny_model.get_input_embeddings()), "memory")
    with pytest.raises(LtdError, match="EAGLE-3 head"):
        OnlineAdapter(NgramDrafter(), "plain+memory")


def test_memory_and_head_state_round_trip(tiny_model, tmp_path):
    head = make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=3)
    drafter = HybridDrafter(NgramDrafter(), Eagle3Drafter(head, tiny_model.get_input_embeddings()))
    adapter = OnlineAdapter(drafter, "plain+memory", update_every=2, window=24, lr=1e-2)
    assert adapter.learns_from_commits  # the head learner needs every commit's logits
    got, _ = run_decode(HFBackend(tiny_model), drafter, StaticController(3, 3, 6), PROMPT, 20, listeners=[adapter])
    adapter.save_state(tmp_path / "st")  # the sequence just served is saved too
    saved = adapter.memory.tokens.tolist()
    assert saved[0] == SEP and len(saved) > len(PROMPT) + 10
    assert saved[1:] == (PROMPT + got)[: len(saved) - 1]  # the served sequence as synced so far

    head2 = make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=3)
    drafter2 = HybridDrafter(NgramDrafter(), Eagle3Drafter(head2, tiny_model.get_input_embeddings()))
    restored = OnlineAdapter(drafter2, "plain+memory", update_every=2, window=24, lr=1e-2)
    restored.load_state(tmp_path / "st")
    assert restored.memory.tokens.tolist() == adapter.memory.tokens.tolist()
    for n, p in drafter.model.head.named_parameters():
        assert torch.equal(p, dict(drafter2.model.head.named_parameters())[n])

    with pytest.raises(LtdError, match="--online plain\\+memory, not memory"):
        OnlineAdapter(HybridDrafter(NgramDrafter(), Eagle3Drafter(head2, tiny_model.get_input_embeddings())), "memory").load_state(tmp_path / "st")
    (tmp_path / "st" / "memory.safetensors").write_bytes(b"garbage")
    with pytest.raises(LtdError, match="corrupt"):
        restored.load_state(tmp_path / "st")
    assert reset_state(tmp_path / "st") and not (tmp_path / "st").exists()


def test_memory_only_state_round_trip(tmp_path):
    drafter = NgramDrafter()
    adapter = OnlineAdapter(drafter, "memory")
    drafter.sync([1, 2, 3, 4], None)
    adapter.save_state(tmp_path / "m")
    other = OnlineAdapter(NgramDrafter(), "memory")
    other.load_state(tmp_path / "m")
    assert other.memory.tokens.tolist() == [SEP, 1, 2, 3, 4]
    drafter.reset()  # already remembered when saved: not added twice
    assert adapter.memory.sequences == 1


def test_online_reliability_starts_at_the_prior_and_follows_the_evidence():
    rel = OnlineReliability((0.4, 0.8), strength=10.0)
    assert rel.table() == pytest.approx((0.4, 0.8))
    for _ in range(30):  # after a 1-token match the top child (given all of the count) was right
        rel.observe(1, 1.0, True)
    rel.observe(5, 0.5, False)  # beyond the table: the last entry learns
    assert rel.table()[0] == pytest.approx((30 + 10 * 0.4) / (30 + 10))
    assert rel.table()[1] == pytest.approx((10 * 0.8) / (0.5 + 10))
    rel.observe(1, 0.01, True)  # hits at a tiny share cannot push q above 1
    for _ in range(100):
        rel.observe(2, 0.1, True)
    assert rel.table()[1] == 1.0
    copy_ = OnlineReliability((0.4, 0.8), strength=10.0)
    copy_.load_json(rel.to_json())
    assert copy_.table() == rel.table()
    with pytest.raises(ValueError):
        OnlineReliability((0.4, 0.8, 0.9)).load_json(rel.to_json())


def test_drafter_learns_reliability_only_from_committed_tokens():
    """The trie's top children are scored against the tokens committed after the draft."""
    drafter = NgramDrafter(max_n=3, reliabilities=(0.5,) * 6)
    drafter.calibration = OnlineReliability(drafter.reliabilities, strength=1.0)
    seq = [1, 2, 3, 4, 9, 1, 2, 3]  # "1 2 3" was followed by "4 9"
    toks = _root_tokens(drafter, seq)
    assert toks == [4]
    assert drafter.calibration.trials == 0  # nothing committed yet: nothing learned
    drafter.sync(seq + [4, 7], None)  # the target took "4" (right, at m=3) then "7" (wrong: "9", at m=4)
    assert drafter.calibration.hits.tolist()[:4] == [0, 0, 1, 0]
    assert drafter.calibration.shares.tolist()[:4] == [0, 0, 1, 1]
    q = drafter.current_reliabilities
    assert q[2] == pytest.approx(1.5 / 2) and q[3] == pytest.approx(0.5 / 2)
    # the next draft uses the learned table: "4" after a 3-token match now scores log(0.75)
    drafter.sync([5, 1, 2, 3, 4, 9, 1, 2, 3], None)  # no draft since the last sync: nothing new
    assert drafter.calibration.trials == 2
    toks, logps = drafter.root(Tree.__new__(Tree), 2)
    assert toks[0].item() == 4 and logps[0].item() == pytest.approx(math.log(0.75))
    plain = NgramDrafter(max_n=3)  # frozen: no calibration, the fixed table
    plain.sync(seq, None)
    plain.root(Tree.__new__(Tree), 2)
    plain.sync(seq + [4, 7], None)
    assert plain.current_reliabilities == plain.reliabilities


def test_reliability_state_round_trips_and_corrupt_counts_are_refused(tmp_path):
    drafter = NgramDrafter()
    adapter = OnlineAdapter(drafter, "memory")
    assert drafter.calibration is adapter.reliability
    adapter.reliability.observe(3, 1.0, True)
    adapter.save_state(tmp_path / "m")
    other = OnlineAdapter(NgramDrafter(), "memory")
    other.load_state(tmp_path / "m")
    assert other.reliability.table() == adapter.reliability.table() != NgramDrafter().reliabilities
    (tmp_path / "m" / "reliability.json").write_text('{"hits": [1], "shares": "x"}')
    with pytest.raises(LtdError, match="corrupt reliability.json"):
        OnlineAdapter(NgramDrafter(), "memory").load_state(tmp_path / "m")


@pytest.mark.e2e
def test_cli_generate_keeps_its_memory_across_runs(tmp_path):
    """``ltd generate --online memory --online-state DIR``: each run restores the memory,
    serves, and saves it with its own sequence added; the text never changes."""
    import contextlib
    import io
    import json

    from ltd import cli
    from ltd.engine import Engine

    torch.set_num_threads(1)
    engine = Engine.load("smollm2-135m", drafter="ngram")
    state = tmp_path / "state"
    argv = ["generate", "--model", "smollm2-135m", "--drafter", "ngram", "--method", "static", "--prompt", "List three colors.",
            "--max-new-tokens", "12", "--threads", "1", "--json", "--online", "memory", "--online-state", str(state)]
    texts = []
    for run in (1, 2):
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
            mp.setattr(Engine, "load", staticmethod(lambda *a, **k: engine))
            assert cli.main(argv) == 0
        texts.append(json.loads(out.getvalue())["text"])
        assert json.loads((state / "memory.json").read_text())["sequences"] == run
    assert texts[0] == texts[1]
    assert json.loads((state / "adapter.json").read_text())["variant"] == "memory"
    assert cli.main(["online", "reset", str(state)]) == 0 and not state.exists()
