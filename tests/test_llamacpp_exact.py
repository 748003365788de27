"""llama.cpp's KV cell layout after commits, and exact greedy output with deep trees.

llama.cpp sums attention over KV cells in cell order, with SIMD lanes grouped by cell
index, so a token's logits depend on *which cells* hold its context, not only on the
positions: the same context in another layout rounds differently (up to ~1 logit on
SmolLM2 Q4_1). The backend keeps sequential decoding's layout: a tree's first-child chain
takes the cells right after the context, and a commit moves accepted entries that sat
after rejected ones into the cells sequential decoding would use. Logits are then bit-
identical to plain decoding for every node whose path is in those cells (``exact``), and
greedy acceptance stops before any other node, so greedy output equals plain decoding.

The layout test reads llama.cpp's own cell dump (``LLAMA_KV_CACHE_DEBUG``) and runs on any
build; the logit tests need batch-size-independent kernels (``LTD_LLAMACPP_EXACT=1`` and
llama-cpp-python built with ``-DGGML_LLAMAFILE=OFF``) and are skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from conftest import first_difference, run_decode
from ltd.drafting.base import ReversedDrafter
from ltd.control import StaticController
from ltd.drafting.lm import LMDrafter
from ltd.drafting.ngram import NgramDrafter
from ltd.errors import LtdError

# every test here runs the embedded GGUF on llama.cpp
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")]

TEXT = (
    "The quick brown fox jumps over the lazy dog near the river bank while the sun sets slowly behind the hills. "
    "Scientists have discovered that many species of birds use the magnetic field of the earth to navigate. "
    "In the early days of computing, programs were written on punched cards and fed into enormous machines. "
    "A good cup of coffee depends on fresh beans, the right grind, clean water, and a careful eye on time. "
)
CHAT = [
    "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain how photosynthesis works in simple terms.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nList five tips for staying productive while working from home.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def exact_env():
    """``LTD_LLAMACPP_EXACT=1`` while this module's models and contexts are created."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LTD_LLAMACPP_EXACT", "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def lmodel(exact_env):
    from ltd.backends.llamacpp import LlamaCppModel
    from ltd.models import registry_gguf
    from ltd.registry import REGISTRY

    try:
        return LlamaCppModel(registry_gguf(REGISTRY["smollm2-135m"]))
    except LtdError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def exact_kernels(lmodel):
    from ltd.backends.llamacpp import batch_dependent_kernels

    if batch_dependent_kernels(lmodel.llama_cpp):
        pytest.skip(
            "this llama-cpp-python was built with llamafile kernels (LLAMAFILE = 1), whose logits depend on the "
            "batch size; exact tests need CMAKE_ARGS=-DGGML_LLAMAFILE=OFF"
        )


def tokenize(lmodel, text: str) -> list[int]:
    lc = lmodel.llama_cpp
    raw = text.encode()
    buf = (lc.llama_token * (len(raw) + 16))()
    n = lc.llama_tokenize(lmodel.vocab, raw, len(raw), buf, len(buf), True, True)
    assert n > 0
    return list(buf[:n])


def new_backend(lmodel, max_context=1024, **kw):
    from ltd.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(lmodel, threads=1, max_context=max_context, **kw)


@pytest.fixture(scope="module")
def backend(lmodel, exact_env):
    return new_backend(lmodel)


@pytest.fixture(scope="module")
def reference(lmodel, exact_env):
    return new_backend(lmodel)


@pytest.fixture(scope="module")
def long_text(lmodel):
    return tokenize(lmodel, TEXT * 6)


def sequential_logits(b, context, tokens):
    """Logits after each of ``tokens`` following ``context``, as plain decoding computes
    them: all in sequential cells (with exact kernels the batch size changes nothing)."""
    prefill(b, context)
    out = b.score(tokens, list(range(-1, len(tokens) - 1))).logits
    b.reset()
    return out


