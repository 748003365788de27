"""The keystone: greedy speculative decoding emits exactly the target's greedy output.

For every drafter (none, the target itself, a different random model, a random EAGLE-3
head, and fake drafters that are always wrong or always right) and many static
(depth, topk, size) shapes, the tokens must equal transformers' ``generate`` token for
token. A good drafter may only change the speed, never the text.
"""

from __future__ import annotations

import copy
from typing import Sequence

import pytest
import torch

from conftest import (
    TINY_MAX_POS,
    assert_same_tokens,
    hf_greedy,
    make_tiny_head,
    make_tiny_llama,
    mean_accepted,
    run_decode,
)
from ltd.backends.hf import HFBackend
from ltd.control import StaticController
from ltd.drafting.base import NullDrafter
from ltd.drafting.eagle3 import WIDE_ROWS, Eagle3Drafter
from ltd.drafting.lm import LMDrafter
from ltd.tree import Tree

MAX_NEW = 40
PROMPTS = {
    "short": [5, 11, 60],
    "long": [3, 17, 42, 8, 77, 5, 23, 61, 9, 14, 88, 2, 35, 70],
}
# (depth, topk, size): single-node trees, chains, bushy trees, sizes above the tree size
SHAPES = [(1, 1, 1), (1, 4, 4), (3, 1, 3), (4, 3, 1), (3, 4, 8), (5, 8, 32), (2, 3, 100), (6, 2, 7)]


@pytest.fixture(scope="module")
def references(tiny_model) -> dict[str, list[int]]:
    return {name: hf_greedy(tiny_model, p, MAX_NEW) for name, p in PROMPTS.items()}


def make_drafter(kind: str, tiny_model, other_model, tiny_head):
    if kind == "self":
        return LMDrafter(HFBackend(tiny_model))
    if kind == "other":
        return LMDrafter(HFBackend(other_model))
    if kind == "eagle3":
        return Eagle3Drafter(tiny_head, tiny_model.get_input_embeddings())
    raise ValueError(kind)


def test_tiny_model_output_is_not_trivial(references):
    """The lossless tests are only meaningful if the greedy text varies."""
    for name, ref in references.items():
        assert len(ref) == MAX_NEW
        assert len(set(ref)) >= 8, f"prompt {name}: greedy output is nearly constant: {ref}"


@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_ar_equals_hf_generate(tiny_backend, tiny_model, references, prompt_name):
    prompt = PROMPTS[prompt_name]
    ctrl = StaticController(depth=0, topk=1, size=0)
    tokens, results = run_decode(tiny_backend, NullDrafter(), ctrl, prompt, MAX_NEW)
    assert_same_tokens(tokens, references[prompt_name], tiny_model, prompt, f"ar/{prompt_name}")
    assert all(r.num_accepted == 0 and r.size == 0 and len(r.new_tokens) == 1 for r in results)
    assert len(results) == MAX_NEW  # prefill + one token per cycle


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["self", "other", "eagle3"])
@pytest.mark.parametrize("prompt_name", list(PROMPTS))
def test_static_equals_greedy(tiny_backend, tiny_model, other_model, tiny_head, references, kind, shape, prompt_name):
    depth, topk, size = shape
    prompt = PROMPTS[prompt_name]
    drafter = make_drafter(kind, tiny_model, other_model, tiny_head)
    ctrl = StaticController(depth=depth, topk=topk, size=size)
    tokens, results = run_decode(tiny_backend, drafter, ctrl, prompt, MAX_NEW)
    assert_same_tokens(tokens, references[prompt_name], tiny_model, prompt, f"{kind} {shape}/{prompt_name}")
    for r in results[1:]:
        assert r.depth <= depth and r.size <= size and r.num_accepted <= r.depth
        assert r.drafted > 0
    if kind == "self":
        # the target drafting for itself: its top-1 chain is the greedy continuation
        assert mean_accepted(results) > 1.0
        if topk == 1 and size >= depth:
            assert mean_accepted(results) == depth + 1


