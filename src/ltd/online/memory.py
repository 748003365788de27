"""Stream memory: the sequences served before, joined for n-gram matching (experimental).

Kept for the n-gram analyses (its match length and separator); no default path imports
it. The ``--online memory`` variant that let the n-gram drafter search it measured
1.00-1.05x and was removed. The memory keeps the last ``capacity`` tokens of finished
sequences (prompt and output, separated by :data:`SEP`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ltd.drafting.ngram import SEP  # between remembered sequences: no match or continuation crosses it
from ltd.errors import LtdError

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 32768
DEFAULT_MAX_N = 4  # longest suffix looked up in the memory (the context uses the drafter's own)
MEMORY_VERSION = 1
MEMORY_FILES = ("memory.json", "memory.safetensors")


class StreamMemory:
    """The last ``capacity`` tokens of finished sequences, separators included."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_n: int = DEFAULT_MAX_N) -> None:
        if capacity < 16 or max_n < 1:
            raise LtdError(f"stream memory needs capacity >= 16 and max_n >= 1, got {capacity} and {max_n}")
        self.capacity = capacity
        self.max_n = max_n
        self.tokens = np.zeros(0, dtype=np.int64)
        self.sequences = 0  # sequences remembered so far (trimmed ones included)

    def __len__(self) -> int:
        return int(self.tokens.size)

    def add(self, sequence: Sequence[int]) -> None:
        """Remember one finished sequence; the oldest tokens go when over capacity."""
        if len(sequence) < 2:
            return
        seq = np.asarray(sequence, dtype=np.int64)
        self.tokens = np.concatenate([self.tokens, np.asarray([SEP], dtype=np.int64), seq])[-self.capacity :]
        self.sequences += 1

    def joined(self, context: np.ndarray) -> np.ndarray:
        """Memory, a separator, then the current context: one array to search."""
        return np.concatenate([self.tokens, np.asarray([SEP], dtype=np.int64), context])

    # -- persistence (files inside an online state directory) ----------------------------
    def write_files(self, directory: Path) -> None:
        save_file({"tokens": torch.from_numpy(self.tokens.copy())}, str(directory / "memory.safetensors"))
        meta = {"version": MEMORY_VERSION, "capacity": self.capacity, "max_n": self.max_n, "sequences": self.sequences}
        (directory / "memory.json").write_text(json.dumps(meta, indent=2))

    def read_files(self, directory: Path) -> None:
        meta_path, tok_path = directory / "memory.json", directory / "memory.safetensors"
        if not meta_path.is_file() or not tok_path.is_file():
            raise LtdError(f"online state in {directory} has no stream memory (made without memory); reset it with: ltd online reset {directory}")
        try:
            meta = json.loads(meta_path.read_text())
            tokens = load_file(str(tok_path))["tokens"]
        except (json.JSONDecodeError, OSError, SafetensorError, KeyError) as exc:
            raise LtdError(f"stream memory in {directory} is corrupt ({type(exc).__name__}); reset it with: ltd online reset {directory}") from None
        if meta.get("version") != MEMORY_VERSION or tokens.dim() != 1 or tokens.dtype != torch.int64:
            raise LtdError(f"stream memory in {directory} was made by another version; reset it with: ltd online reset {directory}")
        self.tokens = tokens.numpy()[-self.capacity :].copy()
        self.sequences = int(meta.get("sequences", 0))
        log.info("stream memory: restored %d tokens (%d sequences) from %s", len(self), self.sequences, directory)
