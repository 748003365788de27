"""A fixed table of draft length by batch size: the serving engines' baseline.

vLLM (``num_speculative_tokens_per_batch_size``) and TensorRT-LLM (``draft_len_schedule``)
shrink the draft as the batch grows, from a hand-set table. This controller does the
same so a batched server can be compared with it: each cycle it reads how many
sequences the batch holds (:meth:`bind_load`) and drafts the table's depth for the
largest batch size listed at or below that, verifying every level's best node
(size = depth, branching ``topk``). Alone (no batch) it uses the table's first entry.
"""

from __future__ import annotations

from typing import Callable

from ltd.control.base import ControllerBase, validate_static
from ltd.controller import DraftStepState
from ltd.defaults import DEFAULT_SCHEDULE
from ltd.errors import LtdError


def parse_schedule(text: str) -> dict[int, int]:
    """``"1:3,2:2,4:1,8:0"`` -> {1: 3, 2: 2, 4: 1, 8: 0}, with a one-line error naming the form."""
    table: dict[int, int] = {}
    try:
        for item in text.split(","):
            batch, depth = item.split(":")
            table[int(batch)] = int(depth)
    except ValueError:
        raise LtdError(f"--schedule {text!r}: write BATCH:LENGTH pairs, e.g. {DEFAULT_SCHEDULE}") from None
    if not table or min(table) < 1 or min(table.values()) < 0:
        raise LtdError(f"--schedule {text!r}: batch sizes must be >= 1 and lengths >= 0, e.g. {DEFAULT_SCHEDULE}")
    for depth in table.values():
        validate_static(depth, 1, max(depth, 1))
    return dict(sorted(table.items()))


class ScheduleController(ControllerBase):
    """Draft length from a table keyed by the number of sequences in the batch."""

    def __init__(self, schedule: str | dict[int, int] = DEFAULT_SCHEDULE, topk: int = 8) -> None:
        self.table = parse_schedule(schedule) if isinstance(schedule, str) else dict(sorted(schedule.items()))
        validate_static(0, topk, 0)
        self.topk = topk
        self._load: Callable[[], object] | None = None
        self._depth = self._depth_for(1)

    def bind_load(self, probe: Callable[[], object]) -> None:
        """Read the batch size from ``probe()`` (a :class:`ltd.backends.packed.BatchLoad`)."""
        self._load = probe

    def _depth_for(self, active: int) -> int:
        depth = next(iter(self.table.values()))
        for batch, length in self.table.items():
            if batch <= active:
                depth = length
        return depth

    def _start_cycle(self) -> int:
        """Fix this cycle's length from the batch size now."""
        self._depth = self._depth_for(self._load().active if self._load is not None else 1)
        return self._depth

    def continue_drafting(self, state: DraftStepState) -> bool:
        if state.step == 0:  # fixed for the cycle when it starts
            self._start_cycle()
        return state.step < self._depth

    def choose_size(self, state: DraftStepState) -> int:
        return min(self._depth, state.tree.num_drafted)

    def depth_limit(self) -> int:
        """This cycle's length (asked before the first draft step)."""
        return self._start_cycle()
