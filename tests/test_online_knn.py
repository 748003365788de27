"""kNN drafting memory (``--online knn``): labels, votes, losslessness, state."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import hf_greedy, make_tiny_head, mean_accepted, run_decode
from ltd.backends.hf import HFBackend
from ltd.control import StaticController
from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.drafting.hybrid import HybridDrafter
from ltd.drafting.ngram import NgramDrafter
from ltd.errors import LtdError
from ltd.online import OnlineAdapter, reset_state
from ltd.online.knn import KnnConfig, KnnMemory

PROMPT = [5, 17, 33, 2, 41, 8, 19, 60]


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_entries_are_labelled_two_tokens_on_once_committed():
    mem = KnnMemory(hidden_size=2, fingerprint="x", cfg=KnnConfig(capacity=16, k=2))
    tokens = [10, 11, 12, 13]  # 13 is pending: entry j read tokens[j+1], is labelled tokens[j+2]
    mem.observe(0, _unit([[1, 0], [0, 1], [1, 1]]), tokens)
    assert len(mem) == 2  # entry 2 read 13 and waits for the token after it
    assert mem.read[:2].tolist() == [11, 12] and mem.labels[:2].tolist() == [12, 13]
    mem.observe(3, _unit([[1, -1]]), tokens + [14])  # one more committed token labels entry 2
    assert len(mem) == 3 and mem.read[2].item() == 13 and mem.labels[2].item() == 14
    mem.end_sequence()  # entry 3 (read 14) never got a label: dropped with its request
    mem.observe(0, _unit([[0, 1]]), [7, 8])
    assert len(mem) == 3


def test_votes_come_from_the_bucket_of_the_read_token_and_the_ring_keeps_the_newest():
    mem = KnnMemory(hidden_size=2, fingerprint="x", cfg=KnnConfig(capacity=16, k=2, temperature=0.01))
    mem._store(_unit([[1, 0], [0, 1], [1, 0.1]]), torch.tensor([5, 5, 6]), torch.tensor([40, 41, 42]))
    labels, weights = mem.votes(_unit([[1, 0]])[0], read_token=5)
    assert labels.tolist() == [40, 41] and weights[0] > 0.99  # the near key dominates
    assert mem.votes(_unit([[1, 0]])[0], read_token=6)[0].tolist() == [42]
    assert mem.votes(_unit([[1, 0]])[0], read_token=7) is None
    small = KnnMemory(hidden_size=2, fingerprint="x", cfg=KnnConfig(capacity=16))
    for i in range(20):
        small._store(_unit([[1, i]]), torch.tensor([i]), torch.tensor([i + 100]))
    assert len(small) == 16 and sorted(small.read.tolist()) == list(range(4, 20))


def test_mix_adds_votes_to_the_head_distribution():
    mem = KnnMemory(hidden_size=2, fingerprint="x", cfg=KnnConfig(capacity=16, k=4, weight=0.5))
    mem._store(_unit([[1, 0], [1, 0]]), torch.tensor([5, 5]), torch.tensor([3, 90]))  # 90: outside the draft vocab
    d2t = torch.tensor([0, 1, 2, 3])  # draft vocab = target ids 0..3 of 100
    t2d = torch.full((100,), -1, dtype=torch.long)
    t2d[d2t] = torch.arange(4)
    head = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]]))
    toks, logp = mem.mix(head, d2t, t2d, _unit([[1, 0], [1, 0]]), [5, 9], k=3)
    p = logp.exp()
    # row 0: 0 -> 0.35, 3 -> 0.05 + 0.25, 90 -> 0.25
    assert toks[0].tolist() == [0, 3, 90]
    assert torch.allclose(p[0], torch.tensor([0.35, 0.30, 0.25]), atol=1e-5)
    # row 1 read a token nobody stored: the head's own top-3
    assert toks[1].tolist()[0] == 0 and torch.allclose(p[1][0], torch.tensor(0.7))


def _hybrid(tiny_model, seed=3):
    head = make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=seed)
    return HybridDrafter(NgramDrafter(), Eagle3Drafter(head, tiny_model.get_input_embeddings()), model_depth=None)


def test_knn_is_lossless_and_a_repeated_request_accepts_more(tiny_model):
    """The memory learns the target's continuations; the output never changes."""
    backend = HFBackend(tiny_model)
    ref = hf_greedy(tiny_model, PROMPT, 40)
    head = make_tiny_head(tiny_model, draft_vocab_size=96, layer_ids=[1, 2, 3], seed=3)
    drafter = Eagle3Drafter(head, tiny_model.get_input_embeddings())
    frozen, r0 = run_decode(backend, drafter, StaticController(4, 4, 8), PROMPT, 40)
    adapter = OnlineAdapter(drafter, "knn")
    assert drafter.knn is adapter.knn and not adapter.learns_from_commits
    first, r1 = run_decode(backend, drafter, StaticController(4, 4, 8), PROMPT, 40)
    second, r2 = run_decode(backend, drafter, StaticController(4, 4, 8), PROMPT, 40)
    assert frozen == ref and first == ref and second == ref
    # every committed position but the last two of each request is stored
    assert 0 < adapter.knn.added <= 2 * (len(PROMPT) + 40 - 2)
    assert mean_accepted(r2) > mean_accepted(r0) and mean_accepted(r2) >= 3.0


def test_knn_state_round_trips_and_bad_states_are_refused(tiny_model, tmp_path):
    backend = HFBackend(tiny_model)
    drafter = _hybrid(tiny_model)
    adapter = OnlineAdapter(drafter, "knn+memory")
    run_decode(backend, drafter, StaticController(3, 4, 6), PROMPT, 24)
    state = tmp_path / "state"
    adapter.save_state(state)
    again = OnlineAdapter(_hybrid(tiny_model), "knn+memory")
    again.load_state(state)
    n = len(adapter.knn)
    assert len(again.knn) == n > 0
    assert torch.equal(again.knn.keys[:n], adapter.knn.keys[:n]) and torch.equal(again.knn.labels[:n], adapter.knn.labels[:n])
    # a store built on another head is refused: its keys mean nothing to this one
    other = OnlineAdapter(_hybrid(tiny_model, seed=4), "knn+memory")
    with pytest.raises(LtdError, match="another draft head"):
        other.load_state(state)
    # corrupt tensors or metadata
    (state / "knn.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LtdError, match="corrupt"):
        OnlineAdapter(_hybrid(tiny_model), "knn+memory").load_state(state)
    adapter.save_state(state)
    meta = json.loads((state / "knn.json").read_text())
    meta["hidden_size"] = 7
    (state / "knn.json").write_text(json.dumps(meta))
    with pytest.raises(LtdError, match="another version or head size"):
        OnlineAdapter(_hybrid(tiny_model), "knn+memory").load_state(state)
    # a state without a kNN memory, for a variant that needs one
    plain_state = tmp_path / "memory-only"
    OnlineAdapter(_hybrid(tiny_model), "memory").save_state(plain_state)
    with pytest.raises(LtdError, match="is for --online memory"):
        OnlineAdapter(_hybrid(tiny_model), "knn+memory").load_state(plain_state)
    assert reset_state(state) and not state.exists()


def test_knn_needs_a_head_and_valid_settings(tiny_model):
    with pytest.raises(LtdError, match="EAGLE-3 head"):
        OnlineAdapter(NgramDrafter(), "knn")
    with pytest.raises(LtdError, match="capacity >= 16"):
        KnnMemory(hidden_size=4, fingerprint="x", cfg=KnnConfig(capacity=4))
