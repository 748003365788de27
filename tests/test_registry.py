"""Methods and drafters come from registries: the spec strings users type, adding a kind
with one entry, per-call drafters and the llama.cpp backend found by capability."""

from __future__ import annotations

import pytest

import ltd.engine

from conftest import hf_greedy, make_tiny_head
from ltd.backends.hf import HFBackend
from ltd.control import StaticController
from ltd.drafting import load as drafter_load
from ltd.drafting.base import NullDrafter
from ltd.drafting.eagle3 import Eagle3Drafter, save_head
from ltd.drafting.hybrid import HybridDrafter
from ltd.drafting.lm import LMDrafter
from ltd.drafting.load import DrafterKind, load_drafter, register_drafter
from ltd.drafting.ngram import NgramDrafter
from ltd.engine import METHODS, Engine, GenerateConfig, Method, method_of, reference_method, register_method
from ltd.errors import LtdError
from ltd.models import LoadedModel

PROMPT = [3, 17, 42, 8, 3, 17]


class _Tok:
    """Enough of a tokenizer for Engine.result (decodes ids to a space-joined string)."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _target(model) -> LoadedModel:
    return LoadedModel(name="tiny", model=model, tokenizer=_Tok())


def test_every_spec_string_builds_its_drafter(tiny_model, tmp_path):
    target = _target(tiny_model)
    assert isinstance(load_drafter("none", None), NullDrafter) and isinstance(load_drafter("", None), NullDrafter)
    assert isinstance(load_drafter("ngram", None), NgramDrafter) and load_drafter("ngram:2", None).max_n == 2
    assert isinstance(load_drafter("self", target), LMDrafter)
    head_dir = tmp_path / "head"
    save_head(make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3]), head_dir)
    assert isinstance(load_drafter(str(head_dir), target), Eagle3Drafter)
    hybrid = load_drafter(f"hybrid:ngram:2+{head_dir}@1", target)
    assert isinstance(hybrid, HybridDrafter) and hybrid.model_depth == 1 and hybrid.ngram.max_n == 2
    assert isinstance(hybrid.model, Eagle3Drafter)
    with pytest.raises(LtdError, match="no built-in drafter 'builtin:nope'"):
        load_drafter("builtin:nope", target)
    with pytest.raises(LtdError, match="needs a target model"):
        load_drafter("self", None)


def test_a_new_drafter_kind_is_one_registry_entry(monkeypatch):
    monkeypatch.setattr(drafter_load, "DRAFTER_KINDS", list(drafter_load.DRAFTER_KINDS))
    made = []

    def build(spec, ctx):
        made.append(spec)
        return NgramDrafter(max_n=int(spec.split(":")[1]))

    register_drafter(DrafterKind("echo", lambda s: s.startswith("echo:"), build))
    assert drafter_load.DRAFTER_KINDS[-1].name == "model"  # the catch-all stays last
    assert load_drafter("echo:4", None).max_n == 4 and made == ["echo:4"]


def test_a_new_method_is_one_registry_entry(tiny_model, monkeypatch):
    monkeypatch.setattr(ltd.engine, "METHODS", dict(METHODS))  # the registry is restored after the test
    register_method(Method("two-deep", controller=lambda e, c: StaticController(2, 4, 6)))
    engine = Engine(_target(tiny_model), load_drafter("self", _target(tiny_model)))
    out = engine.generate(PROMPT, GenerateConfig(method="two-deep", max_new_tokens=12))
    assert out.tokens == hf_greedy(tiny_model, PROMPT, 12) and out.cycles < 12  # it drafted
    with pytest.raises(LtdError, match="unknown method 'nope'"):
        method_of("nope")


def test_generate_takes_the_drafter_per_call(tiny_model):
    """A caller's drafter is used for that call only; the engine's stays its own."""
    engine = Engine(_target(tiny_model))  # no drafter of its own
    with pytest.raises(LtdError, match="needs a drafter"):
        engine.generate(PROMPT, GenerateConfig(method="static", max_new_tokens=8, depth=2, topk=4, size=4))
    mine = load_drafter("self", _target(tiny_model))
    out = engine.generate(PROMPT, GenerateConfig(method="static", max_new_tokens=16, depth=3, topk=4, size=6), drafter=mine)
    assert out.tokens == hf_greedy(tiny_model, PROMPT, 16) and out.mean_accepted > 1.0
    assert isinstance(engine.drafter, NullDrafter)
    ar = engine.generate(PROMPT, GenerateConfig(method="ar", max_new_tokens=6), drafter=mine)
    assert ar.mean_accepted == 1.0  # ar never drafts, whatever drafter is passed


class _NativeGreedy:
    """A stand-in for a backend with its own greedy loop and tokenizer (llama.cpp's capabilities)."""

    def __init__(self, backend: HFBackend) -> None:
        self.inner = backend
        self.model = object()
        self.max_context = backend.max_context

    def greedy_generate(self, prompt, max_new_tokens, eos_ids=()):
        return hf_greedy(self.inner.model, prompt, max_new_tokens)

    def tokenize(self, text, add_special=True):
        return [int(t) for t in text.split()]


def test_the_llamacpp_backend_is_found_by_capability(tiny_model):
    hf = Engine(_target(tiny_model))
    assert hf.backend_name == "hf" and hf.reference_method == "hf" == reference_method("hf")
    native = Engine(_target(tiny_model), backend=_NativeGreedy(HFBackend(tiny_model)))
    assert native.backend_name == "llamacpp" and native.reference_method == "llama.cpp" == reference_method("llamacpp")
    out = native.generate(PROMPT, GenerateConfig(method="llama.cpp", max_new_tokens=8))
    assert out.tokens == hf_greedy(tiny_model, PROMPT, 8)
    with pytest.raises(LtdError, match="method hf is transformers' generate"):
        native.generate(PROMPT, GenerateConfig(method="hf", max_new_tokens=8))
    with pytest.raises(LtdError, match="method llama.cpp needs --backend llamacpp"):
        hf.generate(PROMPT, GenerateConfig(method="llama.cpp", max_new_tokens=8))
    assert native.prompt_tokenizer("4 5") == [4, 5]
