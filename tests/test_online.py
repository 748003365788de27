"""Online adaptation: lossless, learns only from verified positions, state round-trips."""

from __future__ import annotations


import pytest
import torch

from conftest import hf_greedy, make_tiny_head, run_decode
from ltd.backends.hf import HFBackend
from ltd.control import StaticController
from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.errors import LtdError
from ltd.online import OnlineConfig, OnlineLearner, reset_state

PROMPT = [5, 17, 33, 2, 41, 8, 19, 60]


def _learner(tiny_model, variant="plain", **kw):
    head = make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=3)
    drafter = Eagle3Drafter(head, tiny_model.get_input_embeddings())
    settings = dict(variant=variant, update_every=2, window=24, lr=1e-2, hedge_lrs=(0.0, 1e-2))
    settings.update(kw)
    cfg = OnlineConfig(**settings)
    return drafter, OnlineLearner(drafter, cfg)


@pytest.mark.parametrize("variant", ["plain", "optimistic", "hedge"])
def test_online_decoding_is_lossless_and_updates(tiny_model, variant):
    drafter, learner = _learner(tiny_model, variant)
    before = {n: p.detach().clone() for n, p in drafter.head.named_parameters()}
    ref = hf_greedy(tiny_model, PROMPT, 40)
    got, results = run_decode(HFBackend(tiny_model), drafter, StaticController(3, 3, 6), PROMPT, 40, listeners=[learner])
    assert got == ref
    assert learner.stats.updates >= 3
    changed = any(not torch.equal(before[n], p) for n, p in drafter.head.named_parameters())
    if variant == "hedge" and learner.stats.active_member == 0:
        assert not changed  # the frozen member is drafting
    else:
        assert changed


def test_buffer_holds_only_verified_positions(tiny_model):
    drafter, learner = _learner(tiny_model, update_every=10_000, window=200)
    got, results = run_decode(HFBackend(tiny_model), drafter, StaticController(3, 3, 6), PROMPT, 20, listeners=[learner])
    # prompt + every committed token except the final pending one were processed by the target
    committed = PROMPT + got[:-1]
    buffered = [t for t, _, _, _ in learner.buf]
    assert buffered == committed[-len(buffered):]
    assert learner.stats.positions_seen == len(committed)
    # each label is the target's own next-token distribution at that committed position
    with torch.no_grad():
        logits = tiny_model(torch.tensor([committed])).logits[0]
    for j, (_, _, ids, _) in enumerate(list(learner.buf)):
        pos = len(committed) - len(buffered) + j
        assert int(ids[0]) == int(logits[pos].argmax())


def test_state_round_trip_and_corrupt_state(tiny_model, tmp_path):
    drafter, learner = _learner(tiny_model, "hedge")
    run_decode(HFBackend(tiny_model), drafter, StaticController(3, 3, 6), PROMPT, 30, listeners=[learner])
    learner.save_state(tmp_path / "st")
    drafter2, learner2 = _learner(tiny_model, "hedge")
    learner2.load_state(tmp_path / "st")
    assert learner2.cum_score == learner.cum_score
    for n, p in drafter.head.named_parameters():
        assert torch.equal(p, dict(drafter2.head.named_parameters())[n])
    (tmp_path / "st" / "online.safetensors").write_bytes(b"garbage")
    with pytest.raises(LtdError, match="corrupt"):
        learner2.load_state(tmp_path / "st")
    _, plain = _learner(tiny_model, "plain")
    learner.save_state(tmp_path / "st2")
    with pytest.raises(LtdError, match="variant"):
        plain.load_state(tmp_path / "st2")
    assert reset_state(tmp_path / "st2")
    assert not (tmp_path / "st2").exists()


def test_unknown_variant_is_refused(tiny_model):
    head = make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=3)
    with pytest.raises(LtdError, match="variant"):
        OnlineLearner(Eagle3Drafter(head, tiny_model.get_input_embeddings()), OnlineConfig(variant="magic"))


