"""The transformers backend on a tiny random Llama: tree scoring, incremental scoring,
commit and rollback against plain sequential decoding (fp32)."""

from __future__ import annotations

import pytest
import torch

from ltd.backends.hf import HFBackend
from ltd.tree import depths_from_parents

ATOL = 1e-4
# Hidden states reach |x| ~ 50 on the tiny model, where fp32 rounding of a different
# reduction order (AVX-512 kernels sum in 16 lanes, AVX2 in 8) alone moves them by
# ~1e-4; a wrong mask or position moves them by O(1). So features get a relative term.
FEATURE_RTOL = 1e-5
PROMPT = [3, 17, 42, 8, 77, 5, 23, 61, 9]
FEATURE_LAYERS = [1, 2, 3]


def random_parents(n: int, seed: int, roots: int = 1) -> list[int]:
    """Parents of a random tree (``roots`` nodes attached to the context, parent -1)."""
    g = torch.Generator().manual_seed(seed)
    parents = [-1] * roots
    for i in range(roots, n):
        parents.append(int(torch.randint(0, i, (), generator=g)))
    return parents


def random_tokens(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def root_path(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@torch.inference_mode()
def sequential(model, tokens: list[int]):
    """Plain full forward (no cache, causal): logits [T, V] and hidden states."""
    out = model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
    return out.logits[0].float(), out.hidden_states


def committed_backend(model, prompt: list[int]) -> HFBackend:
    b = HFBackend(model)
    b.score(prompt, list(range(-1, len(prompt) - 1)))
    b.commit(list(range(len(prompt))))
    return b


def cache_tensors(b: HFBackend) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in b.cache.layers]


@pytest.mark.parametrize("n,seed,roots", [(1, 0, 1), (6, 1, 1), (15, 2, 1), (24, 3, 1), (12, 4, 3)])
def test_tree_logits_equal_sequential_decoding(tiny_model, n, seed, roots):
    vocab = tiny_model.config.vocab_size
    parents = random_parents(n, seed, roots)
    tokens = random_tokens(n, seed, vocab)
    b = committed_backend(tiny_model, PROMPT)
    out = b.score(tokens, parents, FEATURE_LAYERS)
    assert out.logits.shape == (n, vocab) and out.logits.dtype == torch.float32
    assert out.features.shape == (n, len(FEATURE_LAYERS) * tiny_model.config.hidden_size)
    assert b.speculative_length == n and b.committed_length == len(PROMPT)
    for i in range(n):
        path = root_path(parents, i)
        ref_logits, ref_hidden = sequential(tiny_model, PROMPT + [tokens[j] for j in path])
        torch.testing.assert_close(out.logits[i], ref_logits[-1], atol=ATOL, rtol=0, msg=f"logits of node {i} (path {path})")
        ref_feat = torch.cat([ref_hidden[layer][0, -1] for layer in FEATURE_LAYERS])
        torch.testing.assert_close(out.features[i], ref_feat, atol=ATOL, rtol=FEATURE_RTOL, msg=f"features of node {i}")


def test_prefill_logits_and_features_equal_full_forward(tiny_model):
    b = HFBackend(tiny_model)
    out = b.score(PROMPT, list(range(-1, len(PROMPT) - 1)), FEATURE_LAYERS)
    ref_logits, ref_hidden = sequential(tiny_model, PROMPT)
    torch.testing.assert_close(out.logits, ref_logits, atol=ATOL, rtol=0)
    ref_feat = torch.cat([ref_hidden[layer][0] for layer in FEATURE_LAYERS], dim=-1)
    torch.testing.assert_close(out.features, ref_feat, atol=ATOL, rtol=FEATURE_RTOL)


@pytest.mark.parametrize("cuts", [[5], [1, 2, 3, 4], [7, 13]])
def test_incremental_scoring_equals_scoring_at_once(tiny_model, cuts):
    """Scoring a tree over several calls (parents indexing all speculative entries so far,
    as the LM drafter does one depth at a time) gives the same logits as one call."""
    n = 18
    parents = random_parents(n, seed=11, roots=2)
    tokens = random_tokens(n, seed=11, vocab=tiny_model.config.vocab_size)
    whole = committed_backend(tiny_model, PROMPT).score(tokens, parents).logits

    b = committed_backend(tiny_model, PROMPT)
    bounds = [0] + cuts + [n]
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        pieces.append(b.score(tokens[lo:hi], parents[lo:hi]).logits)
        assert b.speculative_length == hi
    torch.testing.assert_close(torch.cat(pieces), whole, atol=ATOL, rtol=0)
    assert b._spec_depths == depths_from_parents(torch.tensor(parents)).tolist()


@pytest.mark.parametrize("n,seed,node", [(10, 5, None), (16, 6, None), (8, 7, 0), (12, 8, "mid")])
def test_commit_equals_sequential_decoding_of_path(tiny_model, n, seed, node):
    parents = random_parents(n, seed)
    tokens = random_tokens(n, seed, tiny_model.config.vocab_size)
    if node is None:  # the deepest node (latest on ties)
        depths = depths_from_parents(torch.tensor(parents)).tolist()
        node = max(range(n), key=lambda i: (depths[i], i))
    elif node == "mid":
        node = n // 2
    path = root_path(parents, node)

    b = committed_backend(tiny_model, PROMPT)
    b.score(tokens, parents)
    b.commit(path)
    assert b.committed_length == len(PROMPT) + len(path)
    assert b.speculative_length == 0

    ref = committed_backend(tiny_model, PROMPT + [tokens[j] for j in path])
    assert ref.committed_length == b.committed_length
    assert len(b.cache.layers) == len(ref.cache.layers) == tiny_model.config.num_hidden_layers
    for li, (got, want) in enumerate(zip(b.cache.layers, ref.cache.layers)):
        assert got.keys.shape == want.keys.shape, f"layer {li} keys shape"
        torch.testing.assert_close(got.keys, want.keys, atol=ATOL, rtol=0, msg=f"layer {li} keys")
        torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0, msg=f"layer {li} values")

    # the next token sees exactly the committed context, through the chain fast path and
    # through a tree (mask) pass alike
    nxt = [19, 33]
    got = b.score(nxt, [-1, 0]).logits
    want = ref.score(nxt, [-1, 0]).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    full, _ = sequential(tiny_model, PROMPT + [tokens[j] for j in path] + nxt)
    torch.testing.assert_close(got, full[-2:], atol=ATOL, rtol=0)
    got_tree = b.score([50, 51], [-1, -1]).logits  # two siblings after the context
    b.rollback()
    for tok, row in zip([50, 51], got_tree):
        full, _ = sequential(tiny_model, PROMPT + [tokens[j] for j in path] + [tok])
        torch.testing.assert_close(row, full[-1], atol=ATOL, rtol=0)


