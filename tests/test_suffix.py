"""The suffix drafter: matching, the count-scored trie, the bounded global store and its
persistence, and losslessness on both backends."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from conftest import assert_same_tokens, first_difference, hf_greedy, run_decode
from ltd.control import StaticController
from ltd.drafting.ngram import DEFAULT_RELIABILITY
from ltd.drafting.suffix import STORE_FILES, SuffixConfig, SuffixDrafter, SuffixStore, TokenIndex, parse_suffix_spec, suffix_stats
from ltd.errors import LtdError
from ltd.tree import Tree

Q = DEFAULT_RELIABILITY


def _root(drafter: SuffixDrafter, tokens: list[int], k: int = 3):
    drafter.reset()
    drafter.sync(tokens, None)
    tree = Tree.root(tokens[-1])
    toks, logps = drafter.root(tree, k)
    return tree, toks, logps


def test_longest_match_and_counts_give_the_probabilities():
    #       a  b  c  x  a  b  c  y  a  b  c  y  a  b  c
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3, 7, 1, 2, 3]
    drafter = SuffixDrafter(SuffixConfig(alpha=2.0, min_prob=0.0))
    tree, toks, logps = _root(drafter, seq)
    st = drafter.stats
    # the suffix "1 2 3 7 1 2 3" last occurred ending at position 10 (then "7 ..."); "9 1 2 3" breaks it earlier
    assert st.match_length == 7 and st.source == "context"
    assert toks[0].item() == 7 and st.occurrences == 1 and st.best_count == 1
    assert logps[0].item() == pytest.approx(math.log(Q[6]))  # q(7) * 1/1
    assert st.best_prob == pytest.approx(Q[6])
    # two occurrences with different continuations split the count
    seq2 = [5, 6, 1, 5, 6, 2, 5, 6]
    tree, toks, logps = _root(SuffixDrafter(SuffixConfig(min_prob=0.0)), seq2)
    assert sorted(toks[:2].tolist()) == [1, 2]
    assert logps[:2].tolist() == pytest.approx([math.log(Q[1] / 2)] * 2)  # q(2) * 1/2 each
    assert logps[2].item() == -math.inf


def test_draft_depth_is_capped_by_alpha_times_match_and_max_depth():
    rng = np.random.default_rng(0)
    text = rng.integers(10, 1000, 200).tolist()
    for alpha, m, cap in [(1.0, 40, 32), (0.5, 40, 20), (1.0, 10, 10)]:
        drafter = SuffixDrafter(SuffixConfig(alpha=alpha, max_depth=32))
        _root(drafter, text + text[:m])
        assert drafter.stats.match_length == m
        assert drafter.stats.depth == drafter.stats.chain == cap
        assert drafter.stats.score == pytest.approx(sum(math.log(Q[min(m + d, len(Q)) - 1]) for d in range(cap)))
    deep = SuffixDrafter(SuffixConfig(alpha=2.0, max_depth=48))
    _root(deep, text + text[:60])
    assert deep.stats.depth == 48  # depth 32 or more when asked


def test_expansion_follows_the_trie_by_path_and_prunes_unlikely_nodes():
    seq = [1, 2, 3, 4, 5, 1, 2, 3, 4, 6, 1, 2, 3]
    drafter = SuffixDrafter(SuffixConfig(min_prob=0.0, alpha=4.0))
    tree, toks, logps = _root(drafter, seq, k=2)
    assert toks[0].item() == 4
    first = tree.add(toks, torch.zeros(2, dtype=torch.long), logps)
    ctoks, clp = drafter.expand(tree, first, 2)
    assert sorted(ctoks[0].tolist()) == [5, 6] and clp[1].tolist() == [-math.inf, -math.inf]
    # a probability floor above the two-way split prunes both children
    pruned = SuffixDrafter(SuffixConfig(min_prob=0.4, alpha=4.0))
    tree, toks, logps = _root(pruned, seq, k=2)
    first = tree.add(toks, torch.zeros(2, dtype=torch.long), logps)
    ctoks, clp = pruned.expand(tree, first, 2)
    assert not torch.isfinite(clp).any()


def test_no_match_drafts_only_padding():
    drafter = SuffixDrafter()
    _, toks, logps = _root(drafter, [1, 2, 3, 4])
    assert not torch.isfinite(logps).any() and drafter.stats.match_length == 0


def test_store_matches_past_outputs_and_the_context_wins_ties():
    rng = np.random.default_rng(1)
    past = rng.integers(10, 1000, 50).tolist()
    drafter = SuffixDrafter()
    drafter.enable_store()
    drafter.reset()
    drafter.sync([7, 8, past[0]], None)  # the first sync: prompt [7, 8] + pending token
    drafter.sync([7, 8] + past, None)
    drafter.reset()
    assert drafter.store.index.tokens().tolist() == [-1] + past  # the output is stored, not the prompt
    _root(drafter, [3, 4] + past[10:20])
    assert drafter.stats.source == "store" and drafter.stats.match_length == 10


def test_token_index_evicts_in_order():
    index = TokenIndex(2)
    index.extend([1, 2, 1, 2, 3])
    assert index.entries == 4
    index.drop_front(2)
    assert index.tokens().tolist() == [1, 2, 3] and index.base == 2 and index.entries == 2
    assert list(index.positions[(1 << 32) | 2]) == [3]


def test_store_memory_stays_within_its_budget():
    rng = np.random.default_rng(2)
    store = SuffixStore(budget=1000)
    for i in range(200):
        store.add(rng.integers(0, 50, int(rng.integers(2, 300))).tolist())
        assert len(store) <= 1000
        assert store.index.entries <= len(store)  # one index entry per stored position at most
        assert store.index.buf.size <= 2 * 1000 + 1024 or store.index.buf.size <= 4 * len(store) + 1024
        assert sum(store.lengths) == len(store)
    assert store.requests == 200 and len(store.lengths) < 200  # old requests were evicted
    # the index holds exactly the stored n-grams
    toks = store.index.tokens().tolist()
    live = sum(1 for a, b in zip(toks, toks[1:]) if a >= 0 and b >= 0)
    assert store.index.entries == live == sum(len(d) for d in store.index.positions.values())
    # a request longer than the whole budget keeps its tail
    store.add(list(range(5000)))
    assert len(store) == 1000 and store.index.tokens()[-1] == 4999


def test_store_survives_save_and_restore(tmp_path):
    rng = np.random.default_rng(3)
    store = SuffixStore(budget=500)
    for _ in range(20):
        store.add(rng.integers(0, 100, 60).tolist())
    store.write_files(tmp_path)
    back = SuffixStore(budget=500)
    back.read_files(tmp_path)
    assert back.index.tokens().tolist() == store.index.tokens().tolist()
    assert list(back.lengths) == list(store.lengths) and back.requests == store.requests
    assert back.index.positions.keys() == store.index.positions.keys()
    # a smaller budget keeps the newest requests only
    small = SuffixStore(budget=100)
    small.read_files(tmp_path)
    assert len(small) <= 100 and small.index.tokens().tolist() == store.index.tokens().tolist()[-len(small):]


@pytest.mark.parametrize("damage", ["json", "tensors", "lengths"])
def test_corrupt_store_is_refused_with_the_reset_command(tmp_path, damage):
    store = SuffixStore(budget=500)
    store.add(list(range(40)))
    store.write_files(tmp_path)
    if damage == "json":
        (tmp_path / STORE_FILES[0]).write_text("{not json")
    elif damage == "tensors":
        (tmp_path / STORE_FILES[1]).write_bytes(b"garbage")
    else:
        from safetensors.torch import save_file

        save_file({"tokens": torch.arange(10), "lengths": torch.tensor([7])}, str(tmp_path / STORE_FILES[1]))
    with pytest.raises(LtdError) as err:
        SuffixStore(budget=500).read_files(tmp_path)
    msg = str(err.value)
    assert f"ltd online reset {tmp_path}" in msg and "\n" not in msg


def test_online_memory_saves_and_restores_the_suffix_store(tmp_path):
    """``--online memory --online-state DIR`` persists a suffix drafter's global store."""
    from ltd.drafting.hybrid import HybridDrafter
    from ltd.drafting.base import NullDrafter
    from ltd.online import OnlineAdapter
    from ltd.online.adapter import has_state

    drafter = HybridDrafter(SuffixDrafter(), NullDrafter())
    adapter = OnlineAdapter(drafter, "memory")
    assert adapter.store is drafter.ngram.store
    drafter.reset()
    drafter.sync(list(range(100, 111)), None)  # prompt 100..109, pending 110
    drafter.sync(list(range(100, 160)), None)
    adapter.save_state(tmp_path / "state")  # remembers the request being served
    assert has_state(tmp_path / "state")
    fresh = SuffixDrafter()
    again = OnlineAdapter(fresh, "memory")
    again.load_state(tmp_path / "state")
    assert fresh.store.index.tokens().tolist() == [-1] + list(range(110, 160))
    assert fresh.store.index.positions.keys() == drafter.ngram.store.index.positions.keys()
    (tmp_path / "state" / STORE_FILES[0]).write_text("[]")
    with pytest.raises(LtdError, match="ltd online reset"):
        OnlineAdapter(SuffixDrafter(), "memory").load_state(tmp_path / "state")


