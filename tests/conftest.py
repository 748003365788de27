"""Shared fixtures: tiny randomly initialised Llama targets, drafters and references.

The tiny models are real transformers ``LlamaForCausalLM`` instances (stock modeling
code, sdpa attention, ``DynamicCache``), just small enough that a forward pass costs
about a millisecond. Their weights are drawn with a larger ``initializer_range`` than
the transformers default (0.02) so that the logits are spread out: greedy outputs are
varied rather than one repeated token, and the top-2 margins (~1e-2) are far above the
fp32 differences between tree scoring and sequential decoding (~1e-6), so an argmax
flip can only come from a bug, not from rounding.
"""

from __future__ import annotations

from typing import Sequence

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ltd.models
from ltd.backends.hf import HFBackend
from ltd.cycle import CycleResult, accept, commit, decode, emit, select, start, verify
from ltd.drafting.base import NullDrafter
from ltd.tree import Tree
from ltd.drafting.eagle3 import Eagle3Config, Eagle3Head, init_random_head

# The tiny models are latency-bound; on a shared 2-core machine one intra-op thread is
# 5-20x faster than two contending ones (measured: ~5 ms vs ~100 ms per short decode).
torch.set_num_threads(1)

# -- e2e marking: a test that loads a real model must say so ---------------------------------
# ``make test-fast`` (``-m "not e2e"``) must stay quick, so loading a registry model (its
# converted weights or its GGUF) from a test without ``@pytest.mark.e2e`` fails loudly.
_real_models_allowed = True


def _guarded(fn, what):
    def wrapper(name, *args, **kwargs):
        entry_name = getattr(name, "name", name)
        if not _real_models_allowed and (not isinstance(name, str) or entry_name in ltd.models.REGISTRY):
            raise RuntimeError(f"this test loads the real model {entry_name!r} ({what}): mark it @pytest.mark.e2e")
        return fn(name, *args, **kwargs)

    return wrapper


ltd.models.resolve = _guarded(ltd.models.resolve, "weights")
ltd.models.registry_gguf = _guarded(ltd.models.registry_gguf, "GGUF")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _real_models_allowed
    _real_models_allowed = item.get_closest_marker("e2e") is not None


def pytest_runtest_teardown(item):
    global _real_models_allowed
    _real_models_allowed = True  # module fixtures may be torn down after their last e2e test


TINY_VOCAB = 96
TINY_MAX_POS = 256


def tiny_llama_config(
    vocab_size: int = TINY_VOCAB,
    hidden_size: int = 48,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = TINY_MAX_POS,
    initializer_range: float = 0.3,
) -> LlamaConfig:
    """A Llama config with no special tokens (callers choose eos ids explicitly)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def make_tiny_llama(seed: int = 0, **config_kwargs) -> LlamaForCausalLM:
    """A seeded, randomly initialised tiny Llama in eval mode (fp32, CPU)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kwargs)).eval()
    # No eos from the generation config: HF generate must run the full length unless
    # a test passes an eos id explicitly.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
    return model


def make_tiny_head(
    target: LlamaForCausalLM, draft_vocab_size: int, layer_ids: Sequence[int], seed: int = 0, sparse_vocab: bool = True
) -> Eagle3Head:
    """A random EAGLE-3 head for ``target``; with ``sparse_vocab`` the draft vocabulary is a
    random subset of target ids, so the d2t map is not the identity."""
    cfg = Eagle3Config.for_target(target.config, draft_vocab_size=draft_vocab_size)
    cfg.eagle_aux_hidden_state_layer_ids = list(layer_ids)
    draft_ids = None
    if sparse_vocab and cfg.draft_vocab_size < cfg.vocab_size:
        g = torch.Generator().manual_seed(seed + 1000)
        draft_ids = torch.sort(torch.randperm(cfg.vocab_size, generator=g)[: cfg.draft_vocab_size]).values
    return init_random_head(cfg, seed=seed, draft_ids=draft_ids)


@torch.inference_mode()
def hf_greedy(model: LlamaForCausalLM, prompt: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """transformers' own greedy ``generate``: the reference every method must equal."""
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=eos_token_id,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def run_decode(target, drafter, controller, prompt, max_new_tokens, topk=None, **kwargs) -> tuple[list[int], list[CycleResult]]:
    """Drive :func:`ltd.cycle.decode` to the end; returns (new tokens, cycle results)."""
    if topk is None:
        topk = getattr(controller, "topk", 8)
    results = list(decode(target, drafter, controller, prompt, max_new_tokens, topk=topk, **kwargs))
    tokens = [t for r in results for t in r.new_tokens]
    return tokens, results


def run_general_stages(target, prompt, max_new_tokens, sampling=None, seed=None) -> list[int]:
    """Plain decoding through the cycle's general stages: each cycle selects the root alone
    from a tree, verifies, accepts and commits it, with none of the root-only shortcuts
    of :func:`ltd.cycle.finish`. Returns the new tokens."""
    state, first = start(target, NullDrafter(), prompt, sampling, seed, max_new_tokens=max_new_tokens)
    out = list(first.new_tokens)
    while not state.done:
        verified = verify(state, select(Tree.root(state.pending), 0))
        out += emit(state, commit(state, verified, accept(state, verified)))
    return out


def mean_accepted(results: Sequence[CycleResult]) -> float:
    """Tokens added per speculative cycle (accepted drafts + bonus), prefill excluded."""
    cycles = results[1:]
    return sum(r.num_accepted + 1 for r in cycles) / len(cycles)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """First index where two token lists differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    if len(a) != len(b):
        return min(len(a), len(b))
    return None


@torch.inference_mode()
def top2_margin(model, context: Sequence[int]) -> float:
    """Top-1 minus top-2 logit of the model's next token after ``context``."""
    logits = model(torch.tensor([list(context)], dtype=torch.long)).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def assert_same_tokens(got: Sequence[int], ref: Sequence[int], model=None, prompt: Sequence[int] = (), label: str = "") -> None:
    """Token-for-token equality; on mismatch name the first differing position and the
    reference's top-2 logit margin there (below ~1e-4 would be a numerical tie)."""
    pos = first_difference(got, ref)
    if pos is None:
        return
    msg = f"{label}: outputs differ first at generated position {pos} (got {list(got[pos:pos + 4])}..., reference {list(ref[pos:pos + 4])}...)"
    if model is not None and pos < len(ref):
        msg += f"; reference top-2 logit margin there = {top2_margin(model, list(prompt) + list(ref[:pos])):.3g}"
    msg += f"; lengths got {len(got)} / reference {len(ref)}"
    raise AssertionError(msg)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    """The tiny target: vocab 96, hidden 48, 4 layers, 4 heads / 2 kv heads."""
    return make_tiny_llama(seed=0)


@pytest.fixture(scope="session")
def other_model() -> LlamaForCausalLM:
    """A different random model with the same vocabulary (a poor independent drafter)."""
    return make_tiny_llama(seed=1, hidden_size=32, num_layers=2)


@pytest.fixture(scope="session")
def tiny_head(tiny_model) -> Eagle3Head:
    """A random EAGLE-3 head on the tiny target, reading layers [1, 2, 3] of its
    ``output_hidden_states`` (5 entries for 4 layers), with a 64-token draft vocabulary."""
    return make_tiny_head(tiny_model, draft_vocab_size=64, layer_ids=[1, 2, 3], seed=0)


@pytest.fixture
def tiny_backend(tiny_model) -> HFBackend:
    """A fresh backend (own cache) over the shared tiny target."""
    return HFBackend(tiny_model)