def test_commit_across_several_score_calls(tiny_model):
    """Commit a path whose nodes were scored in different calls (the cycle's verify is one
    call, but the backend contract allows more)."""
    b = committed_backend(tiny_model, PROMPT)
    b.score([10, 11], [-1, -1])  # entries 0, 1
    b.score([12, 13], [1, 0])  # entries 2 (child of 1), 3 (child of 0)
    b.score([14], [2])  # entry 4 (child of 2)
    b.commit([1, 2, 4])
    ref = committed_backend(tiny_model, PROMPT + [11, 12, 14])
    for got, want in zip(b.cache.layers, ref.cache.layers):
        torch.testing.assert_close(got.keys, want.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)


def test_commit_chain_fast_path_and_empty_commit(tiny_model):
    b = committed_backend(tiny_model, PROMPT[:4])
    b.score(PROMPT[4:7], [-1, 0, 1])
    b.commit([0, 1, 2])  # already in place
    assert b.committed_length == 7
    b.score([90, 91], [-1, 0])
    b.commit([])  # keep nothing: same as a rollback
    assert b.committed_length == 7 and b.speculative_length == 0
    assert all(layer.keys.shape[2] == 7 for layer in b.cache.layers)
    ref = committed_backend(tiny_model, PROMPT[:7])
    torch.testing.assert_close(b.score([5], [-1]).logits, ref.score([5], [-1]).logits, atol=ATOL, rtol=0)