def test_drafts_of_a_different_model_are_mostly_rejected(tiny_backend, tiny_model, other_model, references):
    prompt = PROMPTS["long"]
    tokens, results = run_decode(tiny_backend, LMDrafter(HFBackend(other_model)), StaticController(3, 4, 8), prompt, MAX_NEW)
    assert tokens == references["long"]
    assert mean_accepted(results) < 2.0


def test_speculation_right_up_to_the_context_limit(tiny_backend, tiny_model, other_model, tiny_head):
    """prompt + new tokens == max_position_embeddings: drafting must stop at the edge."""
    g = torch.Generator().manual_seed(3)
    new = 24
    prompt = torch.randint(0, tiny_model.config.vocab_size, (TINY_MAX_POS - new,), generator=g).tolist()
    ref = hf_greedy(tiny_model, prompt, new)
    for kind in ["self", "other", "eagle3"]:
        drafter = make_drafter(kind, tiny_model, other_model, tiny_head)
        tokens, _ = run_decode(tiny_backend, drafter, StaticController(6, 3, 12), prompt, new)
        assert_same_tokens(tokens, ref, tiny_model, prompt, f"{kind} at the context limit")


@pytest.mark.parametrize("kind", ["self", "other"])
def test_eos_stops_like_hf(tiny_backend, tiny_model, other_model, tiny_head, references, kind):
    """With an eos id, HF stops right after emitting it; so must we (eos kept)."""
    prompt = PROMPTS["long"]
    ref_full = references["long"]
    # an eos that first appears in the middle of the reference
    pos = next(i for i in range(6, MAX_NEW) if ref_full[i] not in ref_full[:i])
    eos = ref_full[pos]
    ref = hf_greedy(tiny_model, prompt, MAX_NEW, eos_token_id=eos)
    assert ref == ref_full[: pos + 1]
    for shape in [(0, 1, 0), (3, 4, 8), (5, 1, 5)]:
        drafter = NullDrafter() if shape[0] == 0 else make_drafter(kind, tiny_model, other_model, tiny_head)
        tokens, _ = run_decode(tiny_backend, drafter, StaticController(*shape), prompt, MAX_NEW, eos_token_ids=(eos,))
        assert_same_tokens(tokens, ref, tiny_model, prompt, f"{kind} {shape} with eos {eos}")


def test_eos_as_first_token(tiny_backend, tiny_model, references):
    prompt = PROMPTS["short"]
    eos = references["short"][0]
    tokens, results = run_decode(
        tiny_backend, LMDrafter(HFBackend(tiny_model)), StaticController(3, 2, 6), prompt, MAX_NEW, eos_token_ids=(eos,)
    )
    assert tokens == [eos] == hf_greedy(tiny_model, prompt, MAX_NEW, eos_token_id=eos)
    assert len(results) == 1


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_max_new_tokens_is_exact(tiny_backend, tiny_model, references, max_new):
    prompt = PROMPTS["long"]
    tokens, _ = run_decode(tiny_backend, LMDrafter(HFBackend(tiny_model)), StaticController(5, 1, 5), prompt, max_new)
    assert tokens == references["long"][:max_new]


# -- fake drafters with known behaviour ---------------------------------------------------


