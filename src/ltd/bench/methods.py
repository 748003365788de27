"""Method specs (``hf``, ``ar``, ``static:DxKxV``, peers) and running one on an engine.

A spec is parsed once, before any model loads, so a typo fails in a second instead of
after minutes of loading. Peers are transformers' own speculative modes, run exactly as
shipped (``assistant_model=`` with its default schedule, ``prompt_lookup_num_tokens=``)
so that the comparison is with what a user would get from transformers.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ltd.control import validate_static
from ltd.defaults import ONLINE_VARIANTS
from ltd.drafting.base import NullDrafter
from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.drafting.hybrid import HybridDrafter
from ltd.drafting.lm import LMDrafter
from ltd.drafting.suffix import SuffixDrafter
from ltd.engine import METHODS, Engine, GenerateConfig, GenerateResult, method_of, reference_method, transformers_generate
from ltd.errors import LtdError
from ltd.models import load_model
from ltd.online import OnlineAdapter
from ltd.online.adapter import head_drafter
from ltd.peers.llamacpp_spec import KIND as LLAMACPP_SPEC
from ltd.peers.llamacpp_spec import PeerSpec, grid_peers, parse_peer_arg

log = logging.getLogger(__name__)

BASELINE = reference_method("hf")
#: the engine's methods the bench runs (its registry, less those it cannot time alike)
OURS = tuple(name for name, m in METHODS.items() if m.benchmarked)
PEERS = ("hf-assisted", "prompt-lookup")  # transformers' own speculative modes
KINDS = OURS + PEERS + (LLAMACPP_SPEC,)
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

    A ``+online=VARIANT`` suffix (methods of ours that draft) adapts the drafter online.
    """
    text = text.strip()
    if "+" in text:
        base, _, suffix = text.partition("+")
        key, _, variant = suffix.partition("=")
        if key != "online" or variant not in ONLINE_VARIANTS:
            raise LtdError(f"bad method {text!r}: the suffix is +online=VARIANT with VARIANT one of {', '.join(ONLINE_VARIANTS)}")
        spec = parse_method(base)
        if spec.kind not in METHODS or not method_of(spec.kind).uses_drafter:
            raise LtdError(f"bad method {text!r}: +online applies to methods of ours that draft (static, ltd, greedy, suffix-rule)")
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
    args = {"static": "static:DxKxV", "ltd": "ltd[:POLICY_DIR]"}
    return [args.get(k, k) for k in OURS + PEERS] + [f"{LLAMACPP_SPEC}:TYPE[:N]"]


def runs_on(kind: str, backend: str) -> bool:
    """Whether a method kind runs on ``backend``: the engine's say so; transformers' peers need hf."""
    if kind in METHODS:
        return backend in METHODS[kind].backends
    return backend == "hf" or kind not in PEERS


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
    baseline = reference_method(backend)
    for s in specs:
        if not runs_on(s.kind, backend):
            if s.kind in METHODS:
                raise LtdError(f"method {s.label} does not run on --backend {backend}: {METHODS[s.kind].wrong_backend}")
            raise LtdError(f"method {s.label} is transformers' generate and needs --backend hf; on llamacpp use llama.cpp, ar, static or ltd")
    base = [s for s in specs if s.kind == baseline]
    if not base:
        log.info("adding the %s baseline: speedups are ratios to it", baseline)
        base = [MethodSpec(baseline)]
    return base + [s for s in specs if s.kind != baseline]


def grid_methods(depths: Sequence[int], sizes: Sequence[int], topk: int) -> list[MethodSpec]:
    """The static D x V grid at fixed K, each validated like a user-given spec."""
    out = []
    for d in depths:
        for v in sizes:
            out.append(parse_method(f"static:{d}x{topk}x{v}"))
    return out


def grid_peer_methods(types: Sequence[str], lengths: Sequence[int]) -> list[MethodSpec]:
    """llama.cpp's built-in speculative types x draft lengths (``--grid-peers``)."""
    return [MethodSpec(LLAMACPP_SPEC, peer=p) for p in grid_peers(types, lengths)]


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
    if isinstance(engine.drafter, LMDrafter):
        return getattr(engine.drafter.backend, "model", None)
    return None