def test_commit_of_a_prefix_drops_the_rest_without_a_gather(tiny_model, monkeypatch):
    """A rejected draft keeps a prefix of the entries: the cache is cut, never gathered."""
    from ltd import cache_ops

    b = committed_backend(tiny_model, PROMPT[:4])
    b.score([PROMPT[4], 77, 78, 79], [-1, 0, 1, 0])  # root, a chain under it, a sibling
    monkeypatch.setattr(cache_ops, "keep_positions", lambda *a: pytest.fail("gathered a prefix"))
    b.commit([0, 1])
    assert b.committed_length == 6 and all(layer.keys.shape[2] == 6 for layer in b.cache.layers)
    ref = committed_backend(tiny_model, PROMPT[:5] + [77])
    torch.testing.assert_close(b.score([5, 6], [-1, 0]).logits, ref.score([5, 6], [-1, 0]).logits, atol=ATOL, rtol=0)


def test_rollback_restores_exactly(tiny_model):
    b = committed_backend(tiny_model, PROMPT)
    before = cache_tensors(b)
    first = b.score([4], [-1]).logits
    b.rollback()
    b.score(random_tokens(9, 3, 96), random_parents(9, 3, roots=2))
    b.score([1, 2], [8, 9])
    b.rollback()
    assert b.speculative_length == 0 and b.committed_length == len(PROMPT)
    for (k0, v0), layer in zip(before, b.cache.layers):
        assert torch.equal(layer.keys, k0) and torch.equal(layer.values, v0)
    assert torch.equal(b.score([4], [-1]).logits, first)


@pytest.mark.parametrize(
    "keep",
    [
        [1],  # parent of entry 1 is entry 0, not the context
        [0, 2],  # entry 2 hangs under entry 1
        [0, 0],  # repeated
        [0, 1, 3, 2],  # out of order
        [5],  # beyond the speculative entries
        [-1],
    ],
)
def test_commit_of_non_path_raises(tiny_model, keep):
    b = committed_backend(tiny_model, PROMPT)
    before = cache_tensors(b)
    b.score([10, 11, 12, 13], [-1, 0, 1, 2])
    with pytest.raises(ValueError):
        b.commit(keep)
    # a refused commit changes nothing: the committed cache is intact and a valid commit still works
    assert b.committed_length == len(PROMPT) and b.speculative_length == 4
    for (k0, _), layer in zip(before, b.cache.layers):
        assert torch.equal(layer.keys[:, :, : len(PROMPT)], k0)
    b.commit([0, 1])
    assert b.committed_length == len(PROMPT) + 2


def test_speculative_entries_never_leak_into_committed_context(tiny_model):
    """Entries scored but not committed must not be visible to the next committed pass."""
    b = committed_backend(tiny_model, PROMPT)
    b.score([70, 71, 72], [-1, 0, 0])
    b.commit([0, 2])
    out = b.score([33], [-1]).logits[0]
    full, _ = sequential(tiny_model, PROMPT + [70, 72, 33])
    torch.testing.assert_close(out, full[-1], atol=ATOL, rtol=0)


def test_preallocated_cache_grows_and_commits_in_place(tiny_model, monkeypatch):
    """With a 4-position first buffer every few scores outgrow it: entries must survive
    each growth, non-prefix commits copy only the accepted rows into the same buffer, and
    the result matches a plain prefill of the committed text."""
    from ltd import cache_ops

    monkeypatch.setattr(cache_ops, "MIN_CAPACITY", 4)
    b = committed_backend(tiny_model, PROMPT[:2])
    text = list(PROMPT[:2])
    for step in range(6):
        tokens = random_tokens(7, step, 96)
        parents = random_parents(7, step)
        b.score(tokens, parents)
        keep = root_path(parents, 6)  # the path to the last node: not a prefix
        assert keep != list(range(len(keep)))
        buffers = [layer._key_buffer for layer in b.cache.layers]
        b.commit(keep)
        text += [tokens[i] for i in keep]
        # the commit moved rows inside each layer's own buffer, allocating nothing
        assert all(layer._key_buffer is buf for layer, buf in zip(b.cache.layers, buffers))
        assert all(layer.keys.shape[2] == len(text) for layer in b.cache.layers)
    assert all(isinstance(layer, cache_ops.PreallocatedLayer) for layer in b.cache.layers)
    ref = committed_backend(tiny_model, text)
    torch.testing.assert_close(b.score([5, 6], [-1, 0]).logits, ref.score([5, 6], [-1, 0]).logits, atol=ATOL, rtol=0)
