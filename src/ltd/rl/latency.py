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
from dataclasses import replace
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

    # a stand-in cost table: the features are computed once per context bucket, so what
    # a call costs does not depend on the table's values
    stand_in = LatencyModel(draft_topk=topk, draft_step_seconds=[1e-3, 1e-4], verify_tokens=[1, 2], verify_contexts=[1],
                            verify_seconds=[[1e-2, 1.1e-2]])
    return LTDController.from_policies(
        untrained_policy(for_kind("depth", topk, max_depth, policy_sizes)),
        untrained_policy(for_kind("size", topk, max_depth, policy_sizes)),
        costs=stand_in,
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


# -- a family of cost tables (policies that fit any machine) --------------------------------


def _scaled(base: LatencyModel, verify_slope: float, draft: float, tag: str) -> LatencyModel:
    """``base`` with the cost verification adds over a plain step scaled by ``verify_slope``
    and every draft step by ``draft``: another machine's curve, same plain step."""
    grid = np.asarray(base.verify_seconds, dtype=np.float64)
    plain = grid[:, :1]
    scaled = plain + np.maximum(grid - plain, 0.0) * verify_slope
    return replace(base, draft_step_seconds=[s * draft for s in base.draft_step_seconds], verify_seconds=scaled.tolist(),
                   machine={**base.machine, "family_member": tag})


def adopt(other: LatencyModel, base: LatencyModel, tag: str) -> LatencyModel:
    """Another machine's profile as a member of ``base``'s family: its verify curve and its
    draft steps relative to its own plain step, put on ``base``'s plain step and branching."""
    grid = np.asarray(other.verify_seconds, dtype=np.float64)
    ratio = float(np.median(np.asarray(base.verify_seconds)[:, 0]) / max(np.median(grid[:, 0]), 1e-12))
    steps = list(other.draft_step_seconds) or list(base.draft_step_seconds)
    return replace(base, draft_step_seconds=[s * ratio for s in steps], verify_tokens=list(other.verify_tokens),
                   verify_contexts=list(other.verify_contexts), verify_seconds=(grid * ratio).tolist(),
                   cycle_overhead_seconds=other.cycle_overhead_seconds * ratio, repeats=other.repeats,
                   machine={**other.machine, "family_member": tag})


def cost_family(base: LatencyModel, variants: int = 0, others: Sequence[LatencyModel] = (), seed: int = 0) -> list[LatencyModel]:
    """The cost tables a cost-conditioned policy trains over: ``base`` (this machine's),
    ``others`` (profiles of other machines, :func:`adopt`-ed), and ``variants`` draws of
    ``base`` with verification's marginal cost scaled by 1/4..4 and draft steps by 1/3..3
    (log-uniform). Why: a policy that saw one table learns that table's best tree; one that
    saw many, with the table in its observation, learns to read it."""
    rng = np.random.default_rng(seed)
    family = [base] + [adopt(o, base, f"profile {i}") for i, o in enumerate(others)]
    for i in range(max(int(variants), 0)):
        slope = float(np.exp(rng.uniform(np.log(0.25), np.log(4.0))))
        draft = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3.0))))
        family.append(_scaled(base, slope, draft, f"variant {i}: verify slope x{slope:.2f}, draft x{draft:.2f}"))
    return family