def prefill(b, tokens):
    b.reset()
    b.score(tokens, list(range(-1, len(tokens) - 1)), last_only=True)
    b.commit(list(range(len(tokens))))


# -- layout --------------------------------------------------------------------------


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _cell_positions(lines: list[str]) -> list[int | None]:
    """The last position table llama.cpp's find_slot printed: one entry per cell, None if free."""
    for line in reversed(lines):
        words = [w for w in line.split() if w != "*"]
        if len(words) >= 256 and all(w == "." or w.isdigit() for w in words):
            return [None if w == "." else int(w) for w in words]
    raise AssertionError("llama.cpp printed no KV cell table (LLAMA_KV_CACHE_DEBUG)")


def test_commits_keep_sequential_decodings_cell_layout(lmodel, monkeypatch):
    """After every commit sequence 0 holds positions 0..n-1 in cells 0..n-1, nothing else.

    llama.cpp prints its cells before placing a batch when LLAMA_KV_CACHE_DEBUG > 2 (read
    when a context is created); the table is read at the next score() of one token.
    """
    monkeypatch.setenv("LLAMA_KV_CACHE_DEBUG", "3")
    b = new_backend(lmodel, max_context=96, tree_room=64)
    monkeypatch.delenv("LLAMA_KV_CACHE_DEBUG")
    native = logging.getLogger("ltd.llama_cpp")
    handler = _Lines()
    level = native.level
    native.addHandler(handler)
    native.setLevel(logging.DEBUG)
    try:
        # root with 3 children; child 1 has children 4, 5; child 2 has child 6; 6 has child 7
        tokens = [504, 3525, 314, 2683, 359, 1115, 30, 42]
        parents = [-1, 0, 0, 0, 1, 1, 2, 6]
        keeps = [[0, 1, 4], [0, 2, 6, 7], [0, 3], [0], [], [0, 1, 5], [0, 2, 6]]
        prefill(b, list(range(10, 30)))
        for keep in keeps:
            n = b.committed_length
            b.score(tokens, parents)
            b.commit(keep)
            handler.lines.clear()
            b.score([99], [-1])
            b.rollback()
            cells = _cell_positions(handler.lines)
            want = list(range(n + len(keep)))
            assert cells[: len(want)] == want, f"after commit {keep}: cells hold {cells[: len(want) + 4]}"
            assert all(c is None for c in cells[len(want) :]), f"after commit {keep}: cells beyond the context are in use"
    finally:
        native.removeHandler(handler)
        native.setLevel(level)
        b.close()


# -- exact logits ----------------------------------------------------------------------


def test_chain_nodes_are_exact_and_marked(backend, reference, long_text, exact_kernels):
    """The first-child chain is decoded first: its logits equal plain decoding bit for bit
    and the backend marks exactly those nodes exact (here across llama.cpp's 256-cell
    attention window: the tree needs 512 cells, plain decoding of the chain 256)."""
    context = long_text[:250]
    tokens = [504, 3525, 314, 2683, 359, 1115, 30, 42, 7]
    parents = [-1, 0, 0, 0, 1, 2, 1, 4, 7]  # chain: 0 -> 1 -> 4 -> 7 -> 8
    prefill(backend, context)
    out = backend.score(tokens, parents)
    backend.rollback()
    chain = [0, 1, 4, 7, 8]
    assert out.exact is not None
    assert out.exact.tolist() == [i in chain for i in range(len(tokens))]
    want = sequential_logits(reference, context, [tokens[i] for i in chain])
    assert torch.equal(out.logits[chain], want)


