"""The cost table of one speculative cycle on one machine, and its queries.

Our machines differ in exactly the costs that decide the best tree (docs/design.md):
how much a draft step, a verification forward of n tokens and the work around them
cost. :class:`LatencyModel` holds those measurements and predicts the time of any cycle.
It lives in the control layer because cost-aware controllers decide from it at decode
time; measuring it is :mod:`ltd.control.measure` (the quick profile) and
:mod:`ltd.rl.latency` (``ltd profile``, the full grid). The JSON format is shared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ltd.errors import LtdError
from ltd.fileio import atomic_write_json, read_json

LATENCY_FORMAT = "ltd-latency"
LATENCY_VERSION = 1


@dataclass
class LatencyModel:
    """Measured costs (seconds) of the parts of one cycle.

    Attributes:
        draft_topk: branching k the draft steps were measured with.
        draft_step_seconds: cost of draft step i (i = 0 is the root step); steps beyond
            the list cost as much as the last one.
        verify_tokens: grid of verified node counts (V + 1, the root included).
        verify_contexts: grid of committed context lengths.
        verify_seconds: ``[context][tokens]`` forward cost on that grid.
        cycle_overhead_seconds: select + accept + commit + drafter sync, per cycle.
        depth_policy_seconds / size_policy_seconds: one call of each LTD policy.
    """

    draft_topk: int
    draft_step_seconds: list[float]
    verify_tokens: list[int]
    verify_contexts: list[int]
    verify_seconds: list[list[float]]
    cycle_overhead_seconds: float = 0.0
    depth_policy_seconds: float = 0.0
    size_policy_seconds: float = 0.0
    model: str = ""
    drafter: str = ""
    repeats: int = 0
    machine: dict = field(default_factory=dict)
    version: int = LATENCY_VERSION

    def __post_init__(self) -> None:
        self.verify_tokens = [int(t) for t in self.verify_tokens]
        self.verify_contexts = [int(c) for c in self.verify_contexts]
        grid = np.asarray(self.verify_seconds, dtype=np.float64)
        if grid.shape != (len(self.verify_contexts), len(self.verify_tokens)) or grid.size == 0:
            raise LtdError(
                f"latency profile verify grid has shape {grid.shape}, expected "
                f"({len(self.verify_contexts)}, {len(self.verify_tokens)}); re-run ltd profile"
            )
        if self.verify_tokens != sorted(set(self.verify_tokens)) or self.verify_contexts != sorted(set(self.verify_contexts)):
            raise LtdError("latency profile grid points must be increasing; re-run ltd profile")
        self._grid = grid
        self._tokens = np.asarray(self.verify_tokens, dtype=np.float64)
        self._contexts = np.asarray(self.verify_contexts, dtype=np.float64)
        self._draft_cum = np.concatenate([[0.0], np.cumsum(self.draft_step_seconds)]) if self.draft_step_seconds else np.zeros(1)

    # -- predictions -------------------------------------------------------------------
    def draft_seconds(self, depth: int) -> float:
        """Cost of ``depth`` draft steps."""
        if depth <= 0:
            return 0.0
        if not self.draft_step_seconds:
            raise LtdError("this latency profile has no draft steps (measured without a drafter); re-run ltd profile --drafter ...")
        n = len(self.draft_step_seconds)
        if depth <= n:
            return float(self._draft_cum[depth])
        return float(self._draft_cum[n] + (depth - n) * self.draft_step_seconds[-1])

    def draft_step(self, index: int) -> float:
        """Cost of draft step ``index`` (0 = root step)."""
        if not self.draft_step_seconds:
            raise LtdError("this latency profile has no draft steps (measured without a drafter); re-run ltd profile --drafter ...")
        return float(self.draft_step_seconds[min(index, len(self.draft_step_seconds) - 1)])

    def verify_time(self, tokens: int, context: int) -> float:
        """One target forward over ``tokens`` tree nodes after ``context`` committed tokens."""
        return float(self._at(np.array([tokens], dtype=np.float64), context)[0])

    def verify_curve(self, max_tokens: int, context: int) -> np.ndarray:
        """Verification cost of 1..``max_tokens`` tokens after ``context`` (entry i: i + 1
        tokens), as :meth:`verify_time` gives them, in one vectorised call for controllers
        that compare every size each cycle."""
        return self._at(np.arange(1, max(int(max_tokens), 1) + 1, dtype=np.float64), context)

    def _at(self, n: np.ndarray, context: int) -> np.ndarray:
        """Costs of ``n`` tokens: interpolated between the two nearest measured contexts."""
        c = self._contexts
        if c.size == 1 or context <= c[0]:
            return self._curve(n, self._grid[0])
        if context >= c[-1]:
            return self._curve(n, self._grid[-1])
        j = int(np.searchsorted(c, context)) - 1
        w = (context - c[j]) / (c[j + 1] - c[j])
        return (1 - w) * self._curve(n, self._grid[j]) + w * self._curve(n, self._grid[j + 1])

    def _curve(self, n: np.ndarray, row: np.ndarray) -> np.ndarray:
        """One context's costs at token counts ``n``: interpolated, linear beyond the grid."""
        t = self._tokens
        out = np.interp(n, t, row)
        if t.size > 1:
            slope = max((row[-1] - row[-2]) / (t[-1] - t[-2]), 0.0)
            beyond = n > t[-1]
            out[beyond] = row[-1] + slope * (n[beyond] - t[-1])
        return out

    def cycle_seconds(
        self, depth: int, size: int, context: int, depth_policy_calls: int = 0, size_policy_calls: int = 0
    ) -> float:
        """Modelled time of a cycle drafting ``depth`` steps and verifying ``size`` drafted
        nodes after ``context`` committed tokens (depth 0: a plain decoding step)."""
        size = size if depth > 0 else 0
        return (
            self.draft_seconds(depth)
            + self.verify_time(size + 1, context)
            + self.cycle_overhead_seconds
            + depth_policy_calls * self.depth_policy_seconds
            + size_policy_calls * self.size_policy_seconds
        )

    def ar_seconds(self, context: int) -> float:
        """Time of one plain decoding step (the unit of the RL reward)."""
        return self.cycle_seconds(0, 0, context)

    # -- persistence -------------------------------------------------------------------
    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items()}
        return {"format": LATENCY_FORMAT, **data}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @staticmethod
    def from_json(data: dict, where: str = "latency profile") -> "LatencyModel":
        if data.get("format") != LATENCY_FORMAT:
            raise LtdError(f"{where} is not an ltd latency profile (format {data.get('format')!r}); create one with ltd profile")
        if int(data.get("version", -1)) != LATENCY_VERSION:
            raise LtdError(f"{where} has version {data.get('version')}, this ltd reads {LATENCY_VERSION}; re-run ltd profile")
        fields = {k: v for k, v in data.items() if k != "format"}
        try:
            return LatencyModel(**fields)
        except TypeError as exc:
            raise LtdError(f"{where} has unexpected fields ({exc}); re-run ltd profile") from None

    @staticmethod
    def load(path: str | Path) -> "LatencyModel":
        return LatencyModel.from_json(read_json(path, "latency profile"), where=str(path))

    def summary(self) -> str:
        """A few lines for the terminal."""
        cpu = self.machine.get("cpu_model", "unknown CPU")
        steps = ", ".join(f"{1e3 * s:.2f}" for s in self.draft_step_seconds[:8])
        ctx = self.verify_contexts[len(self.verify_contexts) // 2]
        verify = ", ".join(f"{t - 1}:{1e3 * self.verify_time(t, ctx):.1f}" for t in self.verify_tokens)
        return "\n".join([
            f"CPU: {cpu}",
            f"draft steps (ms, k={self.draft_topk}): {steps}",
            f"verify at context {ctx} (V:ms): {verify}",
            f"cycle overhead {1e3 * self.cycle_overhead_seconds:.2f} ms, policy calls: depth "
            f"{1e6 * self.depth_policy_seconds:.0f} us, size {1e6 * self.size_policy_seconds:.0f} us",
        ])
