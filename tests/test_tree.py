"""Property tests of draft-tree invariants: selection, masks, depths, greedy acceptance.

Trees are built the way the cycle builds them, with :meth:`Tree.add` in batches whose
parents already exist, and with non-positive log-probability increments, so a child's
cumulative score never exceeds its parent's. Increments are drawn partly from a small
set of exactly representable values (0, -0.25, ...) so exact ties, including a child
tied with its own parent, are frequent.
"""

from __future__ import annotations

import pytest
import numpy as np
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ltd.acceptance import SamplingConfig, accept
from ltd.tree import Tree, ancestor_mask, depths_from_parents, select

SMALL_VOCAB = 5  # small, so sibling tokens repeat and acceptance paths get long

TIED_INCREMENTS = st.sampled_from([0.0, -0.25, -0.5, -1.0, -2.0])
FREE_INCREMENTS = st.floats(min_value=-8.0, max_value=0.0, allow_nan=False, allow_infinity=False, width=32)

# no example database: tests must not write outside tests/ (and runs stay deterministic)
settings.register_profile("ltd", max_examples=120, deadline=None, database=None, derandomize=True)
settings.load_profile("ltd")


@st.composite
def trees(draw, max_nodes: int = 40, increments=None, vocab: int = SMALL_VOCAB) -> Tree:
    """A random tree built with Tree.add in random batches."""
    if increments is None:
        increments = TIED_INCREMENTS | FREE_INCREMENTS
    n = draw(st.integers(min_value=0, max_value=max_nodes))
    tree = Tree.root(draw(st.integers(0, vocab - 1)))
    added = 0
    while added < n:
        start = len(tree)
        b = draw(st.integers(min_value=1, max_value=n - added))
        parents = [draw(st.integers(0, start - 1)) for _ in range(b)]
        incs = torch.tensor([draw(increments) for _ in range(b)], dtype=torch.float32)
        toks = torch.tensor([draw(st.integers(0, vocab - 1)) for _ in range(b)])
        parents_t = torch.tensor(parents, dtype=torch.long)
        scores = tree.scores[parents_t] + incs  # float32 add of a value <= 0: never above the parent
        idx = tree.add(toks, parents_t, scores)
        assert idx.tolist() == list(range(start, start + b))
        added += b
    return tree


def _check_selection(tree: Tree, size: int) -> None:
    sel = select(tree, size)
    sub, src = sel.tree, sel.source_index.tolist()
    n = tree.num_drafted
    expected = min(size, n)

    assert src[0] == 0, "the root must be selected, first"
    assert len(src) == expected + 1 == len(sub)
    assert len(set(src)) == len(src), "a node was selected twice"
    chosen = set(src)
    for i in src[1:]:
        assert int(tree.parents[i]) in chosen, f"node {i} selected without its parent {int(tree.parents[i])}"

    # the subtree is a valid tree in topological order that maps back to the full tree
    assert int(sub.parents[0]) == -1
    for j in range(1, len(sub)):
        pj = int(sub.parents[j])
        assert 0 <= pj < j, "parents must precede children in the selected tree"
        assert src[pj] == int(tree.parents[src[j]])
    assert torch.equal(sub.tokens, tree.tokens[sel.source_index])
    assert torch.equal(sub.depths, tree.depths[sel.source_index])
    assert torch.equal(sub.scores, tree.scores[sel.source_index])
    assert torch.equal(depths_from_parents(sub.parents), sub.depths)

    # best-V by score, as a multiset (well defined even with ties; a closed set with
    # these scores always exists because a child never scores above its parent)
    all_scores = sorted(tree.scores[1:].tolist(), reverse=True)
    got = sorted(sub.scores[1:].tolist(), reverse=True)
    assert got == all_scores[:expected]


@given(tree=trees(), data=st.data())
def test_select_invariants_with_ties(tree: Tree, data) -> None:
    size = data.draw(st.integers(min_value=0, max_value=tree.num_drafted + 5), label="size")
    _check_selection(tree, size)


@given(tree=trees(increments=st.floats(min_value=-8.0, max_value=-0.0009765625, allow_nan=False, width=32)), data=st.data())
def test_select_is_exact_top_v_without_ties(tree: Tree, data) -> None:
    scores = tree.scores[1:].tolist()
    assume(len(set(scores)) == len(scores))
    size = data.draw(st.integers(min_value=0, max_value=tree.num_drafted + 2), label="size")
    sel = select(tree, size)
    # without ties the top-V set itself is unique: compare sets of node indices
    order = sorted(range(1, len(tree)), key=lambda i: -scores[i - 1])
    assert set(sel.source_index.tolist()[1:]) == set(order[: min(size, tree.num_drafted)])
    _check_selection(tree, size)


