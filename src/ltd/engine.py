"""One entry point for every generation method, and the registry of methods.

``hf`` is transformers' own greedy/sampling ``generate`` (the reference users would
otherwise run) and ``llama.cpp`` its counterpart on the llama.cpp backend (a plain greedy
loop through the same bindings); ``ar`` is our cycle with depth 0 (plain decoding with a
KV cache); ``static`` is tree speculative decoding with fixed depth, branching and size;
``ltd`` and ``heuristic`` are learned and adaptive controllers of the same cycle;
``greedy`` decides each cycle from this machine's measured costs (expected tokens per
second, including "do not draft") and ``suffix-rule`` is SuffixDecoding's rule. Each is
one :class:`Method` entry in :data:`METHODS`; adding a method is one
:func:`register_method` call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ltd.acceptance import SamplingConfig
from ltd.backends.base import Backend
from ltd.backends.hf import HFBackend
from ltd.control import (
    Controller, HeuristicController, LatencyModel, LTDController, ScheduleController, StaticController, SuffixRuleController,
    ThroughputController, validate_static,
)
from ltd.control.costcache import cached_quick_profile
from ltd.control.schedule import parse_schedule
from ltd.control.policy import default_policy_dir, load_ltd_policies
from ltd.cycle import CycleResult, decode
from ltd.defaults import DEFAULT_DEPTH, DEFAULT_HEAD_DTYPE, DEFAULT_KERNELS, DEFAULT_SCHEDULE, DEFAULT_SIZE, DEFAULT_TOPK
from ltd.drafting.base import Drafter, NullDrafter
from ltd.drafting.eagle3 import builtin_drafter_dir
from ltd.drafting.hybrid import split_hybrid_spec, split_model_depth
from ltd.drafting.load import is_native_greedy, load_drafter
from ltd.errors import LtdError
from ltd.limits import check_prompt_fits
from ltd.models import LoadedModel, encode_messages, encode_prompt, load_model, load_tokenizer_only, resolve_gguf
from ltd.online import OnlineAdapter, has_state
from ltd.registry import REGISTRY

log = logging.getLogger(__name__)

BACKENDS = ("hf", "llamacpp")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise LtdError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


@dataclass
class GenerateConfig:
    """Per-request settings; defaults work for the embedded model."""

    method: str = "static"
    max_new_tokens: int = 128
    depth: int = DEFAULT_DEPTH
    topk: int = DEFAULT_TOPK
    size: int = DEFAULT_SIZE
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    policy: str | None = None  # LTD policy directory (holding depth/ and size/); None = shipped
    schedule: str = DEFAULT_SCHEDULE  # method schedule: draft length by batch size

    def validate(self) -> None:
        method = method_of(self.method)
        if self.max_new_tokens < 1:
            raise LtdError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LtdError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LtdError(f"--top-p must be in (0, 1], got {self.top_p}")
        if method.static_shape:
            validate_static(self.depth, self.topk, self.size)
        if self.method == "schedule":
            parse_schedule(self.schedule)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p)


@dataclass
class GenerateResult:
    """What a generation returns (``--json`` prints these fields)."""

    method: str
    tokens: list[int]
    text: str
    new_tokens: int
    seconds: float
    tokens_per_second: float
    cycles: int
    mean_accepted: float
    cycle_log: list[CycleResult] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "text": self.text,
            "tokens": self.tokens,
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "cycles": self.cycles,
            "mean_accepted": round(self.mean_accepted, 4),
        }


def default_drafter_spec(model_name: str, backend: str = "hf") -> str:
    """The drafter used when none is given: the registry's choice when it is available.

    EAGLE-3 heads need target features, which llama.cpp does not give: there the
    n-gram drafter stands in for them (also in a hybrid's place). A shipped head that
    is missing from this install leaves a hybrid's n-gram half, or no drafter.
    """
    entry = REGISTRY.get(model_name)
    if entry is None or not entry.default_drafter:
        return "ngram" if backend == "llamacpp" else "none"
    spec = entry.default_drafter
    ngram = ""
    if spec.startswith("hybrid:"):
        ngram, model_spec = split_hybrid_spec(spec)
        model_spec = split_model_depth(model_spec)[0]
    else:
        model_spec = spec
    if model_spec.startswith("builtin:"):
        if backend == "llamacpp":
            return ngram or "ngram"
        if not (builtin_drafter_dir(model_spec.split(":", 1)[1]) / "config.json").is_file():
            return ngram or "none"
    return spec



def load_llamacpp_target(model: str, threads: int | None = None, fetch: bool = False) -> tuple[LoadedModel, Backend]:
    """A GGUF target on llama.cpp with the HF tokenizer (no dense weights are loaded)."""
    from ltd.backends.llamacpp import LlamaCppBackend, LlamaCppModel, check_tokenizer  # optional: the llamacpp extra

    gguf = resolve_gguf(model, fetch=fetch)
    lmodel = LlamaCppModel(gguf)
    tok, eos = load_tokenizer_only(model, gguf)
    check_tokenizer(lmodel, tok, model)
    target = LoadedModel(name=model, model=None, tokenizer=tok, source_dir=gguf.parent, generation_eos=eos)
    return target, LlamaCppBackend(lmodel, threads=threads)


class Engine:
    """A target model with its backend and default drafter, ready to generate.

    :meth:`generate` and :meth:`stream` take a drafter and a controller per call (the
    engine's own by default), so callers that compare drafters (the bench) pass theirs
    instead of swapping the engine's.
    """

    def __init__(self, target: LoadedModel, drafter: Drafter | None = None, backend: Backend | None = None) -> None:
        self.target = target
        self.backend = backend if backend is not None else HFBackend(target.model)
        # a backend with its own greedy loop and tokenizer is llama.cpp's (by capability, not class)
        self.backend_name = "llamacpp" if is_native_greedy(self.backend) else "hf"
        self.drafter = drafter or NullDrafter()
        self.drafter_name = type(self.drafter).__name__  # Engine.load sets the spec; it keys the cost profile
        self.online: OnlineAdapter | None = None  # set by enable_online; saves what the drafter learned
        self.latency_file: str | None = None  # a full ``ltd profile`` file for cost-aware methods (else the quick profile)
        self._policies: dict[str, tuple] = {}  # loaded once per directory, not inside each timed request
        self._costs: dict[int, LatencyModel] = {}  # cost tables by branching k, measured or read once

    @property
    def reference_method(self) -> str:
        """The library's own plain decoding on this backend (``hf`` or ``llama.cpp``)."""
        return reference_method(self.backend_name)

    def enable_online(self, variant: str, state_dir: str | None = None) -> OnlineAdapter:
        """Adapt the drafter online from verification feedback (``--online knn``): the
        engine's drafter becomes the adapter's wrapped drafter."""
        adapter = OnlineAdapter(self.drafter, variant)
        if state_dir and has_state(state_dir):
            adapter.load_state(state_dir)
        self.online = adapter
        self.drafter = adapter.drafter
        return adapter

    @staticmethod
    def load(
        model: str,
        drafter: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        backend: str = "hf",
        threads: int | None = None,
        kernels: str = DEFAULT_KERNELS,
        head_dtype: str = DEFAULT_HEAD_DTYPE,
    ) -> "Engine":
        """Load a target and drafter. ``backend`` is ``hf`` (transformers, ``device`` and
        ``dtype`` apply) or ``llamacpp`` (the GGUF as stored, on ``threads`` CPU threads).
        ``kernels`` is the hf backend's matmul plan (:mod:`ltd.backends.hf_kernels`);
        ``head_dtype`` the precision of an EAGLE-3 draft head (see :func:`load_drafter`)."""
        check_backend(backend)
        spec = default_drafter_spec(model, backend) if drafter is None else drafter
        log.info("target %s on %s, drafter %s", model, backend, spec)
        if backend == "llamacpp":
            target, target_backend = load_llamacpp_target(model, threads=threads)
        else:
            target = load_model(model, device=device, dtype=dtype)
            target_backend = HFBackend(target.model, kernels=kernels)
        engine = Engine(target, None, target_backend)
        engine.drafter = engine.load_drafter(spec, device=device, dtype=dtype, threads=threads, kernels=kernels, head_dtype=head_dtype)
        engine.drafter_name = spec
        return engine

    def load_drafter(
        self,
        spec: str,
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = None,
        kernels: str = DEFAULT_KERNELS,
        head_dtype: str = DEFAULT_HEAD_DTYPE,
    ) -> Drafter:
        """A drafter for this engine's target, to pass to :meth:`generate` (the engine's own
        is unchanged). On llama.cpp, model drafters run on llama.cpp too, with ``threads``;
        on hf the other settings apply (see :func:`load_drafter`)."""
        if self.backend_name == "llamacpp":
            return load_drafter(spec, self.target, target_backend=self.backend, threads=threads)
        return load_drafter(spec, self.target, device=device, dtype=dtype, kernels=kernels, head_dtype=head_dtype)

    def encode(self, text: str, chat: bool = True) -> list[int]:
        return encode_prompt(self.target.tokenizer, text, chat=chat, tokenize=self.prompt_tokenizer)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A whole conversation through the chat template (bench --multi-turn, the server)."""
        return encode_messages(self.target.tokenizer, messages, tokenize=self.prompt_tokenizer)

    @property
    def prompt_tokenizer(self):
        """The backend's own text tokenizer when it has one (llama.cpp), else None (HF's)."""
        return getattr(self.backend, "tokenize", None)

    def controller_for(self, cfg: GenerateConfig, drafter: Drafter | None = None) -> Controller:
        """A fresh controller of ``cfg.method`` (a speculative method's), bound to ``drafter``
        (default: the engine's) when it reads the drafter's signals."""
        make = method_of(cfg.method).controller
        if make is None:
            raise LtdError(f"method {cfg.method} decodes with its own loop; it has no controller")
        ctrl = make(self, cfg)
        bind = getattr(ctrl, "bind_drafter", None)
        if bind is not None:
            bind(drafter if drafter is not None else self.drafter)
        return ctrl

    def costs(self, topk: int) -> LatencyModel:
        """This machine's cycle costs for cost-aware methods: :attr:`latency_file` when set
        (a full ``ltd profile``), else the quick profile, measured on first use per machine,
        model, backend, dtype, threads and drafter, and cached (:mod:`ltd.control.costcache`)."""
        if topk not in self._costs:
            if self.latency_file:
                costs = LatencyModel.load(self.latency_file)
                if costs.model and costs.model != self.target.name:
                    log.warning("latency profile %s was measured for %s, not %s", self.latency_file, costs.model, self.target.name)
            else:
                costs = cached_quick_profile(
                    self.backend, self.drafter, model=self.target.name, backend_name=self.backend_name,
                    drafter_name=self.drafter_name, topk=topk,
                )
            self._costs[topk] = costs
        return self._costs[topk]

    @property
    def cost_tables(self) -> dict[int, LatencyModel]:
        """The cost tables cost-aware methods used so far, by branching k (for reports)."""
        return dict(self._costs)

    def prepare(self, cfg: GenerateConfig, drafter: Drafter | None = None) -> None:
        """Do a method's one-time work before anything is timed: measure (or read) the cost
        profile, load policies, check the drafter. A no-op for methods without a controller."""
        method = method_of(cfg.method)
        drafter = drafter if drafter is not None else self.drafter
        if method.controller is not None and method.uses_drafter and not isinstance(drafter, NullDrafter):
            self.controller_for(cfg, drafter)

    def policies(self, policy_dir: str | None) -> tuple:
        """The LTD policies of a directory (default: the shipped ones), loaded once."""
        key = str(Path(policy_dir or default_policy_dir(self.target.name, self.backend_name)).resolve())
        if key not in self._policies:
            self._policies[key] = load_ltd_policies(key)
        return self._policies[key]

    def stream(
        self,
        prompt: list[int],
        cfg: GenerateConfig,
        controller: Controller | None = None,
        drafter: Drafter | None = None,
        target: Backend | None = None,
    ) -> Iterator[CycleResult]:
        """Cycle results of a speculative generation (the method's controller unless one is given;
        the engine's drafter unless one is given; the engine's backend unless ``target`` is
        given: one sequence of a batch, see :mod:`ltd.batching`)."""
        cfg.validate()
        method = method_of(cfg.method)
        drafter = drafter if drafter is not None else self.drafter
        if method.uses_drafter and controller is None and isinstance(drafter, NullDrafter):
            raise LtdError(f"method {cfg.method} needs a drafter; pass --drafter (e.g. self, a model, or an EAGLE-3 head)")
        ctrl = controller or self.controller_for(cfg, drafter)
        bind_load, load = getattr(ctrl, "bind_load", None), getattr(target, "load", None)
        if bind_load is not None and load is not None:  # one sequence of a batch: decide for the batch
            bind_load(load)
        topk = getattr(ctrl, "topk", None) or cfg.topk
        return decode(
            target if target is not None else self.backend,
            # ar never drafts; a reference method given a controller drafts like any other
            drafter if method.uses_drafter or method.run is not None else NullDrafter(),
            ctrl,
            prompt,
            cfg.max_new_tokens,
            topk=topk,
            sampling=cfg.sampling,
            eos_token_ids=self.target.eos_token_ids,
            seed=cfg.seed,
        )

    def generate(
        self,
        prompt: list[int],
        cfg: GenerateConfig,
        controller: Controller | None = None,
        on_cycle: Callable[[CycleResult], None] | None = None,
        drafter: Drafter | None = None,
    ) -> GenerateResult:
        """Generate with ``cfg.method``; ``controller`` and ``drafter`` replace the method's
        controller and the engine's drafter for this call only."""
        cfg.validate()
        method = method_of(cfg.method)
        if self.backend_name not in method.backends:
            raise LtdError(method.wrong_backend)
        if method.run is not None and controller is None:
            return method.run(self, prompt, cfg)
        t0 = time.perf_counter()
        tokens: list[int] = []
        log_: list[CycleResult] = []
        for res in self.stream(prompt, cfg, controller, drafter):
            tokens.extend(res.new_tokens)
            log_.append(res)
            if on_cycle is not None:
                on_cycle(res)
        seconds = time.perf_counter() - t0
        cycles = len(log_) - 1
        added = sum(r.num_accepted + 1 for r in log_[1:])
        return self.result(cfg.method, tokens, seconds, cycles, added / cycles if cycles else 1.0, log_)

    def result(self, method: str, tokens: list[int], seconds: float, cycles: int, mean_accepted: float, log_=None) -> GenerateResult:
        """A :class:`GenerateResult` with the text decoded and the speed computed."""
        text = self.target.tokenizer.decode(tokens, skip_special_tokens=True)
        return GenerateResult(
            method=method,
            tokens=tokens,
            text=text,
            new_tokens=len(tokens),
            seconds=seconds,
            tokens_per_second=len(tokens) / seconds if seconds > 0 else 0.0,
            cycles=cycles,
            mean_accepted=mean_accepted,
            cycle_log=log_ or [],
        )


# -- the methods ---------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One generation method.

    ``controller`` makes the cycle's controller for a request (speculative methods and
    ``ar``); ``run`` is a method's own loop instead (the backends' reference decoders).
    ``reference_of`` names the backend whose plain decoding this method is: speedups are
    measured against it.
    """

    name: str
    backends: tuple[str, ...] = BACKENDS
    controller: Callable[[Engine, GenerateConfig], Controller] | None = None
    run: Callable[[Engine, list[int], GenerateConfig], GenerateResult] | None = None
    uses_drafter: bool = True
    static_shape: bool = False  # depth/topk/size are the tree's (checked up front)
    reference_of: str | None = None
    wrong_backend: str = ""
    benchmarked: bool = True  # ltd bench runs it (the heuristic needs per-sequence state the bench does not give)


def _run_hf(engine: Engine, prompt: list[int], cfg: GenerateConfig) -> GenerateResult:
    tokens, seconds = transformers_generate(engine, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
    return engine.result("hf", tokens, seconds, len(tokens), 1.0)


def _run_llamacpp(engine: Engine, prompt: list[int], cfg: GenerateConfig) -> GenerateResult:
    if not cfg.sampling.greedy:
        raise LtdError("method llama.cpp decodes greedily only; use --method ar (or static) with --temperature")
    check_prompt_fits(prompt, cfg.max_new_tokens, engine.backend.max_context)
    t0 = time.perf_counter()
    tokens = engine.backend.greedy_generate(prompt, cfg.max_new_tokens, engine.target.eos_token_ids)
    seconds = time.perf_counter() - t0
    return engine.result("llama.cpp", tokens, seconds, len(tokens), 1.0)


def _ltd_controller(engine: Engine, cfg: GenerateConfig) -> Controller:
    dp, sp = engine.policies(cfg.policy)
    trained = dp or sp
    # cost-conditioned policies read this machine's cost table (the quick profile, cached)
    costs = engine.costs(trained.spec.topk) if trained is not None and trained.spec.needs_costs else None
    return LTDController.from_policies(dp, sp, costs=costs)  # fresh history per request


def _greedy_controller(engine: Engine, cfg: GenerateConfig) -> Controller:
    return ThroughputController(engine.costs(cfg.topk), topk=cfg.topk)  # fresh history per request


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    """Add a generation method (``GenerateConfig.method`` names it)."""
    METHODS[method.name] = method


for _m in (
    Method("hf", backends=("hf",), run=_run_hf, uses_drafter=False, reference_of="hf",
           wrong_backend="method hf is transformers' generate; on --backend llamacpp use method llama.cpp (or ar)"),
    Method("llama.cpp", backends=("llamacpp",), run=_run_llamacpp, uses_drafter=False, reference_of="llamacpp",
           wrong_backend="method llama.cpp needs --backend llamacpp; on the hf backend use method hf (or ar)"),
    Method("ar", controller=lambda e, c: StaticController(depth=0, topk=1, size=0), uses_drafter=False),
    Method("static", controller=lambda e, c: StaticController(depth=c.depth, topk=c.topk, size=c.size), static_shape=True),
    Method("ltd", controller=_ltd_controller),
    Method("heuristic", controller=lambda e, c: HeuristicController(depth=c.depth, topk=c.topk, size=c.size),
           static_shape=True, benchmarked=False),
    Method("greedy", controller=_greedy_controller),
    Method("suffix-rule", controller=lambda e, c: SuffixRuleController(topk=c.topk)),
    Method("schedule", controller=lambda e, c: ScheduleController(c.schedule, topk=c.topk), benchmarked=False),
):
    register_method(_m)


def method_of(name: str) -> Method:
    if name not in METHODS:
        raise LtdError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def reference_method(backend: str) -> str:
    """The library's own plain decoding on a backend: the reference outputs and speeds."""
    check_backend(backend)
    return next(m.name for m in METHODS.values() if m.reference_of == backend)


@torch.inference_mode()
def transformers_generate(
    engine: Engine,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    fix: str = "lower --max-new-tokens",
    **generate_kwargs,
) -> tuple[list[int], float]:
    """transformers' own ``generate`` on the engine's target: (new tokens, seconds).

    The ``hf`` method and transformers' speculative peers (``generate_kwargs`` such as
    ``assistant_model=``) share it, so they decode and are timed alike.
    """
    check_prompt_fits(prompt, max_new_tokens, engine.backend.max_context, fix)
    ids = torch.tensor([prompt], dtype=torch.long, device=engine.backend.device)
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=engine.target.eos_token_ids or None)
    if temperature == 0.0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        if seed is not None:
            torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    kwargs.update(generate_kwargs)
    pad = engine.target.tokenizer.pad_token_id
    t0 = time.perf_counter()
    out = engine.target.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad if pad is not None else 0, **kwargs)
    seconds = time.perf_counter() - t0
    return out[0, len(prompt):].tolist(), seconds
