"""The n-gram drafter: matching, the trie and its scores, and losslessness on hf."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_same_tokens, hf_greedy, run_decode
from ltd.control import StaticController
from ltd.cycle import DecodeState, DraftSession
from ltd.drafting.base import NullDrafter
from ltd.drafting.ngram import NgramDrafter, build_trie, find_matches, parse_ngram_spec, top_children
from ltd.errors import LtdError
from ltd.tree import Tree, select


def test_find_matches_prefers_the_longest_suffix():
    #        0  1  2  3  4  5  6  7  8  9
    seq = [1, 2, 3, 9, 2, 3, 7, 5, 2, 3]
    n, ends = find_matches(seq, max_n=3)
    assert n == 2  # "2 3" occurs before; "5 2 3" does not
    assert ends == [5, 2]  # most recent first
    n, ends = find_matches(seq, max_n=1)
    assert (n, ends) == (1, [5, 2])
    assert find_matches([4, 5, 6], max_n=3) == (0, [])
    assert find_matches([4], max_n=3) == (0, [])


def test_find_matches_caps_the_number_of_occurrences():
    seq = [7] * 20
    n, ends = find_matches(seq, max_n=2, max_matches=3)
    assert n == 2 and ends == [18, 17, 16]


def test_trie_counts_and_scores():
    # after the suffix "1": continuations "2 3", "2 4", "5"
    seq = [1, 2, 3, 1, 2, 4, 1, 5, 1]
    n, ends = find_matches(seq, max_n=1)
    trie = build_trie(seq, ends, max_len=2)
    assert trie.count == 3
    assert {t: c.count for t, c in trie.children.items()} == {2: 2, 5: 1}
    toks, logps = top_children(trie, 3, match_length=1, reliabilities=(0.4, 0.8))
    assert toks[:2] == [2, 5]
    # q(1) = 0.4 times the share of the three matches
    assert logps[0] == pytest.approx(math.log(0.4 * 2 / 3)) and logps[1] == pytest.approx(math.log(0.4 * 1 / 3))
    assert logps[2] == -math.inf  # padding
    two = trie.children[2]
    assert sorted(two.children) == [3, 4] and two.depth == 1
    # one token deeper the match is two tokens long: q(2) = 0.8; beyond the table, its last entry
    _, deeper = top_children(two, 2, match_length=1, reliabilities=(0.4, 0.8))
    assert deeper == pytest.approx([math.log(0.8 / 2)] * 2)
    _, longest = top_children(two, 2, match_length=5, reliabilities=(0.4, 0.8))
    assert longest == pytest.approx([math.log(0.8 / 2)] * 2)


def test_reliabilities_must_be_probabilities():
    with pytest.raises(LtdError, match="reliabilities"):
        NgramDrafter(reliabilities=(0.5, 1.5))


def test_drafter_tree_follows_the_trie_and_pads():
    seq = [1, 2, 3, 1, 2, 4, 1, 5, 1]
    drafter = NgramDrafter(max_n=3, max_len=4)
    drafter.sync(seq, None)
    tree = Tree.root(seq[-1])
    toks, logps = drafter.root(tree, 2)
    assert toks.tolist() == [2, 5]
    added = tree.add(toks, torch.zeros(2, dtype=torch.long), logps)
    ctoks, clp = drafter.expand(tree, added, 2)
    assert ctoks.shape == (2, 2)
    assert sorted(ctoks[0].tolist()) == [3, 4]  # after "1 2": "3" and "4" (each seen once)
    # "1 5" was followed by "1" once
    assert ctoks[1, 0].item() == 1 and clp[1, 1].item() == -math.inf
    drafter.end()


def test_no_match_drafts_only_padding_that_is_never_selected():
    drafter = NgramDrafter()
    drafter.sync([10, 11, 12], None)
    tree = Tree.root(12)
    toks, logps = drafter.root(tree, 4)
    assert torch.isinf(logps).all()
    tree.add(toks, torch.zeros(4, dtype=torch.long), logps)
    assert select(tree, 4).tree.num_drafted == 0


REPEAT = [5, 6, 7, 8, 9, 5, 6]  # "5 6" was followed by "7 8 9"


def draft_tree(drafter, seq=REPEAT, depth: int = 3, topk: int = 2):
    """Draft ``depth`` levels on ``seq`` with no target (n-gram-style drafters need none)."""
    state = DecodeState(target=None, drafter=drafter, tokens=seq, prompt_length=len(seq))
    drafter.sync(seq, None)
    session = DraftSession(state, topk=topk, max_depth=depth)
    for _ in range(depth):
        session.step()
    return session.finish()


def test_draft_session_builds_a_chain_from_a_repeat():
    best = select(draft_tree(NgramDrafter(max_n=2)), 3).tree
    assert best.tokens.tolist() == [6, 7, 8, 9]  # "5 6" was followed by "7 8 9"


def test_spec_parsing():
    assert parse_ngram_spec("ngram").max_n == 3
    assert parse_ngram_spec("ngram:5").max_n == 5
    with pytest.raises(LtdError):
        parse_ngram_spec("ngram:x")
    with pytest.raises(LtdError):
        parse_ngram_spec("ngram:0")


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 4), (5, 4, 12)])
def test_ngram_is_lossless_on_hf(tiny_model, tiny_backend, shape):
    """Greedy output with the n-gram drafter equals transformers' generate, token for token."""
    prompt = [3, 17, 42, 8, 77, 5, 23, 3, 17, 42, 8, 61, 9, 3, 17]
    ref = hf_greedy(tiny_model, prompt, 40)
    d, k, v = shape
    got, results = run_decode(tiny_backend, NgramDrafter(), StaticController(depth=d, topk=k, size=v), prompt, 40)
    assert_same_tokens(got, ref, tiny_model, prompt, f"ngram static {shape}")
    assert sum(r.size for r in results[1:]) > 0  # the prompt repeats: something was verified


