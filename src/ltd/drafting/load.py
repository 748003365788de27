"""Drafters by spec: one registry entry per kind of drafter.

The user-facing spec strings: ``none``; ``ngram`` or ``ngram:N`` (continuations found in
the text so far); ``suffix`` or ``suffix:D`` (deep drafts from the longest earlier match,
:mod:`ltd.drafting.suffix`); ``hybrid:ngram[:N]+DRAFTER[@D]`` or
``hybrid:suffix[:D]+DRAFTER[@D]`` (a model-free and another drafter merged in one tree, the
other drafting only the first D levels with ``@D``); ``self`` (the target
drafting for itself); ``builtin:NAME`` (a head shipped in the package); a directory
holding an EAGLE-3 head; or any model argument :func:`ltd.models.load_model` accepts (an
independent small LM with the target's tokenizer).

Adding a kind of drafter is one entry in :data:`DRAFTER_KINDS` (or one
:func:`register_drafter` call): a name, a test on the spec and a factory from the spec
and the :class:`DrafterContext` (the target, its backend and the load settings) to a
:class:`~ltd.drafting.base.Drafter`. Entries are tried in order; the last one, ``model``,
takes whatever is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from ltd.backends.base import Backend
from ltd.backends.hf import HFBackend
from ltd.defaults import DEFAULT_HEAD_DTYPE, HEAD_DTYPES
from ltd.drafting.base import Drafter, NullDrafter
from ltd.drafting.eagle3 import Eagle3Drafter, check_head_matches_target, is_head_spec, load_head, resolve_head_dir
from ltd.drafting.hybrid import HybridDrafter, split_hybrid_spec, split_model_depth
from ltd.drafting.lm import LMDrafter
from ltd.drafting.ngram import parse_ngram_spec
from ltd.drafting.suffix import parse_suffix_spec
from ltd.errors import LtdError
from ltd.models import LoadedModel, load_model, load_tokenizer_only, parse_dtype, resolve_gguf


@runtime_checkable
class NativeGreedyBackend(Protocol):
    """A backend with its own plain greedy loop and text tokenizer (llama.cpp's).

    Such a backend gives no target features (no EAGLE-3 heads), and its model drafters
    run on the same engine; the engine's ``llama.cpp`` reference method needs it.
    """

    model: object
    max_context: int

    def greedy_generate(self, prompt, max_new_tokens: int, eos_ids=()) -> list[int]: ...

    def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...


def is_native_greedy(backend: Backend | None) -> bool:
    return backend is not None and isinstance(backend, NativeGreedyBackend)


@dataclass
class DrafterContext:
    """What a drafter factory may use besides its spec."""

    target: LoadedModel | None
    device: str = "cpu"
    dtype: str | torch.dtype = "float32"
    target_backend: Backend | None = None
    threads: int | None = None
    kernels: str = "stock"
    head_dtype: str = DEFAULT_HEAD_DTYPE

    @property
    def native(self) -> bool:
        """Whether the target runs on a :class:`NativeGreedyBackend` (llama.cpp)."""
        return is_native_greedy(self.target_backend)

    def need_target(self, spec: str) -> LoadedModel:
        if self.target is None:
            raise LtdError(f"drafter {spec!r} needs a target model")
        return self.target


@dataclass(frozen=True)
class DrafterKind:
    """One kind of drafter: ``matches(spec)`` says whether ``build(spec, ctx)`` makes it."""

    name: str
    matches: Callable[[str], bool]
    build: Callable[[str, DrafterContext], Drafter]


def resolve_head_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """``--head-dtype`` -> a torch dtype. ``auto`` is bfloat16 (measured 2-3x cheaper per
    draft step on CPU, see :mod:`ltd.defaults`), or float16 on a GPU without bf16 support."""
    if name not in HEAD_DTYPES:
        raise LtdError(f"unknown head dtype {name!r}; choose one of {', '.join(HEAD_DTYPES)}")
    if name != "auto":
        return parse_dtype(name)
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _check_same_vocab(spec: str, target: LoadedModel, tokenizer) -> None:
    if tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise LtdError(
            f"drafter {spec!r} uses a different tokenizer (vocabulary {len(tokenizer)}) from the target "
            f"(vocabulary {len(target.tokenizer)}); choose a drafter from the same model family"
        )


def _native_lm(backend_model, ctx: DrafterContext) -> LMDrafter:
    """An LM drafter on the target's own engine (llama.cpp), with its context length."""
    from ltd.backends.llamacpp import LlamaCppBackend  # optional: llama-cpp-python is an extra

    return LMDrafter(LlamaCppBackend(backend_model, threads=ctx.threads, max_context=ctx.target_backend.max_context))


def _build_hybrid(spec: str, ctx: DrafterContext) -> Drafter:
    ngram_spec, model_spec = split_hybrid_spec(spec)
    model_spec, model_depth = split_model_depth(model_spec)
    return HybridDrafter(_build_model_free(ngram_spec), load_drafter_in(model_spec, ctx), model_depth=model_depth)


def _is_suffix(spec: str) -> bool:
    return spec == "suffix" or spec.startswith("suffix:")


def _build_model_free(spec: str) -> Drafter:
    """A hybrid's first half: the suffix drafter or the n-gram drafter."""
    return parse_suffix_spec(spec) if _is_suffix(spec) else parse_ngram_spec(spec)


def _build_self(spec: str, ctx: DrafterContext) -> Drafter:
    target = ctx.need_target(spec)
    if ctx.native:
        return _native_lm(ctx.target_backend.model, ctx)
    return LMDrafter(HFBackend(target.model, kernels=ctx.kernels))


def _build_head(spec: str, ctx: DrafterContext) -> Drafter:
    target = ctx.need_target(spec)
    if ctx.native:
        raise LtdError(
            f"drafter {spec!r} is an EAGLE-3 head, which needs target features the llamacpp backend does not give; "
            "use --drafter with a small model or ngram, or --backend hf"
        )
    head_dir = resolve_head_dir(spec)
    head = load_head(head_dir, dtype=resolve_head_dtype(ctx.head_dtype, ctx.device), device=ctx.device)
    check_head_matches_target(head.config, target.model.config, str(head_dir))
    return Eagle3Drafter(head, target.model.get_input_embeddings())


def _build_model(spec: str, ctx: DrafterContext) -> Drafter:
    """An independent small LM with the target's tokenizer, on the target's kind of backend."""
    target = ctx.need_target(spec)
    if ctx.native:
        from ltd.backends.llamacpp import LlamaCppModel  # optional: llama-cpp-python is an extra

        gguf = resolve_gguf(spec)
        tok, _ = load_tokenizer_only(spec, gguf)
        _check_same_vocab(spec, target, tok)
        drafter = _native_lm(LlamaCppModel(gguf), ctx)
        if drafter.backend.vocab_size != ctx.target_backend.vocab_size:
            raise LtdError(
                f"drafter {spec!r} scores {drafter.backend.vocab_size} tokens but the target {ctx.target_backend.vocab_size}; "
                "choose a drafter from the same model family"
            )
        return drafter
    drafter_model = load_model(spec, device=ctx.device, dtype=ctx.dtype)
    _check_same_vocab(spec, target, drafter_model.tokenizer)
    return LMDrafter(HFBackend(drafter_model.model, kernels=ctx.kernels))


DRAFTER_KINDS: list[DrafterKind] = [
    DrafterKind("none", lambda s: s in ("", "none"), lambda s, ctx: NullDrafter()),
    DrafterKind("ngram", lambda s: s == "ngram" or s.startswith("ngram:"), lambda s, ctx: parse_ngram_spec(s)),
    DrafterKind("suffix", _is_suffix, lambda s, ctx: parse_suffix_spec(s)),
    DrafterKind("hybrid", lambda s: s.startswith("hybrid:"), _build_hybrid),
    DrafterKind("self", lambda s: s == "self", _build_self),
    DrafterKind("eagle3", is_head_spec, _build_head),
    DrafterKind("model", lambda s: True, _build_model),
]


def register_drafter(kind: DrafterKind) -> None:
    """Add a kind of drafter, tried before the catch-all ``model`` entry."""
    DRAFTER_KINDS.insert(len(DRAFTER_KINDS) - 1, kind)


def load_drafter_in(spec: str, ctx: DrafterContext) -> Drafter:
    """The drafter ``spec`` names, built by the first registry entry that matches it."""
    for kind in DRAFTER_KINDS:
        if kind.matches(spec):
            return kind.build(spec, ctx)
    raise LtdError(f"unknown drafter {spec!r}")  # unreachable while the catch-all entry is last


def load_drafter(
    spec: str,
    target: LoadedModel | None,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    target_backend: Backend | None = None,
    threads: int | None = None,
    kernels: str = "stock",
    head_dtype: str = DEFAULT_HEAD_DTYPE,
) -> Drafter:
    """Build a drafter from a spec (see the module docstring for the specs).

    On a llama.cpp target (``target_backend``), model drafters run on llama.cpp too, with
    ``threads``. ``kernels`` is the matmul plan of an LM drafter's own hf backend
    (:mod:`ltd.backends.hf_kernels`). ``head_dtype`` is the precision of an EAGLE-3 head's
    weights (``auto``: bfloat16, see :mod:`ltd.defaults`), independent of the target's
    ``dtype``: drafts never change the output.
    """
    return load_drafter_in(spec, DrafterContext(target, device, dtype, target_backend, threads, kernels, head_dtype))


__all__ = ["DRAFTER_KINDS", "DrafterContext", "DrafterKind", "is_head_spec", "load_drafter", "register_drafter", "resolve_head_dtype"]
