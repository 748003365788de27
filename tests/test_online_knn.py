"""kNN drafting memory (``--online knn``): labels, votes, losslessness, state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import hf_greedy, make_tiny_head, mean_accepted, run_decode
from ltd.backends.hf import HFBackend
from ltd.control import StaticController
from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.drafting.hybrid import HybridDrafter
from ltd.drafting.ngram import SEP, NgramDrafter
from ltd.errors import LtdError
from ltd.online import KnnDrafter, OnlineAdapter, reset_state
from ltd.online.knn import KnnConfig, KnnMemory

PROMPT = [5, 17, 33, 2, 41, 8, 19, 60]


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_entries_are_labelled_two_tokens_on_once_committed():
    mem = KnnMemory(hidden_size=2, fingerprint="x", cfg=KnnConfig(capacity=16, k=2))
    tokens = [10, 11, 12, 13]  # 13 is pending: entry j read tokens[j+1], is labelled tokens[j+2]
    mem.observe(0, _unit([[1, 0], [0, 1], [1, 1]]), tokens)
    assert len(mem) == 2  # entry 2 read 13 and waits for the token after it
    assert mem.read[:2].tolist() == [11, 12] and mem.labels.tolist() == [12, 13]
    mem.observe(3, _unit([[1, -1]]), tokens + [14])  # one more committed token labels entry 2
    assert len(mem) == 3 and mem.read[2].item() == 13 and mem.labels[2].item() == 14
    mem.end_sequence()  # entry 3 (read 14) never got a label: dropped with its request
    assert mem.stream == [10, 11, 12, 13, 14, SEP]
    mem.observe(0, _unit([[0, 1], [1, 0]]), [7, 8, 9])
    assert len(mem) == 4 and mem.labels[3].item() == 9 and mem.stream[-3:] == [7, 8, 9]


def _filled(cfg: KnnConfig) -> KnnMemory:
    """Two served sequences: 1 5 40 41 42 and 2 5 43 44, keyed so that 5->40 and 5->43 differ."""
    mem = KnnMemory(hidden_size=2, fingerprint="x", cfg=cfg)
    mem.observe(0, _unit([[1, 0], [0, 1], [0, 1], [0, 1], [0, 1]]), [1, 5, 40, 41, 42])  # entry 0 read 5
    mem.end_sequence()
    mem.observe(0, _unit([[0.2, 1], [0, 1], [0, 1], [0, 1]]), [2, 5, 43, 44])
    mem.end_sequence()
    return mem


def test_retrieval_votes_and_continuations_come_from_the_bucket_of_the_read_token():
    mem = _filled(KnnConfig(capacity=16, k=2, temperature=0.01))
    found = mem.retrieve(_unit([[1, 0]])[0], read_token=5)
    assert found.labels.tolist() == [40, 43] and found.weights[0] > 0.99  # the near key dominates
    # the continuations after the labels, each stopping at its sequence's end
    assert sorted(found.trie.children) == [40, 43]
    assert list(found.trie.children[40].children) == [41] and list(found.trie.children[43].children) == [44]
    assert mem.retrieve(_unit([[1, 0]])[0], read_token=40).labels.tolist() == [41]
    assert mem.retrieve(_unit([[1, 0]])[0], read_token=99) is None
    # trie children are scored q(depth) x weight share
    toks, logps = mem.children(found.trie.children[40], k=2)
    assert toks[0] == 41 and math.isclose(math.exp(logps[0]), mem.reliability.table()[0], rel_tol=1e-6)


def test_ring_keeps_the_newest_and_the_stream_is_trimmed_behind_it():
    mem = KnnMemory(hidden_size=2, fingerprint="x", cfg=KnnConfig(capacity=16))
    for r in range(10):
        seq = [100 + r * 10 + i for i in range(8)]
        mem.observe(0, _unit([[1, i] for i in range(8)]), seq)
        mem.end_sequence()
    assert len(mem) == 16 and mem.added == 60
    assert len(mem.stream) <= 2 * 16 + 9  # trimmed, up to one sequence of slack
    assert sorted(mem.labels.tolist()) == [t for r in (7, 8, 9) for t in [100 + r * 10 + i for i in range(2, 8)]][-16:]


def test_per_token_index_matches_a_search_of_the_ring_after_overwrites():
    """Queries search each read token's contiguous copy of its keys; after the ring has
    overwritten most slots (stale copies masked, then compacted), every retrieval must be
    what a search over the ring's live entries gives."""
    gen = torch.Generator().manual_seed(0)
    mem = KnnMemory(hidden_size=8, fingerprint="x", cfg=KnnConfig(capacity=64, k=4, temperature=0.05))
    for r in range(40):
        seq = torch.randint(0, 5, (12,), generator=gen).tolist()  # five read tokens: big, shared buckets
        mem.observe(0, torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=-1), seq)
        mem.end_sequence()
        for tok in range(5):
            query = torch.nn.functional.normalize(torch.randn(8, generator=gen), dim=0)
            rows = torch.nonzero(mem.read[: len(mem)] == tok).flatten()
            found = mem.retrieve(query, tok)
            if rows.numel() == 0:
                assert found is None
                continue
            top = torch.topk(mem.keys[rows] @ query, min(4, rows.numel())).values
            assert math.isclose(found.similarity, float(top[0]), rel_tol=1e-5)
            assert all(tok not in mem._buckets or mem._buckets[tok].n <= 2 * mem._buckets[tok].live + 64 for tok in range(5))
    assert mem.added > 4 * 64 and sum(b.live for b in mem._buckets.values()) == len(mem) == 64