def test_select_child_tied_with_parent_keeps_parent() -> None:
    """All-zero increments: every node ties with the root's children; closure must hold."""
    tree = Tree.root(0)
    tree.add(torch.tensor([1]), torch.tensor([0]), torch.tensor([0.0]))
    tree.add(torch.tensor([2, 3]), torch.tensor([1, 1]), torch.tensor([0.0, 0.0]))
    tree.add(torch.tensor([4]), torch.tensor([3]), torch.tensor([0.0]))
    for v in range(0, 6):
        _check_selection(tree, v)
    assert select(tree, 1).source_index.tolist() == [0, 1]


def test_select_negative_size_raises() -> None:
    with pytest.raises(ValueError):
        select(Tree.root(0), -1)


def test_add_rejects_missing_parent() -> None:
    tree = Tree.root(0)
    with pytest.raises(ValueError):
        tree.add(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([-1.0, -2.0]))


@given(tree=trees())
def test_ancestor_mask_rows_are_root_paths(tree: Tree) -> None:
    mask = ancestor_mask(tree.parents)
    assert mask.shape == (len(tree), len(tree)) and mask.dtype == torch.bool
    for i in range(len(tree)):
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(tree.path_to(i))
        path = tree.path_to(i)
        assert path[0] == 0 and path[-1] == i and len(path) == int(tree.depths[i]) + 1


@given(tree=trees())
def test_depths_from_parents_matches_tree(tree: Tree) -> None:
    assert torch.equal(depths_from_parents(tree.parents), tree.depths)


@given(tree=trees(max_nodes=20), cut=st.integers(min_value=1, max_value=20))
def test_ancestor_mask_of_forest(tree: Tree, cut: int) -> None:
    """The backend passes forests (-1 = attached to the committed context): drop the
    first ``cut`` nodes, re-root their orphans at -1, and rows are still the paths."""
    assume(cut < len(tree))
    parents = tree.parents[cut:] - cut
    parents = torch.where(parents < 0, torch.full_like(parents, -1), parents)
    mask = ancestor_mask(parents)
    depths = depths_from_parents(parents)
    for i in range(len(parents)):
        path, node = [], i
        while node >= 0:
            path.append(node)
            node = int(parents[node])
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(path)
        assert int(depths[i]) == len(path) - 1


def test_ancestor_mask_rejects_unordered_parents() -> None:
    with pytest.raises(ValueError):
        ancestor_mask(torch.tensor([-1, 2, 0]))


