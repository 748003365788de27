"""Run a ``llama.cpp-spec`` method on an engine's prompts and report a GenerateResult.

Resolves what the tool needs from the bench's models: the target's GGUF (registry name
or ``.gguf`` path), the draft model's GGUF for ``draft-simple`` (``--assistant``, else
the registry's default small model for the target) and our EAGLE-3 head converted to
GGUF for ``draft-eagle3`` (``--drafter``, else the target's shipped head).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ltd.drafting.eagle3 import is_eagle3_dir, resolve_head_dir
from ltd.engine import GenerateResult, default_drafter_spec
from ltd.errors import LtdError
from ltd.models import registry_gguf
from ltd.peers.eagle3_gguf import eagle3_gguf
from ltd.peers.llamacpp_build import SPEC_BINARY, LlamaCppBuild, find_build
from ltd.peers.llamacpp_spec import (
    CONTEXT_MARGIN, KIND, PeerSpec, ToolRun, parse_spec_run, run_tool, spec_command,
)
from ltd.registry import REGISTRY

log = logging.getLogger(__name__)

BUILD_HINT = "ltd peers build llama.cpp"


def unbuilt_message(label: str) -> str:
    """The one line a bench prints when it skips a peer that is not built."""
    return f"skipping {label}: llama.cpp's speculative tools are not built; run: {BUILD_HINT}"


def peers_built() -> bool:
    return find_build() is not None


def target_gguf(model: str) -> Path:
    """The GGUF file llama.cpp runs for a bench ``--model``."""
    if model in REGISTRY:
        return registry_gguf(REGISTRY[model])
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise LtdError(f"{KIND} methods need a GGUF target: a registry model ({', '.join(REGISTRY)}) or a .gguf path, not {model!r}")


def draft_model_gguf(model: str, assistant: str | None) -> Path:
    """The small draft model for ``draft-simple``: ``--assistant`` or the registry default."""
    name = assistant
    if name is None:
        entry = REGISTRY.get(model)
        default = entry.default_drafter if entry else ""
        if default and default in REGISTRY:
            name = default
    if name is None:
        raise LtdError(
            f"{KIND}:draft-simple needs a small draft model for {model}; pass --assistant NAME "
            "(a registry model or .gguf with the target's tokenizer)"
        )
    return target_gguf(name)


def eagle3_head_dir(model: str, drafter: str | None) -> Path:
    spec = drafter or default_drafter_spec(model)
    if spec in ("", "none", "self"):
        raise LtdError(f"{KIND}:draft-eagle3 needs an EAGLE-3 head; pass --drafter builtin:NAME or a head directory")
    head_dir = resolve_head_dir(spec)
    if not is_eagle3_dir(head_dir):
        raise LtdError(f"{KIND}:draft-eagle3 needs an EAGLE-3 head, but {spec!r} is not one")
    return head_dir


class LlamaCppSpecPeer:
    """One ``llama.cpp-spec:TYPE[:N]`` method bound to a bench's target and drafters."""

    def __init__(
        self,
        spec: PeerSpec,
        engine,
        model: str,
        drafter: str | None = None,
        assistant: str | None = None,
        threads: int | None = None,
        build: LlamaCppBuild | None = None,
    ) -> None:
        import torch

        self.build = build or find_build()
        if self.build is None:
            raise LtdError(unbuilt_message(spec.label))
        self.spec = spec
        self.engine = engine
        self.target = target_gguf(model)
        self.threads = threads or torch.get_num_threads()
        self.draft: Path | None = None
        if spec.type == "draft-simple":
            self.draft = draft_model_gguf(model, assistant)
        elif spec.type == "draft-eagle3":
            self.draft = eagle3_gguf(self.build, eagle3_head_dir(model, drafter), engine.target)
        self.last_run: ToolRun | None = None

    @property
    def label(self) -> str:
        return self.spec.label

    def run(self, prompt: list[int], max_new_tokens: int, greedy: bool = True, seed: int | None = 0):
        """One generation; tokens are the output text re-tokenized (see llamacpp_spec)."""
        if not greedy:
            raise LtdError(f"{self.label} runs greedy only; use --temperature 0 or drop it from --methods")
        tok = self.engine.target.tokenizer
        prompt_text = tok.decode(prompt, skip_special_tokens=False)
        context = len(prompt) + max_new_tokens + CONTEXT_MARGIN
        cmd = spec_command(
            self.build.binary(SPEC_BINARY), self.spec, self.target, prompt_text, max_new_tokens, context,
            self.threads, self.draft, seed or 0, exact=bool(getattr(self.engine.backend, "exact", False)),
        )
        out, err = run_tool(cmd)
        run = parse_spec_run(out, err, prompt_text)
        if run.n_prompt != len(prompt):
            log.warning("%s tokenized the prompt to %d tokens, ours has %d: outputs may differ", self.label, run.n_prompt, len(prompt))
        self.last_run = run
        tokens = output_tokens(tok, run, max_new_tokens, self.engine.target.eos_token_ids, self.engine.prompt_tokenizer)
        rate = run.n_predict / run.seconds if run.seconds > 0 else 0.0
        # the tool may run past -n by part of a draft: time the tokens we keep at its own rate
        seconds = len(tokens) / rate if rate > 0 else run.seconds
        cycles = run.cycles
        return GenerateResult(
            method=self.label,
            tokens=tokens,
            text=tok.decode(tokens, skip_special_tokens=True),
            new_tokens=len(tokens),
            seconds=seconds,
            tokens_per_second=rate,
            cycles=cycles,
            mean_accepted=run.n_predict / cycles if cycles else float("nan"),
        )


def output_tokens(tokenizer, run: ToolRun, max_new_tokens: int, eos_ids: list[int], tokenize=None) -> list[int]:
    """Token ids of the tool's output text, with the end-of-generation token it consumed.

    ``tokenize(text, add_special)`` is llama.cpp's tokenizer (the backend's): the text is
    llama.cpp's, and HF's tokenizer splits some of it otherwise (":\n\n1" is one newline
    token for llama.cpp, two for HF), so the ids would differ where the text does not.
    The tool stops at an end-of-generation token without printing it; when it stopped
    before ``max_new_tokens``, the token is put back so that the ids compare with ours.
    """
    raw = tokenize(run.text, False) if tokenize is not None else tokenizer(run.text, add_special_tokens=False)["input_ids"]
    ids = [int(i) for i in raw][:max_new_tokens]
    if run.n_predict <= max_new_tokens and len(ids) < max_new_tokens and eos_ids:
        eos = getattr(tokenizer, "eos_token_id", None)
        ids.append(int(eos) if eos in eos_ids else int(eos_ids[0]))
    return ids
