"""One entry point for every generation method.

``hf`` is transformers' own greedy/sampling ``generate`` (the reference users would
otherwise run) and ``llama.cpp`` its counterpart on the llama.cpp backend (a plain greedy
loop through the same bindings); ``ar`` is our cycle with depth 0 (plain decoding with a
KV cache);
``static`` is tree speculative decoding with fixed depth, branching and size. Learned
controllers plug in as other controllers of the same cycle.
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
from ltd.control import Controller, StaticController, validate_static
from ltd.cycle import CycleResult, decode
from ltd.drafting.base import Drafter, NullDrafter
from ltd.defaults import DEFAULT_DEPTH, DEFAULT_HEAD_DTYPE, DEFAULT_KERNELS, DEFAULT_SIZE, DEFAULT_TOPK, HEAD_DTYPES
from ltd.errors import LtdError
from ltd.models import LoadedModel, load_model, parse_dtype
from ltd.registry import REGISTRY

log = logging.getLogger(__name__)

METHODS = ("hf", "llama.cpp", "ar", "static", "ltd", "heuristic")
BACKENDS = ("hf", "llamacpp")
#: the library's own plain decoding on each backend: the reference outputs and speeds
REFERENCE_METHOD = {"hf": "hf", "llamacpp": "llama.cpp"}


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise LtdError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
ASSETS = Path(__file__).parent / "assets" / "drafters"
POLICY_ASSETS = Path(__file__).parent / "assets" / "policies"


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

    def validate(self) -> None:
        if self.method not in METHODS:
            raise LtdError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.max_new_tokens < 1:
            raise LtdError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LtdError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LtdError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.method in ("static", "heuristic"):
            validate_static(self.depth, self.topk, self.size)

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


def builtin_drafter_dir(name: str) -> Path:
    return ASSETS / name


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
        from ltd.drafting.hybrid import split_hybrid_spec, split_model_depth

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
    """Build a drafter from a spec.

    ``none``; ``ngram`` or ``ngram:N`` (continuations found in the text so far);
    ``suffix`` or ``suffix:D`` (deep drafts from the longest earlier match, see
    :mod:`ltd.drafting.suffix`); ``hybrid:ngram[:N]+SPEC[@D]`` or
    ``hybrid:suffix[:D]+SPEC[@D]`` (a model-free and another drafter merged in one tree, the
    other drafting only the first D levels with ``@D``); ``self``
    (the target drafting for itself); ``builtin:NAME`` (a head shipped in the package); a
    directory holding an EAGLE-3 head (config.json with ``LlamaForCausalLMEagle3``); or
    any model argument accepted by :func:`load_model` (an independent small LM with the
    same tokenizer). On a llama.cpp target (``target_backend``), model drafters run on
    llama.cpp too, with ``threads``. ``kernels`` is the matmul plan of an LM drafter's own
    hf backend (:mod:`ltd.backends.hf_kernels`). ``head_dtype`` is the precision of an
    EAGLE-3 head's weights (``auto``: bfloat16, see :mod:`ltd.defaults`), independent of
    the target's ``dtype``: drafts never change the output.
    """
    from ltd.drafting.eagle3 import Eagle3Drafter, Eagle3Head, check_head_matches_target
    from ltd.drafting.lm import LMDrafter

    if spec in ("", "none"):
        return NullDrafter()
    if spec == "ngram" or spec.startswith("ngram:"):
        from ltd.drafting.ngram import parse_ngram_spec

        return parse_ngram_spec(spec)
    if spec == "suffix" or spec.startswith("suffix:"):
        from ltd.drafting.suffix import parse_suffix_spec

        return parse_suffix_spec(spec)
    if spec.startswith("hybrid:"):
        from ltd.drafting.hybrid import HybridDrafter, split_hybrid_spec, split_model_depth

        ngram_spec, model_spec = split_hybrid_spec(spec)
        model_spec, model_depth = split_model_depth(model_spec)
        model_drafter = load_drafter(model_spec, target, device, dtype, target_backend, threads, kernels, head_dtype)
        return HybridDrafter(load_drafter(ngram_spec, target), model_drafter, model_depth=model_depth)
    if target is None:
        raise LtdError(f"drafter {spec!r} needs a target model")
    if _is_llamacpp(target_backend):
        return _load_llamacpp_drafter(spec, target, target_backend, threads)
    if spec == "self":
        return LMDrafter(HFBackend(target.model, kernels=kernels))
    head_dir: Path | None = None
    if spec.startswith("builtin:"):
        head_dir = builtin_drafter_dir(spec.split(":", 1)[1])
        if not head_dir.is_dir():
            raise LtdError(f"no built-in drafter {spec!r}; available: {', '.join(p.name for p in ASSETS.glob('*')) or 'none'}")
    elif Path(spec).is_dir() and _is_eagle3_dir(Path(spec)):
        head_dir = Path(spec)
    if head_dir is not None:
        head = Eagle3Head.load(head_dir, dtype=resolve_head_dtype(head_dtype, device), device=device)
        check_head_matches_target(head.config, target.model.config, str(head_dir))
        return Eagle3Drafter(head, target.model.get_input_embeddings())
    drafter_model = load_model(spec, device=device, dtype=dtype)
    tv, dv = len(target.tokenizer), len(drafter_model.tokenizer)
    if target.tokenizer.get_vocab() != drafter_model.tokenizer.get_vocab():
        raise LtdError(
            f"drafter {spec!r} uses a different tokenizer (vocabulary {dv}) from the target (vocabulary {tv}); "
            "choose a drafter from the same model family"
        )
    return LMDrafter(HFBackend(drafter_model.model, kernels=kernels))


def _is_llamacpp(backend: Backend | None) -> bool:
    return backend is not None and type(backend).__name__ == "LlamaCppBackend"


def _load_llamacpp_drafter(spec: str, target: LoadedModel, target_backend: Backend, threads: int | None) -> Drafter:
    """A model drafter on llama.cpp: the target's own weights (``self``) or a small GGUF LM."""
    from ltd.backends.llamacpp import LlamaCppBackend, LlamaCppModel
    from ltd.drafting.lm import LMDrafter
    from ltd.models import load_tokenizer_only, resolve_gguf

    if spec.startswith("builtin:") or (Path(spec).is_dir() and _is_eagle3_dir(Path(spec))):
        raise LtdError(
            f"drafter {spec!r} is an EAGLE-3 head, which needs target features the llamacpp backend does not give; "
            "use --drafter with a small model or ngram, or --backend hf"
        )
    if spec == "self":
        return LMDrafter(LlamaCppBackend(target_backend.model, threads=threads, max_context=target_backend.max_context))
    gguf = resolve_gguf(spec)
    tok, _ = load_tokenizer_only(spec, gguf)
    if tok.get_vocab() != target.tokenizer.get_vocab():
        raise LtdError(
            f"drafter {spec!r} uses a different tokenizer (vocabulary {len(tok)}) from the target "
            f"(vocabulary {len(target.tokenizer)}); choose a drafter from the same model family"
        )
    backend = LlamaCppBackend(LlamaCppModel(gguf), threads=threads, max_context=target_backend.max_context)
    if backend.vocab_size != target_backend.vocab_size:
        raise LtdError(
            f"drafter {spec!r} scores {backend.vocab_size} tokens but the target {target_backend.vocab_size}; "
            "choose a drafter from the same model family"
        )
    return LMDrafter(backend)


