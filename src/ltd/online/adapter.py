"""What ``--online VARIANT`` turns on: a gradient learner for the head, a kNN memory
for the head, a stream memory for the n-gram drafter, or several of them.

``plain``, ``optimistic`` and ``hedge`` adapt the EAGLE-3 head's weights
(:class:`ltd.online.learner.OnlineLearner`); ``knn`` lets the head's drafts be voted on
by the stored states nearest to its own, labelled by the target
(:class:`ltd.online.knn.KnnMemory`); ``memory`` lets the n-gram drafter search the
sequences served before (:class:`ltd.online.memory.StreamMemory`) and re-learn how far
to trust its matches (:class:`ltd.online.reliability.OnlineReliability`). They combine
with ``+`` in that order (``knn+memory``, ``plain+knn``). One object listens to commits
and saves/restores everything under one state directory, so the engine, the CLI, the
server and the bench handle every variant alike.
"""

from __future__ import annotations

import json
from pathlib import Path

from dataclasses import dataclass
from itertools import product

from ltd.drafting.suffix import STORE_FILES, SuffixDrafter
from ltd.errors import LtdError
from ltd.fileio import atomic_dir
from ltd.online.knn import KNN_FILES, KnnConfig, KnnMemory, head_fingerprint
from ltd.online.learner import GRADIENT_VARIANTS, LEARNER_FILES, OnlineConfig, OnlineLearner, adaptable_head
from ltd.online.memory import MEMORY_FILES, StreamMemory
from ltd.online.reliability import OnlineReliability

KNN = "knn"
MEMORY = "memory"
VARIANTS = tuple(
    "+".join(p for p in parts if p)
    for parts in product((None,) + GRADIENT_VARIANTS, (None, KNN), (None, MEMORY))
    if any(parts)
)
ADAPTER_FILE = "adapter.json"
RELIABILITY_FILE = "reliability.json"


@dataclass(frozen=True)
class OnlineParts:
    """The components one ``--online`` variant turns on."""

    gradient: str | None  # plain | optimistic | hedge, or None
    knn: bool
    memory: bool


def parse_variant(variant: str) -> OnlineParts:
    """``plain`` -> (plain, no kNN, no memory); ``knn+memory`` -> (None, kNN, memory)."""
    if variant not in VARIANTS:
        raise LtdError(f"unknown online variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    parts = variant.split("+")
    gradient = parts[0] if parts[0] in GRADIENT_VARIANTS else None
    return OnlineParts(gradient=gradient, knn=KNN in parts, memory=MEMORY in parts)


def ngram_part(drafter):
    """The model-free drafter the memory attaches to: the drafter itself or a hybrid's first half."""
    from ltd.drafting.hybrid import hybrid_part
    from ltd.drafting.ngram import NgramDrafter

    return hybrid_part(drafter, "ngram", (NgramDrafter, SuffixDrafter),
                       "online memory needs an n-gram drafter or a suffix drafter (--drafter ngram, suffix, hybrid:ngram+... "
                       "or hybrid:suffix+...); drop +memory for a head alone")


class OnlineAdapter:
    """The online adaptation of one drafter: optional gradient learner, optional stream memory."""

    def __init__(self, drafter, variant: str, knn_config: KnnConfig | None = None, **overrides) -> None:
        parts = parse_variant(variant)
        self.variant = variant
        self.learner = OnlineLearner(drafter, OnlineConfig(variant=parts.gradient, **overrides)) if parts.gradient else None
        if overrides and self.learner is None:
            raise LtdError(f"online settings {sorted(overrides)} apply to the head learner; variant {variant!r} has none")
        if knn_config is not None and not parts.knn:
            raise LtdError(f"kNN settings apply to the kNN memory; variant {variant!r} has none")
        self.knn = None
        if parts.knn:
            head_drafter = adaptable_head(drafter)
            head = head_drafter.head
            self.knn = KnnMemory(head.config.hidden_size, head_fingerprint(head), knn_config)
            head_drafter.knn = self.knn
        self.ngram = ngram_part(drafter) if parts.memory else None
        self.memory = None
        self.reliability = None
        if isinstance(self.ngram, SuffixDrafter):
            self.memory = self.ngram.enable_store()  # its global store of past outputs (no q re-learning)
        elif self.ngram is not None:
            self.memory = StreamMemory()
            self.ngram.memory = self.memory
            self.reliability = OnlineReliability(self.ngram.reliabilities)
            self.ngram.calibration = self.reliability

    @property
    def learns_from_commits(self) -> bool:
        """Whether the cycle must hand this adapter every commit's logits.

        Only the head learner does; the memory learns from finished sequences. A listener
        makes the prefill compute the LM head at every prompt position (SmolLM2, 1 thread:
        0.6 s more prefill over 4 humaneval prompts, in a profile), which the memory
        alone must not pay.
        """
        return self.learner is not None

    def on_commit(self, tokens, logits, features) -> None:
        if self.learner is not None:
            self.learner.on_commit(tokens, logits, features)

    # -- persistence -------------------------------------------------------------------
    def save_state(self, directory: str | Path) -> None:
        """Save what was learned, the sequence being served included (atomic)."""
        if self.ngram is not None:
            self.ngram.remember()

        def write(tmp: Path) -> None:
            if self.learner is not None:
                self.learner.write_files(tmp)
            if self.knn is not None:
                self.knn.write_files(tmp)
            if self.memory is not None:
                self.memory.write_files(tmp)
            if self.reliability is not None:
                (tmp / RELIABILITY_FILE).write_text(json.dumps(self.reliability.to_json(), indent=2))
            (tmp / ADAPTER_FILE).write_text(json.dumps({"variant": self.variant}, indent=2))

        atomic_dir(directory, write)

    def load_state(self, directory: str | Path) -> None:
        """Restore a saved state; a state from another variant is refused with the fix."""
        directory = Path(directory)
        try:
            saved = json.loads((directory / ADAPTER_FILE).read_text()).get("variant")
        except FileNotFoundError:
            saved = None  # a state saved before the adapter existed: the learner's own files
        except (json.JSONDecodeError, OSError, AttributeError):
            raise LtdError(f"online state in {directory} is corrupt; reset it with: ltd online reset {directory}") from None
        if saved is not None and saved != self.variant:
            raise LtdError(f"online state in {directory} is for --online {saved}, not {self.variant}; use the same --online or reset it")
        if self.learner is not None:
            self.learner.load_state(directory)
        if self.knn is not None:
            self.knn.read_files(directory)
        if self.memory is not None:
            self.memory.read_files(directory)
        if self.reliability is not None:
            self._read_reliability(directory / RELIABILITY_FILE)

    def _read_reliability(self, path: Path) -> None:
        """Restore the learned reliability counts; a state saved before they existed keeps the prior."""
        if not path.is_file():
            return
        try:
            self.reliability.load_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, OSError, KeyError, TypeError, ValueError):
            raise LtdError(f"online state in {path.parent} has a corrupt {path.name}; reset it with: ltd online reset {path.parent}") from None


def has_state(directory: str | Path) -> bool:
    """Whether a directory holds saved online state of any variant."""
    d = Path(directory)
    return any((d / name).exists() for name in (*LEARNER_FILES, ADAPTER_FILE, *KNN_FILES, *MEMORY_FILES, RELIABILITY_FILE, *STORE_FILES))