def test_mix_adds_votes_to_the_head_distribution():
    mem = _filled(KnnConfig(capacity=16, k=4, weight=0.5, temperature=1e3))  # near-equal votes
    found = mem.retrieve(_unit([[1, 0]])[0], read_token=5)  # 40 and 43, half each
    d2t = torch.tensor([0, 1, 2, 40])  # draft vocab: target ids 0, 1, 2, 40 (43 is outside)
    t2d = torch.full((100,), -1, dtype=torch.long)
    t2d[d2t] = torch.arange(4)
    head = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    toks, logp = mem.mix(head, d2t, t2d, found, k=3)
    # 0 -> 0.35, 40 -> 0.05 + 0.25, 43 -> 0.25
    assert toks.tolist() == [0, 40, 43]
    assert torch.allclose(logp.exp(), torch.tensor([0.35, 0.30, 0.25]), atol=1e-3)
    toks, logp = mem.mix(head, d2t, t2d, None, k=3)  # no neighbours: the head alone
    assert toks.tolist()[0] == 0 and math.isclose(float(logp[0].exp()), 0.7, rel_tol=1e-5)


def test_calibration_learns_from_committed_tokens():
    mem = _filled(KnnConfig(capacity=16, k=2, temperature=0.01))
    found = mem.retrieve(_unit([[1, 0]])[0], read_token=5)
    before = mem.reliability.table()[0]
    for _ in range(200):  # the target keeps rejecting 41 after 40
        mem.calibrate(found.trie, [40, 99])
    assert mem.reliability.table()[0] < before / 3
    mem.calibrate(found.trie, [43])  # a single committed token grades nothing beyond the votes
    assert mem.reliability.trials == 200 * found.trie.children[40].children[41].count / found.trie.children[40].count


def _hybrid(tiny_model, seed=3, model_depth=None):
    head = make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=seed)
    return HybridDrafter(NgramDrafter(), Eagle3Drafter(head, tiny_model.get_input_embeddings()), model_depth=model_depth)


def test_knn_is_lossless_and_a_repeated_request_accepts_more(tiny_model):
    """The memory learns the target's continuations; the output never changes."""
    backend = HFBackend(tiny_model)
    ref = hf_greedy(tiny_model, PROMPT, 40)
    head = make_tiny_head(tiny_model, draft_vocab_size=96, layer_ids=[1, 2, 3], seed=3)
    drafter = Eagle3Drafter(head, tiny_model.get_input_embeddings())
    frozen, r0 = run_decode(backend, drafter, StaticController(4, 4, 8), PROMPT, 40)
    adapter = OnlineAdapter(drafter, "knn")
    # the memory wraps the drafter; the head drafter itself is left as it was
    assert isinstance(adapter.drafter, KnnDrafter) and adapter.drafter.inner is drafter and adapter.drafter.knn is adapter.knn
    assert not hasattr(drafter, "knn")
    first, r1 = run_decode(backend, adapter.drafter, StaticController(4, 4, 8), PROMPT, 40)
    second, r2 = run_decode(backend, adapter.drafter, StaticController(4, 4, 8), PROMPT, 40)
    assert frozen == ref and first == ref and second == ref
    # every committed position but the last two of each request is stored
    assert 0 < adapter.knn.added <= 2 * (len(PROMPT) + 40 - 2)
    assert mean_accepted(r2) > mean_accepted(r0) and mean_accepted(r2) >= 3.0