def load_llamacpp_target(model: str, threads: int | None = None, fetch: bool = False) -> tuple[LoadedModel, Backend]:
    """A GGUF target on llama.cpp with the HF tokenizer (no dense weights are loaded)."""
    from ltd.backends.llamacpp import LlamaCppBackend, LlamaCppModel, check_tokenizer
    from ltd.models import load_tokenizer_only, resolve_gguf

    gguf = resolve_gguf(model, fetch=fetch)
    lmodel = LlamaCppModel(gguf)
    tok, eos = load_tokenizer_only(model, gguf)
    check_tokenizer(lmodel, tok, model)
    target = LoadedModel(name=model, model=None, tokenizer=tok, source_dir=gguf.parent, generation_eos=eos)
    return target, LlamaCppBackend(lmodel, threads=threads)


def default_policy_dir(model_name: str, backend: str = "hf") -> Path:
    """Where the shipped LTD policies for a registry model and backend live.

    Policies are trained on one backend's latency profile and drafter (the hf backend's
    EAGLE-3 hybrid, llama.cpp's n-grams), so each backend has its own: ``NAME`` for hf,
    ``NAME-llamacpp`` for llama.cpp.
    """
    return POLICY_ASSETS / (model_name if backend == "hf" else f"{model_name}-{backend}")