class _ReferenceDrafter:
    """Knows the target's greedy continuation; ``right`` proposes it first at every node on
    the correct path, otherwise every proposal avoids the correct next token."""

    feature_layers = None

    def __init__(self, full_reference: Sequence[int], vocab: int, right: bool) -> None:
        self.full = list(full_reference)
        self.vocab = vocab
        self.right = right
        self.tokens: list[int] = []
        self.calls = 0

    def reset(self) -> None:
        self.tokens = []

    def sync(self, tokens, features) -> None:
        assert features is None
        assert list(tokens) == self.full[: len(tokens)], "the cycle committed a token off the greedy path"
        self.tokens = list(tokens)

    def _propose(self, path_tokens: list[int], k: int) -> tuple[list[int], list[float]]:
        at = len(self.tokens)
        on_path = self.full[at : at + len(path_tokens)] == path_tokens
        correct = self.full[at + len(path_tokens)] if on_path else None
        others = [t for t in range(self.vocab) if t != correct]
        if self.right and correct is not None:
            toks = [correct] + others[: k - 1]
        else:
            toks = others[:k]
        return toks, [-float(i) for i in range(k)]  # the first candidate is the most likely

    def root(self, tree: Tree, k: int):
        self.calls += 1
        toks, lp = self._propose([], k)
        return torch.tensor(toks), torch.tensor(lp)

    def expand(self, tree: Tree, nodes: torch.Tensor, k: int):
        rows = [self._propose([int(tree.tokens[j]) for j in tree.path_to(int(n))[1:]], k) for n in nodes.tolist()]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    def end(self) -> None:
        pass


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 3), (4, 4, 16), (6, 1, 6), (2, 8, 100)])
def test_perfect_drafter_accepts_depth_plus_one(tiny_backend, tiny_model, shape):
    depth, topk, size = shape
    prompt = PROMPTS["long"]
    full = prompt + hf_greedy(tiny_model, prompt, MAX_NEW + depth + 2)
    drafter = _ReferenceDrafter(full, tiny_model.config.vocab_size, right=True)
    tokens, results = run_decode(tiny_backend, drafter, StaticController(depth, topk, size), prompt, MAX_NEW)
    assert_same_tokens(tokens, full[len(prompt) : len(prompt) + MAX_NEW], tiny_model, prompt, f"perfect {shape}")
    assert [r.num_accepted for r in results[1:]] == [depth] * (len(results) - 1)
    assert mean_accepted(results) == depth + 1


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 3), (4, 4, 16)])
def test_always_wrong_drafter_accepts_nothing(tiny_backend, tiny_model, shape):
    depth, topk, size = shape
    prompt = PROMPTS["short"]
    full = prompt + hf_greedy(tiny_model, prompt, MAX_NEW + depth + 2)
    drafter = _ReferenceDrafter(full, tiny_model.config.vocab_size, right=False)
    tokens, results = run_decode(tiny_backend, drafter, StaticController(depth, topk, size), prompt, MAX_NEW)
    assert_same_tokens(tokens, full[len(prompt) : len(prompt) + MAX_NEW], tiny_model, prompt, f"wrong {shape}")
    assert all(r.num_accepted == 0 for r in results[1:])
    assert mean_accepted(results) == 1.0
    assert drafter.calls == len(results) - 1


# -- the embedded model (SmolLM2-135M) -----------------------------------------------------

E2E_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
E2E_NEW = 24


@pytest.fixture(scope="module")
def smollm():
    # conftest keeps torch at one thread: on this shared 2-core machine two threads were
    # 3-6x slower for SmolLM2 too (contention with other jobs)
    from ltd.engine import Engine

    return Engine.load("smollm2-135m", drafter="self")


@pytest.fixture(scope="module")
def smollm_refs(smollm):
    from ltd.engine import GenerateConfig

    out = {}
    for text in E2E_PROMPTS:
        prompt = smollm.encode(text)
        out[text] = (prompt, smollm.generate(prompt, GenerateConfig(method="hf", max_new_tokens=E2E_NEW)).tokens)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("text", E2E_PROMPTS)
def test_smollm_ar_and_static_equal_hf(smollm, smollm_refs, text):
    from ltd.engine import GenerateConfig

    prompt, ref = smollm_refs[text]
    assert len(ref) > 0
    model = smollm.target.model
    ar = smollm.generate(prompt, GenerateConfig(method="ar", max_new_tokens=E2E_NEW))
    assert_same_tokens(ar.tokens, ref, model, prompt, f"ar vs hf on {text!r}")
    st = smollm.generate(prompt, GenerateConfig(method="static", max_new_tokens=E2E_NEW, depth=3, topk=4, size=8))
    assert_same_tokens(st.tokens, ref, model, prompt, f"static 3x4x8 (self drafter) vs hf on {text!r}")
    assert st.mean_accepted > 1.0  # the model drafting for itself is accepted
    assert st.text == ar.text