@pytest.mark.parametrize("node_votes,model_depth", [(0, 1), (2, 1), (2, None)])
def test_nodes_the_root_trie_misses_ask_the_store_with_their_own_state(tiny_model, node_votes, model_depth):
    """A drafted node below which the root's neighbours have no continuation asks the store
    itself (with the head at the root only, @1, or at every level): its retrieval trie is
    rooted at its depth, and it is graded by the committed tokens. Output is unchanged."""
    backend = HFBackend(tiny_model)
    drafter = _hybrid(tiny_model, model_depth=model_depth)
    adapter = OnlineAdapter(drafter, "knn", knn_config=KnnConfig(node_votes=node_votes))
    drafter = adapter.drafter
    assert isinstance(drafter, HybridDrafter) and drafter.model_depth == model_depth and isinstance(drafter.model, KnnDrafter)
    model, asked = drafter.model, []
    real = adapter.knn.retrieve

    def spy(query, read_token, depth=0):
        found = real(query, read_token, depth)
        asked.append((depth, read_token, found))
        return found

    adapter.knn.retrieve = spy
    prompt = PROMPT * 3
    ref = hf_greedy(tiny_model, prompt, 32)
    for _ in range(2):
        out, _ = run_decode(backend, drafter, StaticController(3, 4, 6), prompt, 32)
        assert out == ref
    deeper = [(d, t, f) for d, t, f in asked if d > 0]
    if node_votes == 0:
        assert not deeper
        return
    assert deeper and {d for d, _, _ in deeper} <= {1, 2}  # a 3-deep tree expands nodes at depths 1 and 2
    found = [(d, f) for d, _, f in deeper if f is not None]
    assert found and all(f.trie.depth == d and all(c.depth == d + 1 for c in f.trie.children.values()) for d, f in found)
    assert adapter.knn.reliability.trials > 0  # graded by the committed tokens