def load_ltd_policies(policy_dir: str | Path) -> tuple:
    """The (depth, size) policies in a directory holding ``depth/`` and/or ``size/``."""
    from ltd.rl.policy import load_policy

    d = Path(policy_dir)
    if not (d / "depth").is_dir() and not (d / "size").is_dir():
        raise LtdError(f"no LTD policies in {d} (expected depth/ and size/); train them with ltd train-policy or pass --policy")
    dp = load_policy(d / "depth", kind="depth") if (d / "depth").is_dir() else None
    sp = load_policy(d / "size", kind="size") if (d / "size").is_dir() else None
    return dp, sp


def _is_eagle3_dir(path: Path) -> bool:
    import json

    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        raise LtdError(f"{cfg} is not valid JSON; re-export or retrain the drafter") from None
    return any("Eagle3" in a for a in data.get("architectures", []) or [])


class Engine:
    """A target model with its backend and drafter, ready to generate."""

    def __init__(self, target: LoadedModel, drafter: Drafter | None = None, backend: Backend | None = None) -> None:
        self.target = target
        self.backend = backend if backend is not None else HFBackend(target.model)
        self.backend_name = "llamacpp" if _is_llamacpp(self.backend) else "hf"
        self.drafter = drafter or NullDrafter()
        self.online = None  # an OnlineAdapter when online adaptation is on
        self._policies: dict[str, tuple] = {}  # loaded once per directory, not inside each timed request

    @property
    def reference_method(self) -> str:
        """The library's own plain decoding on this backend (``hf`` or ``llama.cpp``)."""
        return REFERENCE_METHOD[self.backend_name]

    def enable_online(self, variant: str, state_dir: str | None = None, **overrides) -> "object":
        """Adapt the drafter online from verification feedback (``--online VARIANT``):
        the EAGLE-3 head's weights, the n-gram drafter's stream memory, or both."""
        from ltd.online import OnlineAdapter
        from ltd.online.adapter import has_state

        adapter = OnlineAdapter(self.drafter, variant, **overrides)
        if state_dir and has_state(state_dir):
            adapter.load_state(state_dir)
        self.online = adapter
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
            return Engine(target, load_drafter(spec, target, target_backend=target_backend, threads=threads), target_backend)
        target = load_model(model, device=device, dtype=dtype)
        target_backend = HFBackend(target.model, kernels=kernels)
        drafter_ = load_drafter(spec, target, device=device, dtype=dtype, kernels=kernels, head_dtype=head_dtype)
        return Engine(target, drafter_, target_backend)

    def encode(self, text: str, chat: bool = True) -> list[int]:
        from ltd.models import encode_prompt

        return encode_prompt(self.target.tokenizer, text, chat=chat, tokenize=self.prompt_tokenizer)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A whole conversation through the chat template (bench --multi-turn, the server)."""
        from ltd.models import encode_messages

        return encode_messages(self.target.tokenizer, messages, tokenize=self.prompt_tokenizer)

    @property
    def prompt_tokenizer(self):
        """The backend's own text tokenizer when it has one (llama.cpp), else None (HF's)."""
        return getattr(self.backend, "tokenize", None)

    def controller_for(self, cfg: GenerateConfig) -> Controller:
        if cfg.method == "ar":
            return StaticController(depth=0, topk=1, size=0)
        if cfg.method == "ltd":
            from ltd.control_ltd import LTDController

            key = str(Path(cfg.policy or default_policy_dir(self.target.name, self.backend_name)).resolve())
            if key not in self._policies:
                self._policies[key] = load_ltd_policies(key)
            return LTDController.from_policies(*self._policies[key])  # fresh history per request
        if cfg.method == "heuristic":
            from ltd.control_ltd import HeuristicController

            return HeuristicController(depth=cfg.depth, topk=cfg.topk, size=cfg.size)
        return StaticController(depth=cfg.depth, topk=cfg.topk, size=cfg.size)

    def stream(self, prompt: list[int], cfg: GenerateConfig, controller: Controller | None = None) -> Iterator[CycleResult]:
        """Cycle results of a speculative generation (methods ar/static or a custom controller)."""
        cfg.validate()
        if cfg.method not in ("hf", "llama.cpp", "ar") and controller is None and isinstance(self.drafter, NullDrafter):
            raise LtdError(f"method {cfg.method} needs a drafter; pass --drafter (e.g. self, a model, or an EAGLE-3 head)")
        ctrl = controller or self.controller_for(cfg)
        topk = getattr(ctrl, "topk", None) or cfg.topk
        drafter = self.drafter if cfg.method != "ar" else NullDrafter()
        return decode(
            self.backend,
            drafter,
            ctrl,
            prompt,
            cfg.max_new_tokens,
            topk=topk,
            sampling=cfg.sampling,
            eos_token_ids=self.target.eos_token_ids,
            seed=cfg.seed,
            listeners=(self.online,) if self.online is not None and self.online.learns_from_commits and cfg.method != "ar" else (),
        )

    def generate(
        self,
        prompt: list[int],
        cfg: GenerateConfig,
        controller: Controller | None = None,
        on_cycle: Callable[[CycleResult], None] | None = None,
    ) -> GenerateResult:
        cfg.validate()
        self._check_method(cfg.method)
        if cfg.method == "hf" and controller is None:
            return self._generate_hf(prompt, cfg)
        if cfg.method == "llama.cpp" and controller is None:
            return self._generate_llamacpp(prompt, cfg)
        t0 = time.perf_counter()
        tokens: list[int] = []
        log_: list[CycleResult] = []
        for res in self.stream(prompt, cfg, controller):
            tokens.extend(res.new_tokens)
            log_.append(res)
            if on_cycle is not None:
                on_cycle(res)
        seconds = time.perf_counter() - t0
        cycles = len(log_) - 1
        added = sum(r.num_accepted + 1 for r in log_[1:])
        return self._result(cfg.method, tokens, seconds, cycles, added / cycles if cycles else 1.0, log_)

    def _check_method(self, method: str) -> None:
        """``hf`` needs transformers weights, ``llama.cpp`` the llama.cpp backend."""
        if method == "hf" and self.backend_name != "hf":
            raise LtdError("method hf is transformers' generate; on --backend llamacpp use method llama.cpp (or ar)")
        if method == "llama.cpp" and self.backend_name != "llamacpp":
            raise LtdError("method llama.cpp needs --backend llamacpp; on the hf backend use method hf (or ar)")

    def _generate_llamacpp(self, prompt: list[int], cfg: GenerateConfig) -> GenerateResult:
        if not cfg.sampling.greedy:
            raise LtdError("method llama.cpp decodes greedily only; use --method ar (or static) with --temperature")
        if not prompt:
            raise LtdError("the prompt is empty; give some text with --prompt")
        if len(prompt) + cfg.max_new_tokens > self.backend.max_context:
            raise LtdError(
                f"prompt ({len(prompt)} tokens) + max-new-tokens ({cfg.max_new_tokens}) exceeds the model's context "
                f"of {self.backend.max_context}; shorten the prompt or lower --max-new-tokens"
            )
        t0 = time.perf_counter()
        tokens = self.backend.greedy_generate(prompt, cfg.max_new_tokens, self.target.eos_token_ids)
        seconds = time.perf_counter() - t0
        return self._result("llama.cpp", tokens, seconds, len(tokens), 1.0)

    def _result(self, method, tokens, seconds, cycles, mean_accepted, log_=None) -> GenerateResult:
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

    @torch.inference_mode()
    def _generate_hf(self, prompt: list[int], cfg: GenerateConfig) -> GenerateResult:
        model = self.target.model
        if len(prompt) + cfg.max_new_tokens > self.backend.max_context:
            raise LtdError(
                f"prompt ({len(prompt)} tokens) + max-new-tokens ({cfg.max_new_tokens}) exceeds the model's context "
                f"of {self.backend.max_context}; shorten the prompt or lower --max-new-tokens"
            )
        if not prompt:
            raise LtdError("the prompt is empty; give some text with --prompt")
        ids = torch.tensor([prompt], dtype=torch.long, device=self.backend.device)
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, eos_token_id=self.target.eos_token_ids or None)
        if cfg.sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            if cfg.seed is not None:
                torch.manual_seed(cfg.seed)
            kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        pad = self.target.tokenizer.pad_token_id
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad if pad is not None else 0, **kwargs)
        seconds = time.perf_counter() - t0
        tokens = out[0, len(prompt):].tolist()
        return self._result("hf", tokens, seconds, len(tokens), 1.0)