@pytest.mark.e2e
def test_smollm_random_eagle3_head_equals_hf(smollm, smollm_refs):
    from ltd.drafting.eagle3 import Eagle3Config, init_random_head
    from ltd.engine import Engine, GenerateConfig

    model = smollm.target.model
    cfg = Eagle3Config.for_target(model.config, draft_vocab_size=2048)
    engine = Engine(smollm.target, Eagle3Drafter(init_random_head(cfg, seed=0), model.get_input_embeddings()))
    for text, (prompt, ref) in smollm_refs.items():
        res = engine.generate(prompt, GenerateConfig(method="static", max_new_tokens=E2E_NEW, depth=3, topk=4, size=8))
        assert_same_tokens(res.tokens, ref, model, prompt, f"static 3x4x8 (random EAGLE-3 head) vs hf on {text!r}")


# -- the drafter contract that the cycle relies on ---------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("kind", ["self", "other", "eagle3"])
def test_drafter_returns_documented_shapes(tiny_backend, tiny_model, other_model, tiny_head, kind, k):
    """root -> ([k], [k]); expand(m nodes) -> ([m, k], [m, k]) for every m, including m == 1
    (the frontier has one node whenever topk == 1)."""
    from ltd.cycle import start

    drafter = make_drafter(kind, tiny_model, other_model, tiny_head)
    state, _ = start(tiny_backend, drafter, PROMPTS["long"])
    tree = Tree.root(state.pending)
    toks, lp = drafter.root(tree, k)
    assert toks.shape == (k,) and lp.shape == (k,)
    frontier = tree.add(toks, torch.zeros_like(toks), lp)
    for nodes in (frontier[:1], frontier):
        ctok, clp = drafter.expand(tree, nodes, k)
        assert ctok.shape == (len(nodes), k), f"{kind}: expand of {len(nodes)} node(s) returned ids of shape {tuple(ctok.shape)}"
        assert clp.shape == (len(nodes), k)
        assert bool((clp <= 0).all())
        tree.add(ctok, nodes.unsqueeze(1).expand_as(ctok), tree.scores[nodes].unsqueeze(1) + clp)
    drafter.end()


def _static_is_lossless(smollm, smollm_refs, drafter, shape, label: str) -> None:
    """Static trees of ``shape`` with ``drafter`` give the reference greedy tokens on every E2E prompt."""
    from ltd.engine import GenerateConfig

    d, k, v = shape
    saved = smollm.drafter
    smollm.drafter = drafter
    try:
        for text in E2E_PROMPTS:
            prompt, ref = smollm_refs[text]
            got = smollm.generate(prompt, GenerateConfig(method="static", max_new_tokens=E2E_NEW, depth=d, topk=k, size=v))
            assert_same_tokens(got.tokens, ref, smollm.target.model, prompt, f"{label} {shape} on {text!r}")
            assert got.mean_accepted >= 1.0
    finally:
        smollm.drafter = saved


@pytest.mark.e2e
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 8, 4), (4, 8, 16)])
@pytest.mark.parametrize("head_dtype", ["auto", "float32"])
def test_smollm_shipped_head_is_lossless(smollm, smollm_refs, shape, head_dtype):
    """The shipped EAGLE-3 head alone keeps greedy output unchanged (1x1x1 included), in
    the default bfloat16 weights and in float32: the head's precision moves drafts only."""
    from ltd.engine import load_drafter

    drafter = load_drafter("builtin:smollm2-135m-eagle3", smollm.target, head_dtype=head_dtype)
    want = torch.bfloat16 if head_dtype == "auto" else torch.float32
    assert all(p.dtype == want for p in drafter.head.parameters())
    _static_is_lossless(smollm, smollm_refs, drafter, shape, f"shipped head ({head_dtype})")