def test_hybrid_drafter_adapts_its_head(tiny_model):
    """With the hybrid default (n-grams + head) online learning adapts the head inside it."""
    from ltd.drafting.base import NullDrafter
    from ltd.drafting.hybrid import HybridDrafter
    from ltd.drafting.ngram import NgramDrafter

    head_drafter, _ = _learner(tiny_model)
    hybrid = HybridDrafter(NgramDrafter(), head_drafter)
    learner = OnlineLearner(hybrid, OnlineConfig(variant="plain", update_every=2, window=24, lr=1e-2))
    assert learner.drafter is head_drafter
    before = {n: p.detach().clone() for n, p in head_drafter.head.named_parameters()}
    ref = hf_greedy(tiny_model, PROMPT, 30)
    got, _ = run_decode(HFBackend(tiny_model), hybrid, StaticController(3, 3, 6), PROMPT, 30, listeners=[learner])
    assert got == ref
    assert learner.stats.updates >= 3
    assert any(not torch.equal(before[n], p) for n, p in head_drafter.head.named_parameters())
    with pytest.raises(LtdError, match="EAGLE-3 head"):
        OnlineLearner(HybridDrafter(NgramDrafter(), NullDrafter()))


def test_half_precision_head_learns_through_float32_master_weights(tiny_model):
    """A bf16 head (the serving default) keeps drafting in bf16 while the steps train a
    float32 copy (steps of online size would vanish below bf16's resolution); each update
    publishes the learned weights to the drafting head; decoding stays lossless."""
    head = make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=3).to(torch.bfloat16)
    drafter = Eagle3Drafter(head, tiny_model.get_input_embeddings())
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    learner = OnlineLearner(drafter, OnlineConfig(variant="plain", update_every=2, window=24, lr=1e-2))
    assert all(p.dtype == torch.float32 for p in learner.head.parameters())
    got, _ = run_decode(HFBackend(tiny_model), drafter, StaticController(3, 3, 6), PROMPT, 30, listeners=[learner])
    assert got == hf_greedy(tiny_model, PROMPT, 30)
    assert learner.stats.updates >= 3
    assert drafter.head is head and all(p.dtype == torch.bfloat16 for p in head.parameters())
    learned = dict(learner.head.named_parameters())
    assert any(not torch.equal(before[n], p) for n, p in head.named_parameters())
    for n, _ in learner.params:  # the drafting head holds the master weights, rounded
        assert torch.equal(dict(head.named_parameters())[n], learned[n].detach().to(torch.bfloat16))


def test_bench_private_online_drafter_keeps_the_hybrid_split(tiny_model):
    """An adapting bench method drafts like its frozen twin: same @D split, own head copy."""
    from ltd.bench.methods import _private_online_drafter
    from ltd.drafting.hybrid import HybridDrafter
    from ltd.drafting.ngram import NgramDrafter
    from ltd.engine import Engine

    head = make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=3).to(torch.bfloat16)
    shipped = Eagle3Drafter(head, tiny_model.get_input_embeddings())
    engine = Engine.__new__(Engine)
    engine.drafter = HybridDrafter(NgramDrafter(), shipped, model_depth=1)
    drafter, adapter = _private_online_drafter(engine, "plain")
    learner = adapter.learner
    assert drafter.model_depth == 1
    assert drafter.model is not shipped and learner.drafter is drafter.model
    assert drafter.model.head is not shipped.head  # frozen methods keep the shipped weights
    assert next(learner.head.parameters()).dtype == torch.float32
    assert adapter.memory is None and drafter.ngram.memory is None
    # +memory: a private n-gram drafter with its own memory; the frozen methods' has none
    drafter, adapter = _private_online_drafter(engine, "memory")
    assert adapter.learner is None and drafter.model is shipped
    assert drafter.ngram is not engine.drafter.ngram and drafter.ngram.memory is adapter.memory
    assert engine.drafter.ngram.memory is None
    # +knn: a private drafter object holds the kNN memory; the head is shared (kNN never changes it)
    drafter, adapter = _private_online_drafter(engine, "knn")
    assert drafter.model is not shipped and drafter.model.head is shipped.head
    assert drafter.model.knn is adapter.knn and shipped.knn is None and drafter.model_depth == 1