def test_engine_loads_the_ngram_spec():
    from ltd.engine import load_drafter

    assert isinstance(load_drafter("ngram:2", target=None), NgramDrafter)
    assert isinstance(load_drafter("none", target=None), NullDrafter)


def test_hybrid_merges_candidates_by_best_score():
    from ltd.drafting.hybrid import merge_candidates

    ninf = -math.inf
    t, lp = merge_candidates(
        torch.tensor([[5, 6, 0]]), torch.tensor([[-0.1, -2.0, ninf]]),
        torch.tensor([[6, 7, 8]]), torch.tensor([[-0.5, -1.0, -3.0]]), 3,
    )
    assert t.tolist() == [[5, 6, 7]]
    assert lp[0].tolist() == pytest.approx([-0.1, -0.5, -1.0])


def test_hybrid_is_lossless_on_hf(tiny_model, other_model, tiny_backend):
    from ltd.backends.hf import HFBackend
    from ltd.drafting.hybrid import HybridDrafter
    from ltd.drafting.lm import LMDrafter

    prompt = [3, 17, 42, 8, 77, 5, 23, 3, 17, 42, 8, 61, 9, 3, 17]
    ref = hf_greedy(tiny_model, prompt, 30)
    drafter = HybridDrafter(NgramDrafter(), LMDrafter(HFBackend(other_model)))
    got, _ = run_decode(tiny_backend, drafter, StaticController(depth=3, topk=3, size=6), prompt, 30)
    assert_same_tokens(got, ref, tiny_model, prompt, "hybrid")


def test_hybrid_spec_errors():
    from ltd.drafting.hybrid import split_hybrid_spec

    assert split_hybrid_spec("hybrid:ngram:4+self") == ("ngram:4", "self")
    with pytest.raises(LtdError):
        split_hybrid_spec("hybrid:self")


class _FixedDrafter:
    """A model-drafter double: proposes token 99 everywhere and records the depths it expands."""

    feature_layers = None

    def __init__(self) -> None:
        self.expanded_depths: list[int] = []

    def reset(self) -> None:
        pass

    def sync(self, tokens, features) -> None:
        pass

    def _row(self, k):
        return [99] + [0] * (k - 1), [-3.0] + [-math.inf] * (k - 1)

    def root(self, tree, k):
        t, lp = self._row(k)
        return torch.tensor(t), torch.tensor(lp)

    def expand(self, tree, nodes, k):
        self.expanded_depths.extend(int(d) for d in tree.depths[nodes].tolist())
        rows = [self._row(k) for _ in nodes.tolist()]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    def end(self) -> None:
        pass


@pytest.mark.parametrize("model_depth, expanded", [(1, set()), (2, {1}), (None, {1, 2})])
def test_hybrid_model_depth_drafts_deeper_levels_with_ngrams_only(model_depth, expanded):
    from ltd.drafting.hybrid import HybridDrafter

    model = _FixedDrafter()
    tree = draft_tree(HybridDrafter(NgramDrafter(max_n=2), model, model_depth=model_depth))
    assert set(model.expanded_depths) == expanded  # the model drafts levels 1..model_depth only
    assert 99 in tree.tokens.tolist()  # its root-level candidate is in the tree
    assert select(tree, 3).tree.tokens.tolist() == [6, 7, 8, 9]  # the n-gram chain runs 3 deep


def test_hybrid_model_depth_is_lossless_on_hf(tiny_model, other_model, tiny_backend):
    from ltd.backends.hf import HFBackend
    from ltd.drafting.hybrid import HybridDrafter
    from ltd.drafting.lm import LMDrafter

    prompt = [3, 17, 42, 8, 77, 5, 23, 3, 17, 42, 8, 61, 9, 3, 17]
    ref = hf_greedy(tiny_model, prompt, 30)
    drafter = HybridDrafter(NgramDrafter(), LMDrafter(HFBackend(other_model)), model_depth=1)
    got, _ = run_decode(tiny_backend, drafter, StaticController(depth=4, topk=3, size=6), prompt, 30)
    assert_same_tokens(got, ref, tiny_model, prompt, "hybrid@1")


def test_hybrid_model_depth_spec():
    from ltd.drafting.hybrid import split_model_depth

    assert split_model_depth("builtin:smollm2-135m-eagle3@1") == ("builtin:smollm2-135m-eagle3", 1)
    assert split_model_depth("self") == ("self", None)
    assert split_model_depth("/data/runs@v2/head") == ("/data/runs@v2/head", None)  # a path, not a depth
    for bad in ("self@0", "@2"):
        with pytest.raises(LtdError, match="DRAFTER@D"):
            split_model_depth(bad)