def resolve_assistant(engine: Engine, assistant: str | None, drafter_spec: str | None, device: str, dtype: str):
    """The draft model for ``hf-assisted``: ``--assistant``, else a standalone-LM drafter.

    Returns (model, assistant tokenizer or None when it shares the target's vocabulary).
    """
    if assistant:
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
        if spec.is_llamacpp_spec and peer is None:
            raise LtdError(f"method {spec.label} needs its llama.cpp peer; build it with ltd peers build llama.cpp")
        if spec.kind == "hf-assisted" and assistant is None:
            raise LtdError("method hf-assisted needs a draft model; pass --assistant NAME")
        if spec.kind in METHODS and method_of(spec.kind).uses_drafter and isinstance(engine.drafter, NullDrafter):
            raise LtdError(f"method {spec.label} needs a drafter; pass --drafter (e.g. self, a model, or an EAGLE-3 head)")
        self.engine = engine
        self.spec = spec
        self.drafter = engine.drafter
        self.online: OnlineAdapter | None = None
        self.restart_online()
        if spec.kind in METHODS:  # one-time work (a cost profile, policies) before anything is timed
            engine.prepare(self.config(Sampling(1)), self.drafter)
        self.assistant = assistant
        self.assistant_tokenizer = assistant_tokenizer
        self.prompt_lookup_tokens = prompt_lookup_tokens
        self.peer = peer  # a LlamaCppSpecPeer for llama.cpp-spec methods

    def restart_online(self) -> None:
        """Online adaptation from scratch again (an empty memory), e.g. after warm-up."""
        if self.spec.online:
            self.online = private_online_adapter(self.engine.drafter, self.spec.online)
            self.drafter = self.online.drafter

    def run(self, prompt: list[int], sampling: Sampling) -> GenerateResult:
        if self.spec.kind in METHODS:
            return self._run_ours(prompt, sampling)
        return PEER_RUNNERS[self.spec.kind](self, prompt, sampling)

    def config(self, sampling: Sampling) -> GenerateConfig:
        """The engine's settings for this method (a static tree's shape; the defaults otherwise)."""
        static = method_of(self.spec.kind).static_shape
        d = GenerateConfig()
        return GenerateConfig(
            method=self.spec.kind,
            max_new_tokens=sampling.max_new_tokens,
            depth=self.spec.depth if static else d.depth,
            topk=self.spec.topk if static else d.topk,
            size=self.spec.size if static else d.size,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            policy=self.spec.policy,
        )

    def _run_ours(self, prompt: list[int], sampling: Sampling) -> GenerateResult:
        result = self.engine.generate(prompt, self.config(sampling), drafter=self.drafter)
        result.method = self.spec.label
        return result


def _run_llamacpp_spec(runner: MethodRunner, prompt: list[int], sampling: Sampling) -> GenerateResult:
    return runner.peer.run(prompt, sampling.max_new_tokens, greedy=sampling.greedy, seed=sampling.seed)


def _run_prompt_lookup(runner: MethodRunner, prompt: list[int], sampling: Sampling) -> GenerateResult:
    return run_hf_peer(runner.engine, prompt, sampling, runner.spec.label, prompt_lookup_num_tokens=runner.prompt_lookup_tokens)


def _run_hf_assisted(runner: MethodRunner, prompt: list[int], sampling: Sampling) -> GenerateResult:
    extra: dict = {"assistant_model": runner.assistant}
    if runner.assistant_tokenizer is not None:
        extra.update(tokenizer=runner.engine.target.tokenizer, assistant_tokenizer=runner.assistant_tokenizer)
    return run_hf_peer(runner.engine, prompt, sampling, runner.spec.label, **extra)


#: the bench's methods beyond the engine's: method kind -> how one prompt runs
PEER_RUNNERS = {LLAMACPP_SPEC: _run_llamacpp_spec, "prompt-lookup": _run_prompt_lookup, "hf-assisted": _run_hf_assisted}


def private_online_adapter(shared, variant: str) -> OnlineAdapter:
    """Online adaptation of a private copy of the engine's drafter.

    Every adapting method starts from the same shipped head with an empty memory, and
    never changes the drafter that frozen methods use: the head drafter (its caches) and
    a hybrid's n-gram half are private; the head's weights are shared (kNN never changes
    them).
    """
    if isinstance(shared, SuffixDrafter):  # model-free: nothing shared, a fresh drafter with an empty store
        return OnlineAdapter(SuffixDrafter(copy.deepcopy(shared.config)), variant)
    shipped = head_drafter(shared)
    private = Eagle3Drafter(shipped.head, shipped.embed)
    if isinstance(shared, HybridDrafter):  # same split as the frozen methods (@D included)
        private = HybridDrafter(copy.deepcopy(shared.ngram), private, model_depth=shared.model_depth)
    return OnlineAdapter(private, variant)


class _ForwardCounter:
    """Counts forward calls of a module (target verifications of a transformers peer)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def run_hf_peer(engine: Engine, prompt: list[int], sampling: Sampling, label: str, **generate_kwargs) -> GenerateResult:
    """transformers ``generate`` with a speculative option, timed like the ``hf`` method.

    ``mean_accepted`` (tokens per target forward after the prefill) comes from counting
    the target's forward calls; when the assistant *is* the target (drafter ``self``) the
    two cannot be told apart and it is reported as NaN.
    """
    model = engine.target.model
    assistant = generate_kwargs.get("assistant_model")
    # transformers persists a "heuristic" schedule's draft length on the assistant across
    # calls; restore it so that every prompt starts from the shipped initial state.
    saved = getattr(getattr(assistant, "generation_config", None), "num_assistant_tokens", None)
    counter = _ForwardCounter(model) if assistant is not model else None
    try:
        tokens, seconds = transformers_generate(
            engine, prompt, sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.seed,
            fix="lower --max-new-tokens or --limit long suites", **generate_kwargs,
        )
    finally:
        if counter is not None:
            counter.close()
        if assistant is not None:
            assistant.generation_config.num_assistant_tokens = saved
    cycles = (counter.calls - 1) if counter is not None else 0
    mean_accepted = (len(tokens) - 1) / cycles if cycles > 0 else float("nan")
    return engine.result(label, tokens, seconds, cycles, mean_accepted)