def test_spec_parsing_and_engine_loading():
    from ltd.drafting.hybrid import HybridDrafter, split_hybrid_spec
    from ltd.engine import load_drafter

    assert parse_suffix_spec("suffix").config.max_depth == 32
    assert parse_suffix_spec("suffix:48").config.max_depth == 48
    for bad in ("suffix:0", "suffix:x"):
        with pytest.raises(LtdError, match="suffix:D"):
            parse_suffix_spec(bad)
    assert isinstance(load_drafter("suffix", target=None), SuffixDrafter)
    assert split_hybrid_spec("hybrid:suffix+builtin:x@1") == ("suffix", "builtin:x@1")
    with pytest.raises(LtdError, match="hybrid:suffix"):
        split_hybrid_spec("hybrid:prefix+builtin:x")
    hybrid = HybridDrafter(SuffixDrafter(), SuffixDrafter())
    assert suffix_stats(hybrid) is hybrid.ngram.stats


PROMPT = [3, 17, 42, 8, 77, 5, 23, 3, 17, 42, 8, 61, 9, 3, 17, 42, 8, 77, 5]


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 2, 6), (32, 1, 32), (12, 2, 16)])
def test_suffix_is_lossless_on_hf(tiny_model, tiny_backend, shape):
    """Greedy output with the suffix drafter equals transformers' generate, token for token,
    also when the second run drafts deep chains from the store of the first."""
    ref = hf_greedy(tiny_model, PROMPT, 60)
    d, k, v = shape
    drafter = SuffixDrafter()
    drafter.enable_store()
    for run in range(2):
        got, results = run_decode(tiny_backend, drafter, StaticController(depth=d, topk=k, size=v), PROMPT, 60)
        assert_same_tokens(got, ref, tiny_model, PROMPT, f"suffix static {shape}, run {run}")
    # the second run repeats the stored output: drafts were accepted, deep ones where the tree allows
    assert max(r.num_accepted for r in results[1:]) >= min(d, v, 8)
    assert len(results) - 1 < 60 // 2 or d == 1


