"""What ``--online knn``, ``memory`` and ``knn+memory`` turn on, and their state on disk.

``knn`` lets the EAGLE-3 head's drafts be voted on by the stored states nearest to its
own, labelled by the target (:class:`ltd.online.knn.KnnMemory`), by wrapping the head
drafter in a :class:`ltd.online.knn_drafter.KnnDrafter` (a hybrid's head half, when the
drafter is a hybrid). One object builds the wrapped drafter and saves/restores what it
learned under one state directory, so the engine, the CLI, the server and the bench
handle it alike.

``memory`` turns on the suffix drafter's cross-request store of past outputs
(:class:`ltd.drafting.suffix.SuffixStore`, bounded by a token budget), for a drafter that is
a suffix drafter or a hybrid whose model-free half is one. It replaces the n-gram stream
memory, which measured 1.00-1.05x. The gradient learners of the head's weights (``plain``,
``optimistic``, ``hedge``) measured the same and were removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ltd.defaults import ONLINE_VARIANTS
from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.drafting.hybrid import HybridDrafter, hybrid_part
from ltd.drafting.suffix import STORE_FILES, SuffixDrafter, SuffixStore
from ltd.errors import LtdError
from ltd.fileio import atomic_dir
from ltd.online.knn import KNN_FILES, KnnConfig, KnnMemory, head_fingerprint
from ltd.online.knn_drafter import KnnDrafter

VARIANTS = ONLINE_VARIANTS
ADAPTER_FILE = "adapter.json"


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise LtdError(f"unknown online variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def head_drafter(drafter) -> Eagle3Drafter:
    """The EAGLE-3 drafter a kNN memory wraps: the drafter itself, or a hybrid's model half."""
    return hybrid_part(drafter, "model", Eagle3Drafter,
                       "online adaptation needs an EAGLE-3 head drafter (--drafter builtin:... or a head dir, alone or in a hybrid:ngram+...)")


def suffix_drafter(drafter) -> SuffixDrafter:
    """The suffix drafter whose store ``memory`` turns on: the drafter itself, or a hybrid's model-free half."""
    return hybrid_part(drafter, "ngram", SuffixDrafter,
                       "online memory needs a suffix drafter (--drafter suffix or hybrid:suffix+...); "
                       "use --online knn for an EAGLE-3 head")


class OnlineAdapter:
    """The online adaptation of one drafter: ``drafter`` is the wrapped drafter to decode with."""

    def __init__(self, drafter, variant: str = "knn", knn_config: KnnConfig | None = None) -> None:
        check_variant(variant)
        self.variant = variant
        parts = variant.split("+")
        self.store: SuffixStore | None = suffix_drafter(drafter).enable_store() if "memory" in parts else None
        self.knn: KnnMemory | None = None
        self.drafter = drafter
        if "knn" in parts:
            head = head_drafter(drafter)
            self.knn = KnnMemory(head.head.config.hidden_size, head_fingerprint(head.head), knn_config)
            wrapped = KnnDrafter(head, self.knn)
            if isinstance(drafter, HybridDrafter):  # the same split as the frozen drafter (@D included)
                self.drafter = HybridDrafter(drafter.ngram, wrapped, model_depth=drafter.model_depth)
            else:
                self.drafter = wrapped

    # -- persistence -------------------------------------------------------------------
    def save_state(self, directory: str | Path) -> None:
        """Save what was learned, the request being served included (atomic)."""
        if self.store is not None:
            suffix_drafter(self.drafter).remember()

        def write(tmp: Path) -> None:
            if self.knn is not None:
                self.knn.write_files(tmp)
            if self.store is not None:
                self.store.write_files(tmp)
            (tmp / ADAPTER_FILE).write_text(json.dumps({"variant": self.variant}, indent=2))

        atomic_dir(directory, write)

    def load_state(self, directory: str | Path) -> None:
        """Restore a saved state; a state from another variant is refused with the fix."""
        directory = Path(directory)
        try:
            saved = json.loads((directory / ADAPTER_FILE).read_text()).get("variant")
        except (json.JSONDecodeError, OSError, AttributeError):
            raise LtdError(f"online state in {directory} is corrupt; reset it with: ltd online reset {directory}") from None
        if saved != self.variant:
            raise LtdError(f"online state in {directory} is for --online {saved}, not {self.variant}; use the same --online or reset it")
        if self.knn is not None:
            self.knn.read_files(directory)
        if self.store is not None:
            self.store.read_files(directory)


def has_state(directory: str | Path) -> bool:
    """Whether a directory holds saved online state."""
    d = Path(directory)
    return any((d / name).exists() for name in (ADAPTER_FILE, *KNN_FILES, *STORE_FILES))


def reset_state(directory: str | Path) -> bool:
    """Delete a saved online state; returns whether something was deleted."""
    directory = Path(directory)
    if directory.is_dir() and has_state(directory):
        shutil.rmtree(directory)
        return True
    return False
