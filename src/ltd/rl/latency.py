"""The cost model of one speculative cycle on this machine, and the profiler that measures it.

Our machines differ in exactly the costs that decide the best tree (docs/design.md),
so nothing here is a constant: :func:`profile` measures, with the real backend and the
real drafter, the cost of

- each draft step, by step index (step 0 proposes the root's k children; later steps
  expand a frontier of k nodes into k*k candidates; a drafter that drafts its whole tree
  at once costs it all in step 0 and nothing after);
- one verification forward, by the number of tree nodes it scores (V + 1, the root
  included) and by the committed context length, on a grid that is interpolated;
- the fixed per-cycle work around them (select, accept, commit, drafter sync);
- one call of each LTD policy (observation building + MLP forward).

:class:`LatencyModel` stores these as JSON (with the CPU model, so a profile from one
machine is never mistaken for another's) and predicts the time of any cycle.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ltd.errors import LtdError
from ltd.fileio import atomic_write, atomic_write_json, read_json

log = logging.getLogger(__name__)

LATENCY_FORMAT = "ltd-latency"
LATENCY_VERSION = 1
DEFAULT_VERIFY_TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 65)
DEFAULT_CONTEXTS = (128, 512, 1024)


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

    def _row(self, tokens: float, row: np.ndarray) -> float:
        t = self._tokens
        if tokens <= t[-1] or t.size == 1:
            return float(np.interp(tokens, t, row))
        slope = max((row[-1] - row[-2]) / (t[-1] - t[-2]), 0.0)  # linear beyond the grid
        return float(row[-1] + slope * (tokens - t[-1]))

    def verify_time(self, tokens: int, context: int) -> float:
        """One target forward over ``tokens`` tree nodes after ``context`` committed tokens."""
        c = self._contexts
        if c.size == 1 or context <= c[0]:
            return self._row(tokens, self._grid[0])
        if context >= c[-1]:
            return self._row(tokens, self._grid[-1])
        j = int(np.searchsorted(c, context)) - 1
        w = (context - c[j]) / (c[j + 1] - c[j])
        return (1 - w) * self._row(tokens, self._grid[j]) + w * self._row(tokens, self._grid[j + 1])

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


# -- profiling ----------------------------------------------------------------------------


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def _bushy_parents(n: int, k: int) -> list[int]:
    """A k-ary tree of ``n`` nodes in index order (root parent -1): the shape of a draft tree."""
    return [-1] + [(i - 1) // max(k, 1) for i in range(1, n)]


def _measure_verify(target, feature_layers, tokens: Sequence[int], contexts: Sequence[int], topk: int, repeats: int, rng) -> list[list[float]]:
    """Median forward cost on the (context, tokens) grid.

    Measured in rounds: each round visits every grid point once, in a shuffled order, so
    a slow spell of a shared machine spreads over all points instead of inflating a few
    of them (measuring one point ``repeats`` times in a row made neighbouring points
    disagree by 50% and more here). Round 0 is a warm-up.
    """
    times: dict[tuple[int, int], list[float]] = {(c, n): [] for c in contexts for n in tokens}
    prefixes = {c: rng.integers(0, target.vocab_size, size=c).tolist() for c in contexts}
    drafts = {n: (rng.integers(0, target.vocab_size, size=n).tolist(), _bushy_parents(n, topk)) for n in tokens}
    for r in range(repeats + 1):
        for ctx in rng.permutation(list(contexts)).tolist():
            target.reset()
            target.score(prefixes[ctx], list(range(-1, ctx - 1)), last_only=True)
            target.commit(list(range(ctx)))
            for n in rng.permutation(list(tokens)).tolist():
                ids, parents = drafts[n]
                t0 = time.perf_counter()
                target.score(ids, parents, feature_layers)
                dt = time.perf_counter() - t0
                target.rollback()
                if r:  # round 0 is a warm-up
                    times[(ctx, n)].append(dt)
    grid = [[_median(times[(c, n)]) for n in tokens] for c in contexts]
    for c, row in zip(contexts, grid):
        log.info("verify at context %d: %s ms", c, ", ".join(f"{1e3 * t:.1f}" for t in row))
    target.reset()
    return grid


def _measure_cycles(target, drafter, topk: int, max_depth: int, size: int, context: int, cycles: int, rng, controller=None):
    """Real cycles (draft to max depth, select, verify, accept, commit): per-step draft
    times, per-cycle overhead (select, accept and commit), optionally the controller's
    per-call costs, and the median drafting time of a cycle. The cycles are
    :mod:`ltd.cycle`'s own, timed through its stage hook."""
    from ltd.cycle import StageTimes, begin, draft_room, finish, size_state, start

    steps: list[list[float]] = []
    drafting: list[float] = []  # all draft steps of a cycle
    overhead: list[float] = []
    depth_calls: list[float] = []
    size_calls: list[float] = []
    state = None
    done = 0
    while done < cycles + 1:
        if state is None or draft_room(state) < max_depth + 1:
            prompt = rng.integers(0, target.vocab_size, size=context).tolist()
            state, _ = start(target, drafter, prompt)
        session = begin(state, topk, max_depth, whole=True)  # as decoding drafts (a whole tree at once where it can)
        while session.can_step:
            session.step()
            if controller is not None:
                obs_state = session.observe()
                t0 = time.perf_counter()
                controller.continue_drafting(obs_state)
                depth_calls.append(time.perf_counter() - t0)
        if controller is not None:
            final = size_state(session.tree, state.context_length, topk)
            t0 = time.perf_counter()
            controller.choose_size(final)
            size_calls.append(time.perf_counter() - t0)
        times = StageTimes()
        finish(state, session, size, timer=times)
        if done:  # cycle 0 is a warm-up
            steps.append(session.step_seconds)
            drafting.append(sum(session.step_seconds))
            overhead.append(times["select"] + times["accept"] + times["commit"])
        done += 1
    target.reset()
    drafter.reset()
    per_step = [_median([s[i] for s in steps if len(s) > i]) for i in range(max(len(s) for s in steps))]
    return per_step, _median(overhead), _median(depth_calls), _median(size_calls), _median(drafting)