def test_wide_catch_up_runs_on_a_float32_twin_that_follows_the_weights():
    """A bfloat16 head catches up on a prompt in float32 (fast on a CPU without bf16
    arithmetic), stores what the half-precision head would read, and never serves stale
    weights after an online update."""
    target = make_tiny_llama(seed=8)
    half = make_tiny_head(target, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=2).to(torch.bfloat16)
    emb = target.get_input_embeddings()
    n = WIDE_ROWS + 4
    tokens = list(range(1, n + 2))
    feats = torch.randn(n, 3 * target.config.hidden_size)
    drafter = Eagle3Drafter(half, emb)
    drafter.sync(tokens, feats)
    drafter.root(None, 8)
    assert drafter._wide is not None and drafter._k.dtype == torch.bfloat16
    # the reference: float32 arithmetic on the same bf16-rounded weights, features and embeddings
    rounded = torch.nn.Embedding.from_pretrained(emb.weight.detach().to(torch.bfloat16).float())
    ref = Eagle3Drafter(copy.deepcopy(half).float(), rounded)
    ref.sync(tokens, feats.to(torch.bfloat16).float())
    ref.root(None, 8)
    assert torch.equal(drafter._k, ref._k.to(torch.bfloat16))
    assert torch.equal(drafter.node_hidden[0], ref.node_hidden[0].to(torch.bfloat16))
    twin = drafter._wide
    with torch.no_grad():
        half.fc.weight.add_(0.5)  # what the online learner does to the serving weights
    drafter.reset()
    drafter.sync(tokens, feats)
    drafter.root(None, 8)
    assert drafter._wide is not twin and torch.equal(drafter._wide.fc.weight, half.fc.weight.float())
    narrow = Eagle3Drafter(half, emb)  # a few positions: the half-precision head itself
    narrow.sync(tokens[:4], feats[:3])
    narrow.root(None, 8)
    assert narrow._wide is None


@pytest.mark.e2e
@pytest.mark.parametrize("shape", [(1, 8, 4), (4, 8, 16)])
def test_smollm_default_hybrid_drafter_is_lossless(smollm, smollm_refs, shape):
    """The default drafter (the shipped head and n-grams in one tree) keeps greedy output."""
    from ltd.drafting.hybrid import HybridDrafter
    from ltd.engine import default_drafter_spec, load_drafter

    drafter = load_drafter(default_drafter_spec("smollm2-135m"), smollm.target)
    assert isinstance(drafter, HybridDrafter)
    _static_is_lossless(smollm, smollm_refs, drafter, shape, "default drafter")


def test_default_drafter_spec_falls_back_per_backend(monkeypatch, tmp_path):
    """The hybrid default keeps its n-gram half where the head cannot run or is missing."""
    from ltd import engine

    assert engine.default_drafter_spec("smollm2-135m") == "hybrid:ngram+builtin:smollm2-135m-eagle3@1"
    assert engine.default_drafter_spec("smollm2-135m", "llamacpp") == "ngram"
    assert engine.default_drafter_spec("qwen2.5-coder-1.5b") == "qwen2.5-coder-0.5b"
    assert engine.default_drafter_spec("not-in-registry") == "none"
    monkeypatch.setattr(engine, "builtin_drafter_dir", lambda name: tmp_path / name)
    assert engine.default_drafter_spec("smollm2-135m") == "ngram"


@pytest.mark.e2e
def test_smollm_shipped_ltd_policies_are_lossless(smollm, smollm_refs):
    """The shipped LTD policies (the README's main job) with the default drafter keep greedy output."""
    from ltd.engine import GenerateConfig, default_drafter_spec, default_policy_dir, load_drafter

    assert (default_policy_dir("smollm2-135m") / "depth" / "policy.json").is_file()
    assert (default_policy_dir("smollm2-135m") / "size" / "policy.json").is_file()
    saved = smollm.drafter
    smollm.drafter = load_drafter(default_drafter_spec("smollm2-135m"), smollm.target)
    try:
        for text in E2E_PROMPTS:
            prompt, ref = smollm_refs[text]
            got = smollm.generate(prompt, GenerateConfig(method="ltd", max_new_tokens=E2E_NEW))
            assert_same_tokens(got.tokens, ref, smollm.target.model, prompt, f"shipped LTD policies on {text!r}")
    finally:
        smollm.drafter = saved