def test_knn_state_round_trips_and_bad_states_are_refused(tiny_model, tmp_path):
    backend = HFBackend(tiny_model)
    drafter = _hybrid(tiny_model, model_depth=1)  # deeper levels: n-grams and retrieved continuations
    adapter = OnlineAdapter(drafter, "knn")
    ref = hf_greedy(tiny_model, PROMPT, 24)
    for _ in range(3):
        out, _ = run_decode(backend, adapter.drafter, StaticController(3, 4, 6), PROMPT, 24)
        assert out == ref
    state = tmp_path / "state"
    adapter.save_state(state)
    again = OnlineAdapter(_hybrid(tiny_model), "knn")
    again.load_state(state)
    n = len(adapter.knn)
    assert len(again.knn) == n > 0
    assert torch.equal(again.knn.keys[:n], adapter.knn.keys[:n]) and torch.equal(again.knn.labels[:n], adapter.knn.labels[:n])
    # a store built on another head is refused: its keys mean nothing to this one
    other = OnlineAdapter(_hybrid(tiny_model, seed=4), "knn")
    with pytest.raises(LtdError, match="another draft head"):
        other.load_state(state)
    # corrupt tensors or metadata
    (state / "knn.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LtdError, match="corrupt"):
        OnlineAdapter(_hybrid(tiny_model), "knn").load_state(state)
    adapter.save_state(state)
    meta = json.loads((state / "knn.json").read_text())
    meta["hidden_size"] = 7
    (state / "knn.json").write_text(json.dumps(meta))
    with pytest.raises(LtdError, match="another version or head size"):
        OnlineAdapter(_hybrid(tiny_model), "knn").load_state(state)
    # a state saved by another variant
    old_state = tmp_path / "memory-only"
    adapter.save_state(old_state)
    (old_state / "adapter.json").write_text(json.dumps({"variant": "memory"}))
    with pytest.raises(LtdError, match="is for --online memory"):
        OnlineAdapter(_hybrid(tiny_model), "knn").load_state(old_state)
    assert reset_state(state) and not state.exists()


def test_knn_needs_a_head_and_valid_settings(tiny_model):
    with pytest.raises(LtdError, match="EAGLE-3 head"):
        OnlineAdapter(NgramDrafter(), "knn")
    with pytest.raises(LtdError, match="capacity >= 16"):
        KnnMemory(hidden_size=4, fingerprint="x", cfg=KnnConfig(capacity=4))
    with pytest.raises(LtdError, match="needs a suffix drafter"):
        OnlineAdapter(_hybrid(tiny_model), "memory")  # the store belongs to a suffix drafter
    with pytest.raises(LtdError, match="unknown online variant 'plain'"):
        OnlineAdapter(_hybrid(tiny_model), "plain")
    adapter = OnlineAdapter(_hybrid(tiny_model), "knn", knn_config=KnnConfig(k=3))
    assert adapter.knn.cfg.k == 3


def test_vote_share_follows_whether_the_votes_predict_the_target():
    mem = _filled(KnnConfig(capacity=16, k=2, temperature=0.01, weight=0.5))
    d2t = torch.tensor([0, 1, 40, 43])
    t2d = torch.full((100,), -1, dtype=torch.long)
    t2d[d2t] = torch.arange(4)
    head = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    query = _unit([[1, 0]])[0]  # nearest: the entry labelled 40
    sim = mem.retrieve(query, 5).similarity
    assert math.isclose(mem.vote_weight(sim), 0.5)
    for _ in range(60):  # the target keeps taking 40, which the votes back and the head does not
        mem.mix(head, d2t, t2d, mem.retrieve(query, 5), k=3)
        mem.grade(40, t2d)
    trusted = mem.vote_weight(sim)
    assert trusted > 0.8
    for _ in range(200):  # the domain changes: the target now takes 0, the head's favourite
        mem.mix(head, d2t, t2d, mem.retrieve(query, 5), k=3)
        mem.grade(0, t2d)
    assert mem.vote_weight(sim) < 0.3
    mem.grade(0, t2d)  # nothing drafted since the last grade: no update
    fixed = _filled(KnnConfig(capacity=16, learn_weight=False, weight=0.4))
    fixed.mix(head, d2t, t2d, fixed.retrieve(query, 5), k=3)
    fixed.grade(0, t2d)
    assert fixed.vote_weight(sim) == 0.4


@pytest.mark.e2e
def test_cli_generate_keeps_its_knn_memory_across_runs(tmp_path):
    """``ltd generate --online knn --online-state DIR`` on the embedded model and its shipped
    head: each run restores the store, adds its own positions and saves it; the text equals
    plain greedy decoding every time."""
    import contextlib
    import io

    from ltd import cli
    from ltd.engine import Engine, GenerateConfig

    torch.set_num_threads(1)
    engine = Engine.load("smollm2-135m")  # the default hybrid drafter with the shipped head
    frozen = engine.drafter
    prompt = "Write a Python function that returns the square of a number."
    ref = engine.generate(engine.encode(prompt), GenerateConfig(method="hf", max_new_tokens=24)).text
    state = tmp_path / "state"
    argv = ["generate", "--model", "smollm2-135m", "--method", "static", "--depth", "3", "--size", "3", "--prompt", prompt,
            "--max-new-tokens", "24", "--threads", "1", "--json", "--online", "knn", "--online-state", str(state)]
    stored = []
    for _ in range(2):
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
            mp.setattr(Engine, "load", staticmethod(lambda *a, **k: engine))
            assert cli.main(argv) == 0
        assert json.loads(out.getvalue())["text"] == ref
        engine.online, engine.drafter = None, frozen  # the next run restores from the state directory alone
        stored.append(json.loads((state / "knn.json").read_text())["added"])
    assert 0 < stored[0] < stored[1]
    assert json.loads((state / "adapter.json").read_text())["variant"] == "knn"


def test_bench_private_online_drafter_keeps_the_hybrid_split(tiny_model):
    """An adapting bench method drafts like its frozen twin (same @D split) with its own
    drafter objects and memory; the frozen drafter is left unwrapped and the head shared."""
    from ltd.bench.methods import private_online_adapter

    shipped = _hybrid(tiny_model, model_depth=1)
    adapter = private_online_adapter(shipped, "knn")
    drafter = adapter.drafter
    assert isinstance(drafter, HybridDrafter) and drafter.model_depth == 1
    assert isinstance(drafter.model, KnnDrafter) and drafter.model.knn is adapter.knn
    assert drafter.model.inner is not shipped.model and drafter.model.inner.head is shipped.model.head
    assert drafter.ngram is not shipped.ngram and isinstance(shipped.model, Eagle3Drafter)
    again = private_online_adapter(shipped, "knn")  # a restart starts from an empty memory
    assert again.knn is not adapter.knn and len(again.knn) == 0
