"""Controllers decide, every cycle, how deep to draft and how many nodes to verify.

The cycle asks :meth:`Controller.continue_drafting` before each draft step and
:meth:`Controller.choose_size` once drafting stops. Learned controllers (LTD policies)
implement the same two methods, so they plug in without touching the cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ltd.errors import LtdError
from ltd.tree import Tree


@dataclass
class DraftStepState:
    """What a controller sees while drafting.

    Attributes:
        step: draft steps done so far (0 = nothing drafted yet; the tree's depth).
        candidate_scores: cumulative scores of the candidates proposed by the last step
            (k for the first step, k*k after), empty before the first step.
        context_length: committed tokens (prompt + generated).
        tree: the tree drafted so far.
        topk: branching factor in use.
    """

    step: int
    candidate_scores: torch.Tensor
    context_length: int
    tree: Tree
    topk: int


class Controller(Protocol):
    """Chooses draft depth (step by step) and verification size.

    ``observe_result`` receives each finished cycle's result (accepted length, timings),
    for controllers that adapt from feedback; stateless ones ignore it.
    """

    def continue_drafting(self, state: DraftStepState) -> bool: ...

    def choose_size(self, state: DraftStepState) -> int: ...

    def observe_result(self, result) -> None: ...


class ControllerBase:
    """Default no-op feedback hook for controllers that do not adapt."""

    def observe_result(self, result) -> None:
        return None


@dataclass
class StaticController(ControllerBase):
    """Fixed depth D, branching K and verification size V (EAGLE-2/3 defaults style)."""

    depth: int = 5
    topk: int = 8
    size: int = 32

    def __post_init__(self) -> None:
        validate_static(self.depth, self.topk, self.size)

    def continue_drafting(self, state: DraftStepState) -> bool:
        return state.step < self.depth

    def choose_size(self, state: DraftStepState) -> int:
        return min(self.size, state.tree.num_drafted)


MAX_DEPTH = 64
MAX_TOPK = 64
MAX_SIZE = 1024


def validate_static(depth: int, topk: int, size: int) -> None:
    """One-line errors for out-of-range static settings."""
    if not 0 <= depth <= MAX_DEPTH:
        raise LtdError(f"--depth must be between 0 and {MAX_DEPTH}, got {depth}")
    if not 1 <= topk <= MAX_TOPK:
        raise LtdError(f"--topk must be between 1 and {MAX_TOPK}, got {topk}")
    if not 0 <= size <= MAX_SIZE:
        raise LtdError(f"--size must be between 0 and {MAX_SIZE}, got {size}")
    if depth > 0 and size == 0:
        raise LtdError("--size 0 verifies nothing; use --depth 0 for plain decoding or a size >= 1")