def _random_logits(tree: Tree, seed: int, bias_prob: float, vocab: int) -> torch.Tensor:
    """Random logits where, with probability ``bias_prob``, a node's argmax is the token of
    one of its children (so accepted paths of several tokens are common)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((len(tree), vocab), generator=g)
    kids = tree.children()
    for i in range(len(tree)):
        if kids[i] and float(torch.rand((), generator=g)) < bias_prob:
            c = kids[i][int(torch.randint(len(kids[i]), (), generator=g))]
            logits[i, int(tree.tokens[c])] = float(logits[i].max()) + 1.0
    return logits


@given(tree=trees(), seed=st.integers(0, 2**31 - 1), bias=st.sampled_from([0.0, 0.5, 1.0]))
def test_greedy_accept_follows_argmax(tree: Tree, seed: int, bias: float) -> None:
    logits = _random_logits(tree, seed, bias, SMALL_VOCAB)
    acc = accept(tree, logits, SamplingConfig(temperature=0.0))
    path = acc.path
    assert path[0] == 0
    assert acc.num_accepted == len(path) - 1
    for a, b in zip(path, path[1:]):
        assert int(tree.parents[b]) == a, "accepted nodes must form a root path"
        assert int(tree.tokens[b]) == int(torch.argmax(logits[a])), "each accepted token is the target's argmax"
    last = path[-1]
    assert acc.bonus == int(torch.argmax(logits[last])), "the bonus is the argmax at the last accepted node"
    kids = tree.children()[last]
    assert all(int(tree.tokens[c]) != acc.bonus for c in kids), "stopped although a child matched the argmax"


@given(tree=trees(max_nodes=20), seed=st.integers(0, 2**31 - 1))
def test_near_greedy_sampling_equals_greedy(tree: Tree, seed: int) -> None:
    """With a vanishing temperature the sampling rule must reduce to the greedy rule."""
    logits = _random_logits(tree, seed, 0.7, SMALL_VOCAB)
    top = torch.topk(logits, 2, dim=-1).values
    assume(bool(((top[:, 0] - top[:, 1]) > 0.05).all()))
    greedy = accept(tree, logits, SamplingConfig(temperature=0.0))
    g = torch.Generator().manual_seed(seed)
    sampled = accept(tree, logits, SamplingConfig(temperature=1e-3), generator=g)
    assert sampled.path == greedy.path and sampled.bonus == greedy.bonus


@given(tree=trees(), seed=st.integers(0, 2**31 - 1), bias=st.sampled_from([0.5, 1.0]))
def test_greedy_accept_stops_before_inexact_logits(tree: Tree, seed: int, bias: float) -> None:
    """With per-node exactness from the backend, greedy acceptance is the unrestricted path
    cut before its first inexact node, whose token (its exact parent's argmax) is the bonus."""
    from types import SimpleNamespace

    from ltd.cycle import Verified, accept as cycle_accept
    from ltd.tree import Selection

    logits = _random_logits(tree, seed, bias, SMALL_VOCAB)
    g = torch.Generator().manual_seed(seed)
    exact = torch.rand(len(tree), generator=g) < 0.7
    exact[0] = True
    state = SimpleNamespace(sampling=SamplingConfig(temperature=0.0), generator=None)
    sel = Selection(tree=tree, source_index=torch.arange(len(tree)))
    full = accept(tree, logits, SamplingConfig(temperature=0.0))
    got = cycle_accept(state, Verified(selection=sel, logits=logits, features=None, exact=exact))
    cut = next((t for t in range(1, len(full.path)) if not exact[full.path[t]]), None)
    if cut is None:
        assert (got.path, got.bonus) == (full.path, full.bonus)
    else:
        assert got.path == full.path[:cut]
        assert got.bonus == int(tree.tokens[full.path[cut]]) == int(torch.argmax(logits[full.path[cut - 1]]))
    assert all(bool(exact[i]) for i in got.path)
    same = cycle_accept(state, Verified(selection=sel, logits=logits, features=None))
    assert (same.path, same.bonus) == (full.path, full.bonus)


def _ancestor_mask_loop(parents: torch.Tensor) -> torch.Tensor:
    """The former Python-loop construction (each row copies its parent's row): the
    reference the tensor construction must equal."""
    n = int(parents.numel())
    mask = torch.zeros((n, n), dtype=torch.bool)
    for i, p in enumerate(parents.tolist()):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


@given(tree=trees(max_nodes=80), cut=st.integers(min_value=0, max_value=80))
def test_tensor_ancestor_mask_equals_the_loop(tree: Tree, cut: int) -> None:
    """Pointer doubling gives the loop's mask on trees and on forests (the backend's
    speculative entries: orphans re-rooted at -1), deep chains included."""
    assume(cut < len(tree))
    parents = tree.parents[cut:] - cut
    parents = torch.where(parents < 0, torch.full_like(parents, -1), parents)
    assert torch.equal(ancestor_mask(parents), _ancestor_mask_loop(parents))
    assert torch.equal(ancestor_mask(parents, check=False), _ancestor_mask_loop(parents))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 64, 65, 200])
def test_tensor_ancestor_mask_of_a_chain_is_lower_triangular(n: int) -> None:
    parents = torch.arange(-1, n - 1)
    assert torch.equal(ancestor_mask(parents), torch.ones((n, n), dtype=torch.bool).tril())


def test_add_subtree_appends_a_whole_tree_and_refuses_a_broken_one():
    """A subtree in one call equals the same nodes added level by level; parents after
    their children or depths that do not follow from the parents are refused."""
    by_level = Tree.root(7)
    first = by_level.add(torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([-0.5, -1.0]))
    by_level.add(torch.tensor([3]), first[:1], torch.tensor([-0.75]))
    whole = Tree.root(7)
    added = whole.add_subtree(np.array([1, 2, 3]), np.array([-1, -1, 0]), np.array([-0.5, -1.0, -0.75]), np.array([1, 1, 2]))
    assert added.tolist() == [1, 2, 3]
    for name in ("tokens", "parents", "depths", "scores"):
        assert torch.equal(getattr(whole, name), getattr(by_level, name)), name
    with pytest.raises(ValueError, match="before its children"):
        Tree.root(7).add_subtree([1, 2], [1, -1], [-1.0, -1.0], [2, 1])
    with pytest.raises(ValueError, match="depths"):
        Tree.root(7).add_subtree([1, 2], [-1, 0], [-1.0, -1.0], [1, 1])
    with pytest.raises(ValueError, match="as many"):
        Tree.root(7).add_subtree([1, 2], [-1, 0], [-1.0], [1, 2])