def test_next_tokens_after_an_off_chain_commit_equal_sequential_decoding(backend, reference, long_text, exact_kernels):
    """Accepting a child decoded after rejected siblings: once its own logits are exact, the
    next tokens' logits must be too, which needs its cell moved next to the context.

    Without the move (the child stays after the holes, the next token fills a hole) the
    100-token cases gave logits off by 0.74 (measured on SmolLM2 Q4_1, AVX2).
    """
    checked = 0
    for ctx_len, gaps in [(100, [1, 3, 6]), (60, [2])]:
        context = long_text[:ctx_len]
        truth = long_text[ctx_len : ctx_len + 5]
        want = sequential_logits(reference, context, truth)
        for gap in gaps:
            tokens = [truth[0]] + [42 + i for i in range(gap)] + [truth[1]]
            parents = [-1] + [0] * (gap + 1)
            prefill(backend, context)
            out = backend.score(tokens, parents)
            backend.commit([0, gap + 1])
            nxt = backend.score(truth[2:], [-1, 0, 1]).logits
            backend.reset()
            if not torch.equal(out.logits[gap + 1], want[1]):
                continue  # the child itself was computed next to holes and rounds differently: nothing to compare
            checked += 1
            diff = float((nxt - want[2:]).abs().max())
            assert diff == 0.0, f"context {ctx_len}, {gap} rejected siblings: next tokens differ by {diff}"
    assert checked >= 1


@pytest.mark.parametrize("root_call", ["score", "score_next"])
def test_a_lone_root_then_a_tree_equals_one_batch(backend, reference, long_text, exact_kernels, root_call):
    """A lone root is decoded straight onto the context; a tree scored after it, a commit
    off its first-child chain and the next tokens give bit for bit the logits of the
    general path, where the root comes in one batch with its children."""
    context, truth = long_text[:80], long_text[80:84]
    tokens, parents = [truth[0], 42, truth[1]], [-1, 0, 0]  # the true child sits off the chain
    prefill(reference, context)
    whole = reference.score(tokens, parents).logits
    reference.commit([0, 2])
    want_next = reference.score(truth[2:], [-1, 0]).logits
    reference.reset()
    prefill(backend, context)
    if root_call == "score":
        assert torch.equal(backend.score(tokens[:1], [-1]).logits[0], whole[0])
    else:
        assert backend.score_next(tokens[0]) == int(torch.argmax(whole[0]))
    assert torch.equal(backend.score(tokens[1:], [0, 0]).logits, whole[1:])
    backend.commit([0, 2])
    got_next = backend.score(truth[2:], [-1, 0]).logits
    backend.reset()
    assert torch.equal(got_next, want_next)


@pytest.mark.parametrize("shape", [(4, 4, 8), (6, 4, 16)])
def test_deep_trees_equal_plain_greedy(lmodel, backend, exact_kernels, monkeypatch, shape):
    """Greedy static trees emit llama.cpp's plain greedy output token for token (exact mode),
    also when the accepted path leaves the first-child chain and acceptance must stop."""
    import ltd.cycle

    stops = []
    accept_tree = ltd.cycle.accept_tree

    def counting(tree, logits, sampling, generator=None):
        acc = accept_tree(tree, logits, sampling, generator)
        stops.append(acc)
        return acc

    monkeypatch.setattr(ltd.cycle, "accept_tree", counting)
    d, k, v = shape
    drafter_backend = new_backend(lmodel)
    n = 24
    try:
        for text in CHAT[:2]:
            prompt = tokenize(lmodel, text)
            ref = backend.greedy_generate(prompt, n)
            for name, drafter in [
                ("self", LMDrafter(drafter_backend)),
                ("reversed", ReversedDrafter(LMDrafter(drafter_backend))),
                ("ngram", NgramDrafter()),
            ]:
                stops.clear()
                got, results = run_decode(backend, drafter, StaticController(depth=d, topk=k, size=v), prompt, n, topk=k)
                pos = first_difference(got, ref)
                assert pos is None, f"{name} {shape} on {text[:40]!r}: differs from plain greedy at token {pos}"
                cut = sum(len(raw.path) > 1 + r.num_accepted for raw, r in zip(stops, results[1:]))
                if name == "self":
                    assert sum(r.num_accepted for r in results[1:]) > n // 2  # deep paths were accepted
                if name == "reversed":
                    assert cut > 0  # some accepted paths left the chain and were cut
    finally:
        drafter_backend.close()