def profile(
    target,
    drafter,
    *,
    topk: int = 8,
    max_depth: int = 8,
    size: int = 32,
    verify_tokens: Sequence[int] = DEFAULT_VERIFY_TOKENS,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    repeats: int = 15,
    cycles: int = 20,
    policy_sizes: Sequence[int] | None = None,
    model_name: str = "",
    drafter_name: str = "",
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    out: str | Path | None = None,
    measured: dict | None = None,
) -> LatencyModel:
    """Measure a :class:`LatencyModel` with the real backend and drafter.

    Every number is the median of ``repeats`` rounds over the verify grid or ``cycles`` real
    cycles (draft steps and overhead), after a warm-up. Contexts that do not fit the
    model are dropped. With ``policy_sizes`` the per-call cost of an LTD controller with
    untrained policies of the matching shape is measured too (needs stable-baselines3).
    With ``out`` the JSON is written there and a PNG of verify cost vs V next to it.
    ``measured`` (a dict) receives what the model does not keep: ``draft_cycle_seconds``,
    the median drafting time of a cycle (all its draft steps).
    """
    from ltd.machine import machine_info

    tokens, fit = _profile_grid(drafter, repeats, cycles, verify_tokens, contexts, target.max_context)
    rng = np.random.default_rng(seed)
    controller = _untrained_controller(topk, max_depth, policy_sizes) if policy_sizes is not None else None
    cycle_ctx = min(fit[0], max(1, target.max_context - 4 * (max_depth + 2) - 1))
    with torch.inference_mode():
        steps, overhead, depth_call, size_call, draft_cycle = _measure_cycles(
            target, drafter, topk, max_depth, size, cycle_ctx, cycles, rng, controller
        )
        if measured is not None:
            measured["draft_cycle_seconds"] = draft_cycle
        grid = _measure_verify(target, drafter.feature_layers, tokens, fit, topk, repeats, rng)
    model = LatencyModel(
        draft_topk=topk,
        draft_step_seconds=steps,
        verify_tokens=tokens,
        verify_contexts=fit,
        verify_seconds=grid,
        cycle_overhead_seconds=overhead,
        depth_policy_seconds=depth_call,
        size_policy_seconds=size_call,
        model=model_name,
        drafter=drafter_name,
        repeats=repeats,
        machine=machine_info(dtype, device),
    )
    _note_kernel_plan(model, target)
    if out is not None:
        model.save(out)
        plot_latency(model, Path(out).with_suffix(".png"))
    return model


