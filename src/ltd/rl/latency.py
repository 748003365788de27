"""The profiler of one speculative cycle's costs on this machine (``ltd profile``).

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

:class:`LatencyModel` (:mod:`ltd.control.costs`, re-exported here) stores these as JSON
(with the CPU model, so a profile from one machine is never mistaken for another's) and
predicts the time of any cycle. The measuring core is :mod:`ltd.control.measure`, shared
with the quick profile that cost-aware methods run on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ltd.control.costs import LATENCY_FORMAT, LATENCY_VERSION, LatencyModel
from ltd.control.measure import measure_cycles, measure_verify
from ltd.errors import LtdError
from ltd.fileio import atomic_write

log = logging.getLogger(__name__)

DEFAULT_VERIFY_TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 65)
DEFAULT_CONTEXTS = (128, 512, 1024)


__all__ = ["DEFAULT_CONTEXTS", "DEFAULT_VERIFY_TOKENS", "LATENCY_FORMAT", "LATENCY_VERSION", "LatencyModel", "profile", "profile_engine"]


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
        steps, overhead, depth_call, size_call, draft_cycle = measure_cycles(
            target, drafter, topk, max_depth, size, cycle_ctx, cycles, rng, controller
        )
        if measured is not None:
            measured["draft_cycle_seconds"] = draft_cycle
        grid = measure_verify(target, drafter.feature_layers, tokens, fit, topk, repeats, rng)
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
