"""Our EAGLE-3 head as a llama.cpp GGUF, made with llama.cpp's own converter.

The head is exported in the standard layout (:mod:`ltd.drafting.export`) and then
``convert_hf_to_gguf.py HEAD --target-model-dir HEAD/target`` from the built sdist
turns it into GGUF. The result is cached by the hash of the head's files, so a bench
converts each head once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ltd.drafting.eagle3 import load_head
from ltd.drafting.export import write_export
from ltd.errors import LtdError
from ltd.peers.llamacpp_build import LlamaCppBuild

log = logging.getLogger(__name__)


def head_key(head_dir: Path) -> str:
    """A short content hash of a head directory (config + weights)."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        path = head_dir / name
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def check_converter_deps() -> None:
    """The converter imports sentencepiece (and torch, numpy) at tokenizer time."""
    missing = [m for m in ("sentencepiece", "numpy", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        raise LtdError(f"llama.cpp's converter needs {', '.join(missing)}; pip install {' '.join(missing)}")


def convert_export(build: LlamaCppBuild, head_dir: Path, target_dir: Path, outfile: Path) -> Path:
    """Run llama.cpp's converter on an exported head (one-line error on failure)."""
    check_converter_deps()
    if not build.converter.is_file():
        raise LtdError(f"{build.converter} is missing; rebuild with ltd peers build llama.cpp --force")
    outfile.parent.mkdir(parents=True, exist_ok=True)
    partial = outfile.with_name(outfile.name + ".partial")
    cmd = [sys.executable, str(build.converter), str(head_dir), "--target-model-dir", str(target_dir),
           "--outfile", str(partial), "--outtype", "f16"]
    log.info("converting %s to GGUF with llama.cpp's converter", head_dir)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not partial.is_file():
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        partial.unlink(missing_ok=True)
        raise LtdError(f"llama.cpp's converter rejected the EAGLE-3 export: {last.strip()[:300]}")
    partial.replace(outfile)
    return outfile


def eagle3_gguf(build: LlamaCppBuild, head_dir: Path, target) -> Path:
    """The cached GGUF of the head in ``head_dir`` for a loaded target (``LoadedModel``)."""
    out = build.root / "eagle3" / f"{head_dir.name}-{head_key(head_dir)}.gguf"
    if out.is_file():
        return out
    head = load_head(head_dir)
    tmp = Path(tempfile.mkdtemp(prefix="ltd-eagle3-export-"))
    try:
        res = write_export(head, target.model.get_input_embeddings().weight, target.model.config, target.tokenizer, tmp / "head")
        return convert_export(build, res.head_dir, res.target_dir, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