def test_hybrid_suffix_is_lossless_on_hf(tiny_model, other_model, tiny_backend):
    from ltd.backends.hf import HFBackend
    from ltd.drafting.hybrid import HybridDrafter
    from ltd.drafting.lm import LMDrafter

    ref = hf_greedy(tiny_model, PROMPT, 40)
    for depth in (None, 1):
        drafter = HybridDrafter(SuffixDrafter(), LMDrafter(HFBackend(other_model)), model_depth=depth)
        drafter.ngram.enable_store()
        for _ in range(2):  # the second run also drafts from the store of the first
            got, _ = run_decode(tiny_backend, drafter, StaticController(depth=8, topk=2, size=12), PROMPT, 40)
            assert_same_tokens(got, ref, tiny_model, PROMPT, f"hybrid suffix @{depth}")


@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_suffix_is_lossless_on_llamacpp_exact():
    """Deep suffix trees emit llama.cpp's plain greedy output token for token (exact mode)."""
    from test_llamacpp_exact import CHAT, TEXT, new_backend, tokenize

    from ltd.backends.llamacpp import LlamaCppModel, batch_dependent_kernels
    from ltd.models import registry_gguf
    from ltd.registry import REGISTRY

    mp = pytest.MonkeyPatch()
    mp.setenv("LTD_LLAMACPP_EXACT", "1")
    try:
        try:
            lmodel = LlamaCppModel(registry_gguf(REGISTRY["smollm2-135m"]))
        except LtdError as exc:
            pytest.skip(str(exc))
        if batch_dependent_kernels(lmodel.llama_cpp):
            pytest.skip("llama-cpp-python built with llamafile kernels; exact tests need CMAKE_ARGS=-DGGML_LLAMAFILE=OFF")
        backend = new_backend(lmodel)
        drafter = SuffixDrafter()
        drafter.enable_store()
        accepted = 0
        for text in (CHAT[0], TEXT + TEXT[:200]):
            prompt = tokenize(lmodel, text)
            ref = backend.greedy_generate(prompt, 32)
            for shape in ((32, 1, 32), (8, 2, 12)):
                d, k, v = shape
                got, results = run_decode(backend, drafter, StaticController(depth=d, topk=k, size=v), prompt, 32, topk=k)
                pos = first_difference(got, ref)
                assert pos is None, f"suffix {shape} on {text[:30]!r}: differs from plain greedy at token {pos}"
                accepted += sum(r.num_accepted for r in results[1:])
        assert accepted > 0
        backend.close()
    finally:
        mp.undo()


