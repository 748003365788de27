"""Where EAGLE-3 head checkpoints live, and how to tell a directory holds one.

A head is a directory with ``config.json`` (architecture ``LlamaForCausalLMEagle3``)
and ``model.safetensors``; the package ships some under ``assets/drafters`` as
``builtin:NAME``. The loader, the exporter and the llama.cpp peer all resolve heads here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ltd.errors import LtdError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "drafters"
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
