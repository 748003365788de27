"""EAGLE-3 head checkpoints: where they live, how to tell one, reading and writing them.

A head is a directory with ``config.json`` (architecture ``LlamaForCausalLMEagle3``)
and ``model.safetensors``; the package ships some under ``assets/drafters`` as
``builtin:NAME``. The loader, the trainer, the exporter and the llama.cpp peer all
resolve, read and write heads here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ltd.drafting.eagle3.model import Eagle3Config, Eagle3Head
from ltd.errors import LtdError
from ltd.fileio import atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ASSETS = Path(__file__).resolve().parents[2] / "assets" / "drafters"
BUILTIN = "builtin:"


def builtin_drafter_dir(name: str) -> Path:
    """The directory of the shipped head ``builtin:NAME`` (it may be missing from an install)."""
    return ASSETS / name


def is_eagle3_dir(path: Path) -> bool:
    """Whether ``path`` holds an EAGLE-3 head (its config names an Eagle3 architecture)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        raise LtdError(f"{cfg} is not valid JSON; re-export or retrain the drafter") from None
    return any("Eagle3" in a for a in data.get("architectures", []) or [])


def is_head_spec(spec: str) -> bool:
    """Whether a drafter spec names an EAGLE-3 head (``builtin:NAME`` or a head directory)."""
    return spec.startswith(BUILTIN) or (Path(spec).is_dir() and is_eagle3_dir(Path(spec)))


def resolve_head_dir(spec: str) -> Path:
    """``builtin:NAME`` or a directory holding an EAGLE-3 head."""
    if spec.startswith(BUILTIN):
        path = builtin_drafter_dir(spec[len(BUILTIN):])
        if not path.is_dir():
            known = ", ".join(f"builtin:{p.name}" for p in sorted(ASSETS.glob("*"))) or "none"
            raise LtdError(f"no built-in drafter {spec!r}; available: {known}")
        return path
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise LtdError(f"drafter {spec!r} is neither builtin:NAME nor an EAGLE-3 head directory; check the path")
    return path


def save_head(head: Eagle3Head, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write config.json + model.safetensors atomically (float tensors in ``dtype``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in head.state_dict().items()
    }
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(head.config.to_json_dict(), indent=2)
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))


def load_head(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Eagle3Head:
    """Read a head written by :func:`save_head` or exported in the standard layout (EAGLE, SpecForge)."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise LtdError(f"no EAGLE-3 head in {directory}: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        cfg = Eagle3Config.from_json_dict(json.loads(cfg_path.read_text()))
        state = load_file(str(w_path))
    except (json.JSONDecodeError, OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise LtdError(f"corrupt drafter checkpoint in {directory} ({exc}); retrain or re-download it") from None
    state = {k.replace("layers.0.", "midlayer."): v for k, v in state.items()}
    state.pop("embed_tokens.weight", None)
    head = Eagle3Head(cfg)
    if "d2t" not in state:  # full-vocabulary head
        state["d2t"] = torch.zeros(cfg.draft_vocab_size, dtype=torch.long)
        state["t2d"] = torch.ones(cfg.vocab_size, dtype=torch.bool)
    state["d2t"] = state["d2t"].to(torch.long)  # exports store int64; older files any int type
    state["t2d"] = state["t2d"].to(torch.bool)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise LtdError(f"drafter checkpoint in {directory} does not match its config: {first}") from None
    return head.to(device=device, dtype=dtype)


def check_head_matches_target(cfg: Eagle3Config, target_config, where: str) -> None:
    """Refuse a head built for another target, naming both shapes."""
    th, tv = int(target_config.hidden_size), int(target_config.vocab_size)
    n = int(target_config.num_hidden_layers)
    if cfg.target_hidden_size != th or cfg.vocab_size != tv:
        raise LtdError(
            f"drafter {where} was built for hidden size {cfg.target_hidden_size} and vocabulary "
            f"{cfg.vocab_size}, but the target has hidden size {th} and vocabulary {tv}; "
            "use a drafter trained for this target (ltd train-drafter)"
        )
    bad = [i for i in cfg.eagle_aux_hidden_state_layer_ids if not 0 <= i <= n]
    if bad:
        raise LtdError(f"drafter {where} reads target layers {bad}, but the target has {n} layers")