# -- whole-tree drafting ----------------------------------------------------------------------


class _Room:
    """What a draft session reads from a target: its context size (no model runs here)."""

    max_context = 1 << 20


def _session_tree(drafter, tokens: list[int], k: int, depth: int, whole: bool) -> Tree:
    """The tree a cycle's draft session drafts for ``tokens``, per level or whole."""
    from ltd.cycle import DecodeState, begin

    drafter.reset()
    drafter.sync(tokens, None)
    session = begin(DecodeState(_Room(), drafter, list(tokens), 1), k, depth, whole=whole)
    while session.can_step:
        session.step()
    if whole:
        assert session.step_count == max(session.tree.max_depth, 1) and len(session.step_seconds) == session.step_count
    return session.finish()


def _scored(tree: Tree) -> tuple[list[int], list[int], list[float]]:
    """The tree without its padding (score -inf): tokens, parents and scores in index order."""
    keep = [0] + [i for i in range(1, len(tree)) if math.isfinite(float(tree.scores[i]))]
    where = {old: new for new, old in enumerate(keep)}
    parents = [where[int(tree.parents[i])] if i else -1 for i in keep]
    return [int(tree.tokens[i]) for i in keep], parents, [float(tree.scores[i]) for i in keep]


@pytest.mark.parametrize("kind", ["suffix", "ngram"])
def test_whole_tree_is_the_per_level_tree(kind):
    """One whole-tree step gives exactly the nodes (tokens, parents, float32 scores, order)
    that the per-level path scores, on repetitive random contexts of every shape."""
    from ltd.drafting.ngram import NgramDrafter

    rng = np.random.default_rng(7)
    deep = 0
    for _ in range(150):
        tokens = rng.integers(0, int(rng.integers(2, 16)), int(rng.integers(3, 250))).tolist()
        k, depth = int(rng.integers(1, 9)), int(rng.integers(1, 40))
        if kind == "suffix":
            cfg = SuffixConfig(min_prob=float(rng.choice([0.0, 0.1])), alpha=float(rng.choice([1.0, 3.0])))
            make = lambda: SuffixDrafter(cfg)  # noqa: E731
        else:
            make = NgramDrafter
        per_level = _scored(_session_tree(make(), tokens, k, depth, whole=False))
        whole = _session_tree(make(), tokens, k, depth, whole=True)
        assert _scored(whole) == per_level and torch.isfinite(whole.scores).all()
        deep += whole.max_depth > 3
    assert deep > 30  # the cases drafted real trees, not only empty ones


def test_static_depth_caps_the_whole_tree_and_stays_lossless(tiny_model, tiny_backend):
    """A static D x K x V verifies no node deeper than D although the suffix trie is
    deeper, and the output is still plain greedy's."""
    from ltd.control import HeuristicController

    ref = hf_greedy(tiny_model, PROMPT, 60)
    drafter = SuffixDrafter()
    drafter.enable_store()
    run_decode(tiny_backend, drafter, StaticController(depth=32, topk=2, size=32), PROMPT, 60)  # fills the store
    for controller, cap in ((StaticController(depth=3, topk=2, size=32), 3), (HeuristicController(depth=2, max_depth=4), 4)):
        got, results = run_decode(tiny_backend, drafter, controller, PROMPT, 60)
        assert_same_tokens(got, ref, tiny_model, PROMPT, f"whole tree under {type(controller).__name__}")
        depths = [r.depth for r in results[1:]]
        assert max(depths) == cap and all(d <= cap for d in depths)
        assert max(r.num_accepted for r in results[1:]) == cap  # the store's deep chains were cut at the cap
