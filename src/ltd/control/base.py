"""The static controller and the checks every controller's settings share.

Controllers decide, every cycle, how deep to draft and how many nodes to verify: the
cycle asks :meth:`ltd.controller.Controller.continue_drafting` before each draft step
and :meth:`~ltd.controller.Controller.choose_size` once drafting stops. Learned
controllers (:mod:`ltd.control.learned`) implement the same two methods, so they plug
in without touching the cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

from ltd.controller import DraftStepState
from ltd.errors import LtdError


class ControllerBase:
    """Default no-op feedback hook for controllers that do not adapt."""

    def observe_result(self, result) -> None:
        return None

    def depth_limit(self) -> int | None:
        """The deepest draft this controller allows (see :func:`ltd.controller.depth_limit`); None: no cap."""
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

    def depth_limit(self) -> int:
        return self.depth


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
