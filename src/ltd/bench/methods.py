"""Method specs (``hf``, ``ar``, ``static:DxKxV``, peers) and running one on an engine.

A spec is parsed once, before any model loads, so a typo fails in a second instead of
after minutes of loading. Peers are transformers' own speculative modes, run exactly as
shipped (``assistant_model=`` with its default schedule, ``prompt_lookup_num_tokens=``)
so that the comparison is with what a user would get from transformers.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ltd.control import validate_static
from ltd.engine import Engine, GenerateConfig, GenerateResult
from ltd.errors import LtdError
from ltd.peers.llamacpp_spec import KIND as LLAMACPP_SPEC
from ltd.peers.llamacpp_spec import PeerSpec, parse_peer_arg

log = logging.getLogger(__name__)

BASELINE = "hf"
BASELINES = {"hf": "hf", "llamacpp": "llama.cpp"}  # the library's own plain decoding per backend
OURS = ("hf", "llama.cpp", "ar", "static", "ltd")
PEERS = ("hf-assisted", "prompt-lookup")
HF_ONLY = ("hf", "hf-assisted", "prompt-lookup")  # transformers' generate: needs the hf backend
PLANNED = ("oracle",)
KINDS = OURS + PEERS + PLANNED
DEFAULT_STATIC = (5, 8, 32)
PROMPT_LOOKUP_TOKENS = 10

_STATIC_RE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


@dataclass(frozen=True)
class MethodSpec:
    """One method to benchmark; ``label`` is its name in results and reports."""

    kind: str
    depth: int = 0
    topk: int = 0
    size: int = 0
    policy: str | None = None  # ltd:POLICY_DIR
    online: str | None = None  # +online=VARIANT: adapt a private copy of the head while running
    peer: PeerSpec | None = None  # llama.cpp-spec:TYPE[:N]

    @property
    def label(self) -> str:
        if self.peer is not None:
            return self.peer.label
        if self.kind == "static":
            base = f"static:{self.depth}x{self.topk}x{self.size}"
        elif self.kind == "ltd" and self.policy:
            base = f"ltd:{self.policy}"
        else:
            base = self.kind
        return f"{base}+online={self.online}" if self.online else base

    @property
    def is_static(self) -> bool:
        return self.kind == "static"

    @property
    def is_llamacpp_spec(self) -> bool:
        return self.kind == LLAMACPP_SPEC


def parse_method(text: str) -> MethodSpec:
    """Parse one method spec; unknown names are a one-line error listing the valid ones.

    A ``+online=VARIANT`` suffix (static and ltd methods) adapts the drafter online.
    """
    text = text.strip()
    if "+" in text:
        from dataclasses import replace

        from ltd.online import VARIANTS

        base, _, suffix = text.partition("+")
        key, _, variant = suffix.partition("=")
        if key != "online" or variant not in VARIANTS:
            raise LtdError(f"bad method {text!r}: the suffix is +online=VARIANT with VARIANT one of {', '.join(VARIANTS)}")
        spec = parse_method(base)
        if spec.kind not in ("static", "ltd"):
            raise LtdError(f"bad method {text!r}: +online applies to static and ltd methods")
        return replace(spec, online=variant)
    kind, _, arg = text.partition(":")
    if kind == "static":
        if not arg:
            d, k, v = DEFAULT_STATIC
            return MethodSpec("static", d, k, v)
        m = _STATIC_RE.match(arg)
        if not m:
            raise LtdError(f"bad method {text!r}: write static:DxKxV, e.g. static:5x8x32 (depth x top-k x size)")
        d, k, v = (int(g) for g in m.groups())
        if d < 1:
            raise LtdError(f"bad method {text!r}: static depth must be >= 1 (use 'ar' for plain decoding)")
        validate_static(d, k, v)
        return MethodSpec("static", d, k, v)
    if kind == "ltd":
        return MethodSpec("ltd", policy=arg or None)
    if kind == LLAMACPP_SPEC:
        return MethodSpec(LLAMACPP_SPEC, peer=parse_peer_arg(arg))
    if arg:
        if kind in KINDS:
            raise LtdError(f"bad method {text!r}: {kind} takes no ':' argument")
        raise LtdError(f"unknown method {text!r}; choose from {', '.join(_method_help())}")
    if kind not in KINDS:
        raise LtdError(f"unknown method {text!r}; choose from {', '.join(_method_help())}")
    return MethodSpec(kind)


def _method_help() -> list[str]:
    return ["hf", "llama.cpp", "ar", "static:DxKxV", "hf-assisted", "prompt-lookup", "ltd[:POLICY_DIR]", "oracle", f"{LLAMACPP_SPEC}:TYPE[:N]"]


def baseline_for(backend: str) -> str:
    """The reference method of a backend: ``hf`` (transformers) or ``llama.cpp``."""
    return BASELINES[backend]


def parse_methods(text: str, backend: str = "hf") -> list[MethodSpec]:
    """Parse a comma-separated list; the backend's baseline is added first when missing."""
    specs = [parse_method(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise LtdError(f"--methods is empty; choose from {', '.join(_method_help())}")
    return with_baseline(specs, backend)


def with_baseline(specs: Sequence[MethodSpec], backend: str = "hf") -> list[MethodSpec]:
    """Deduplicate-check, check each method runs on ``backend``, and put the backend's
    baseline first: every ratio is measured against it."""
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise LtdError(f"--methods lists {', '.join(dupes)} more than once; list each method once")
    baseline = baseline_for(backend)
    for s in specs:
        if backend != "hf" and s.kind in HF_ONLY:
            raise LtdError(f"method {s.label} is transformers' generate and needs --backend hf; on llamacpp use llama.cpp, ar, static or ltd")
        if backend == "hf" and s.kind == "llama.cpp":
            raise LtdError("method llama.cpp needs --backend llamacpp; drop it or add --backend llamacpp")
    base = [s for s in specs if s.kind == baseline]
    if not base:
        log.info("adding the %s baseline: speedups are ratios to it", baseline)
        base = [MethodSpec(baseline)]
    return base + [s for s in specs if s.kind != baseline]


def check_available(specs: Sequence[MethodSpec]) -> None:
    """Methods that parse but are not implemented yet fail before any model loads."""
    for spec in specs:
        if spec.kind in PLANNED:
            raise LtdError(f"method {spec.label!r} is not available yet; drop it from --methods")


def grid_methods(depths: Sequence[int], sizes: Sequence[int], topk: int) -> list[MethodSpec]:
    """The static D x V grid at fixed K, each validated like a user-given spec."""
    out = []
    for d in depths:
        for v in sizes:
            out.append(parse_method(f"static:{d}x{topk}x{v}"))
    return out


def grid_peer_methods(types: Sequence[str], lengths: Sequence[int]) -> list[MethodSpec]:
    """llama.cpp's built-in speculative types x draft lengths (``--grid-peers``)."""
    from ltd.peers.llamacpp_spec import grid_peers

    return [MethodSpec(LLAMACPP_SPEC, peer=p) for p in grid_peers(types, lengths)]


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"2,3,4"`` -> [2, 3, 4] with an error naming the flag."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LtdError(f"{flag} takes comma-separated integers, e.g. 2,4,8; got {text!r}") from None
    if not values:
        raise LtdError(f"{flag} is empty; give comma-separated integers")
    return values


# -- running ---------------------------------------------------------------------------


@dataclass
class Sampling:
    """Decoding settings shared by every method of one bench."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def standalone_draft_model(engine: Engine) -> torch.nn.Module | None:
    """The drafter's own causal LM when the drafter is an independent LM (else None)."""
    from ltd.drafting.lm import LMDrafter

    if isinstance(engine.drafter, LMDrafter):
        return getattr(engine.drafter.backend, "model", None)
    return None


def resolve_assistant(engine: Engine, assistant: str | None, drafter_spec: str | None, device: str, dtype: str):
    """The draft model for ``hf-assisted``: ``--assistant``, else a standalone-LM drafter.

    Returns (model, assistant tokenizer or None when it shares the target's vocabulary).
    """
    if assistant:
        from ltd.models import load_model

        loaded = load_model(assistant, device=device, dtype=dtype)
        if loaded.tokenizer.get_vocab() == engine.target.tokenizer.get_vocab():
            return loaded.model, None
        log.info("assistant %s has its own tokenizer: transformers' universal assisted decoding", assistant)
        return loaded.model, loaded.tokenizer
    model = standalone_draft_model(engine)
    if model is None:
        raise LtdError(
            f"method hf-assisted needs a draft language model but the drafter ({drafter_spec or 'default'}) is not one; "
            "pass --assistant NAME (a small LM with the target's tokenizer)"
        )
    return model, None


class MethodRunner:
    """Runs one method on one prompt; peers' extra state (assistant model) lives here."""

    def __init__(
        self,
        engine: Engine,
        spec: MethodSpec,
        assistant: torch.nn.Module | None = None,
        assistant_tokenizer=None,
        prompt_lookup_tokens: int = PROMPT_LOOKUP_TOKENS,
        peer=None,
    ) -> None:
        check_available([spec])
        if spec.is_llamacpp_spec and peer is None:
            raise LtdError(f"method {spec.label} needs its llama.cpp peer; build it with ltd peers build llama.cpp")
        if spec.kind == "hf-assisted" and assistant is None:
            raise LtdError("method hf-assisted needs a draft model; pass --assistant NAME")
        if spec.is_static or spec.kind == "ltd":
            from ltd.drafting.base import NullDrafter

            if isinstance(engine.drafter, NullDrafter):
                raise LtdError(f"method {spec.label} needs a drafter; pass --drafter (e.g. self, a model, or an EAGLE-3 head)")
        self.engine = engine
        self.spec = spec
        self.drafter = engine.drafter
        self.online = None
        if spec.online:
            self.drafter, self.online = _private_online_drafter(engine, spec.online)
        self.assistant = assistant
        self.assistant_tokenizer = assistant_tokenizer
        self.prompt_lookup_tokens = prompt_lookup_tokens
        self.peer = peer  # a LlamaCppSpecPeer for llama.cpp-spec methods

    def restart_online(self) -> None:
        """Online adaptation from scratch again (a fresh head copy and memory), e.g. after warm-up."""
        if self.spec.online:
            self.drafter, self.online = _private_online_drafter(self.engine, self.spec.online)

    def run(self, prompt: list[int], sampling: Sampling) -> GenerateResult:
        kind = self.spec.kind
        if kind in OURS:
            cfg = GenerateConfig(
                method=kind,
                max_new_tokens=sampling.max_new_tokens,
                depth=self.spec.depth if kind == "static" else 0,
                topk=self.spec.topk if kind == "static" else 1,
                size=self.spec.size if kind == "static" else 0,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed,
                policy=self.spec.policy,
            )
            saved = (self.engine.drafter, self.engine.online)
            self.engine.drafter, self.engine.online = self.drafter, self.online
            try:
                result = self.engine.generate(prompt, cfg)
            finally:
                self.engine.drafter, self.engine.online = saved
            result.method = self.spec.label
            return result
        if kind == LLAMACPP_SPEC:
            return self.peer.run(prompt, sampling.max_new_tokens, greedy=sampling.greedy, seed=sampling.seed)
        if kind == "prompt-lookup":
            return run_hf_peer(self.engine, prompt, sampling, self.spec.label, prompt_lookup_num_tokens=self.prompt_lookup_tokens)
        if kind == "hf-assisted":
            extra: dict = {"assistant_model": self.assistant}
            if self.assistant_tokenizer is not None:
                extra.update(tokenizer=self.engine.target.tokenizer, assistant_tokenizer=self.assistant_tokenizer)
            return run_hf_peer(self.engine, prompt, sampling, self.spec.label, **extra)
        raise LtdError(f"method {self.spec.label!r} is not available yet; drop it from --methods")


def _private_online_drafter(engine: Engine, variant: str):
    """A copy of the engine's drafter with its own online adaptation.

    Every adapting method starts from the same shipped head (and an empty stream memory)
    and never changes the drafter that frozen methods use.
    """
    import copy

    from ltd.drafting.eagle3 import Eagle3Drafter
    from ltd.drafting.hybrid import HybridDrafter
    from ltd.online import OnlineAdapter, parse_variant
    from ltd.online.learner import adaptable_head

    parts = parse_variant(variant)
    shared = engine.drafter
    model = shared.model if isinstance(shared, HybridDrafter) else shared
    if parts.gradient is not None or parts.knn:
        shipped = adaptable_head(shared)
        # the learner trains a private copy of the head; a kNN memory attaches to a private drafter
        head = copy.deepcopy(shipped.head) if parts.gradient is not None else shipped.head
        model = Eagle3Drafter(head, shipped.embed)
    if isinstance(shared, HybridDrafter):  # same split as the frozen methods (@D included)
        drafter = HybridDrafter(copy.deepcopy(shared.ngram), model, model_depth=shared.model_depth)
    elif parts.gradient is None and not parts.knn:
        drafter = copy.deepcopy(shared)  # an n-gram drafter with its own memory (an error otherwise)
    else:
        drafter = model
    return drafter, OnlineAdapter(drafter, variant)


class _ForwardCounter:
    """Counts forward calls of a module (target verifications of a transformers peer)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


@torch.inference_mode()
def run_hf_peer(engine: Engine, prompt: list[int], sampling: Sampling, label: str, **generate_kwargs) -> GenerateResult:
    """transformers ``generate`` with a speculative option, timed like the ``hf`` method.

    ``mean_accepted`` (tokens per target forward after the prefill) comes from counting
    the target's forward calls; when the assistant *is* the target (drafter ``self``) the
    two cannot be told apart and it is reported as NaN.
    """
    model = engine.target.model
    max_context = engine.backend.max_context
    if len(prompt) + sampling.max_new_tokens > max_context:
        raise LtdError(
            f"prompt ({len(prompt)} tokens) + max-new-tokens ({sampling.max_new_tokens}) exceeds the model's context "
            f"of {max_context}; lower --max-new-tokens or --limit long suites"
        )
    ids = torch.tensor([prompt], dtype=torch.long, device=engine.backend.device)
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=engine.target.eos_token_ids or None)
    if sampling.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    kwargs.update(generate_kwargs)
    pad = engine.target.tokenizer.pad_token_id
    assistant = generate_kwargs.get("assistant_model")
    # transformers persists a "heuristic" schedule's draft length on the assistant across
    # calls; restore it so that every prompt starts from the shipped initial state.
    saved = getattr(getattr(assistant, "generation_config", None), "num_assistant_tokens", None)
    counter = _ForwardCounter(model) if assistant is not model else None
    try:
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad if pad is not None else 0, **kwargs)
        seconds = time.perf_counter() - t0
    finally:
        if counter is not None:
            counter.close()
        if assistant is not None:
            assistant.generation_config.num_assistant_tokens = saved
    tokens = out[0, len(prompt):].tolist()
    cycles = (counter.calls - 1) if counter is not None else 0
    mean_accepted = (len(tokens) - 1) / cycles if cycles > 0 else float("nan")
    return GenerateResult(
        method=label,
        tokens=tokens,
        text=engine.target.tokenizer.decode(tokens, skip_special_tokens=True),
        new_tokens=len(tokens),
        seconds=seconds,
        tokens_per_second=len(tokens) / seconds if seconds > 0 else 0.0,
        cycles=cycles,
        mean_accepted=mean_accepted,
    )