def _profile_grid(drafter, repeats: int, cycles: int, verify_tokens: Sequence[int], contexts: Sequence[int],
                  max_context: int) -> tuple[list[int], list[int]]:
    """Check the profile's settings; (verify token counts, the contexts that fit the model)."""
    from ltd.drafting.base import NullDrafter

    if isinstance(drafter, NullDrafter):
        raise LtdError("profiling needs a drafter; pass --drafter (self, a small LM, or an EAGLE-3 head)")
    if repeats < 1 or cycles < 1:
        raise LtdError("--repeats and --cycles must be at least 1")
    tokens = sorted(set(int(t) for t in verify_tokens))
    if not tokens or tokens[0] < 1:
        raise LtdError("verify token counts must be >= 1")
    fit = [int(c) for c in sorted(set(contexts)) if c >= 1 and c + tokens[-1] + 1 <= max_context]
    if not fit:
        raise LtdError(
            f"no profiling context fits the model's {max_context} positions with {tokens[-1]} verified tokens; "
            "lower --contexts or the largest verify size"
        )
    return tokens, fit


def _untrained_controller(topk: int, max_depth: int, policy_sizes: Sequence[int]):
    """An LTD controller with untrained policies of the given shape: what a policy call costs."""
    from ltd.control.learned import LTDController
    from ltd.control.spaces import for_kind
    from ltd.rl.policy import untrained_policy

    return LTDController.from_policies(
        untrained_policy(for_kind("depth", topk, max_depth, policy_sizes)),
        untrained_policy(for_kind("size", topk, max_depth, policy_sizes)),
    )


def _note_kernel_plan(model: LatencyModel, target) -> None:
    """Record the matmul plan the verify costs were measured with, if the backend has one."""
    plan = getattr(target, "kernel_plan", None)
    if plan is not None:
        summary = plan.summary()
        model.machine["kernel_wxt_rows"] = summary["wxt_rows"]
        model.machine["kernel_padded_rows"] = summary["padded"]


def profile_engine(engine, out: str | Path | None = None, model_name: str = "", drafter_name: str = "", **kwargs) -> LatencyModel:
    """:func:`profile` for an :class:`ltd.engine.Engine` (its backend and drafter)."""
    backend = engine.backend
    dtype = str(backend.dtype).replace("torch.", "")
    return profile(
        backend, engine.drafter, model_name=model_name or engine.target.name, drafter_name=drafter_name,
        dtype=dtype, device=str(backend.device), out=out, **kwargs,
    )


def plot_latency(model: LatencyModel, path: str | Path) -> None:
    """PNG: verify cost vs V (one line per context), and cumulative draft cost vs depth."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    v = [t - 1 for t in model.verify_tokens]
    for ctx, row in zip(model.verify_contexts, model.verify_seconds):
        ax1.plot(v, [1e3 * s for s in row], marker="o", label=f"context {ctx}")
    ax1.set_xlabel("verified draft nodes V (forward over V + 1 tokens)")
    ax1.set_ylabel("verify forward (ms)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    depths = list(range(len(model.draft_step_seconds) + 1))
    ax2.plot(depths, [1e3 * model.draft_seconds(d) for d in depths], marker="o")
    ax2.set_xlabel(f"draft depth (k={model.draft_topk})")
    ax2.set_ylabel("drafting (ms)")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{model.model or 'target'} / {model.drafter or 'drafter'} on {model.machine.get('cpu_model', 'unknown CPU')}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
