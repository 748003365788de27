"""Matmul formulation per row count for the target's linear layers, measured per machine.

Why: a verification pass multiplies every weight matrix by a handful of rows (the tree
nodes), and on some CPUs the BLAS picks a poor kernel for exactly those shapes. On an
AMD EPYC here (MKL, 2 threads, SmolLM2-135M fp32) ``F.linear`` with 2 or 3 rows read the
weights once per row: the 576x49152 LM head cost 23 ms for 2 rows and 34 ms for 3
against 11 ms for one, and a whole forward of 3 tree nodes cost 160 ms against 76 ms for
one token. The same product written as ``(W @ x.T).T`` takes another BLAS path: 4-5 ms
for the LM head at 2-4 rows, and whole forwards of 2-4 nodes ~80-100 ms. Which path wins
depends on the CPU, the BLAS, the thread count and the shapes (docs/design.md: our
machines differ), so nothing is assumed: :func:`measure_plan` times whole forwards of the
real model both ways for each row count and keeps the faster, and the plan is cached per
machine, model shape, dtype and thread count.

Plan version 2 adds two findings (same machine). The input of ``(W @ x.T).T``
must be row-major: the previous layer's transposed output, fed as-is, sent MKL down a
path ~4x slower, which had hidden most of the gain. And a count may be *padded* with
zero rows to a count that runs faster: one token padded to two rows takes ~38 ms per
SmolLM2 forward against ~57 ms through ``F.linear``'s single-vector path.

Only the backend's own forwards use the plan (:class:`KernelState`); the same
model run by ``model.generate`` (the ``hf`` baseline of ``ltd bench``) keeps stock
kernels. Both formulations compute the same products; like any change of batch shape
they may differ in the last bits, which is the usual batched-versus-sequential rounding
(a test checks greedy outputs stay identical with every row count on the other path).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers.utils.import_utils import is_torch_greater_or_equal

from ltd.defaults import KERNEL_MODES
from ltd.errors import LtdError

log = logging.getLogger(__name__)

PLAN_VERSION = 2  # 2: routes may pad rows; inputs of (W @ x.T).T made contiguous first
MEASURED_ROWS = tuple(range(1, 18)) + (24, 32, 48, 64)
MAX_PLANNED_ROWS = 64  # larger batches (prefill) always use F.linear
MIN_GAIN = 0.03  # another route must be at least 3% faster to replace F.linear
MODES = ("linear", "wxt")

Route = tuple[str, int]  # (formulation, rows actually multiplied: >= the real rows)


@dataclass
class KernelPlan:
    """How each row count's linears run: formulation and padded row count.

    Row counts missing from ``routes`` use plain ``F.linear``. A padded route appends zero
    rows before the product and drops their outputs: on this EPYC one row through MKL
    takes its single-vector path at ~12 GB/s of weights, while two rows as ``(W @ x.T).T``
    stream them at ~25 GB/s, so a one-token forward of SmolLM2 is faster with a wasted row.
    """

    routes: dict[int, Route] = field(default_factory=dict)
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # rows -> {"linear": s, "wxt": s}
    key: dict = field(default_factory=dict)

    @staticmethod
    def wxt(rows: "set[int] | frozenset[int] | range") -> "KernelPlan":
        """A plan running exactly ``rows`` as unpadded ``(W @ x.T).T`` (tests, forced plans)."""
        return KernelPlan({int(r): ("wxt", int(r)) for r in rows})

    @property
    def wxt_rows(self) -> frozenset[int]:
        return frozenset(r for r, (mode, _) in self.routes.items() if mode == "wxt")

    def route(self, rows: int) -> Route:
        return self.routes.get(rows, ("linear", rows))

    def summary(self) -> dict:
        """What a report shows: rows on the other path, and rows padded to a larger count."""
        return {
            "wxt_rows": sorted(self.wxt_rows),
            "padded": {str(r): p for r, (_, p) in sorted(self.routes.items()) if p != r},
        }

    def to_json(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "routes": {str(r): [m, p] for r, (m, p) in sorted(self.routes.items())},
            "measured": self.measured,
            "key": self.key,
        }

    @staticmethod
    def from_json(data: dict) -> "KernelPlan":
        if data.get("version") != PLAN_VERSION or not isinstance(data.get("routes"), dict):
            raise ValueError("unknown kernel plan format")
        routes = {}
        for r, (mode, padded) in data["routes"].items():
            rows, padded = int(r), int(padded)
            if mode not in MODES or not 1 <= rows <= padded <= MAX_PLANNED_ROWS:
                raise ValueError(f"bad route for {r} rows")
            routes[rows] = (str(mode), padded)
        return KernelPlan(routes, dict(data.get("measured", {})), dict(data.get("key", {})))


class KernelState:
    """The switch the planned layers of one model read: the plan of the forward now running.

    Several backends may share one model (a ``self`` drafter runs the target's weights with
    stock kernels), so the plan belongs to the backend and is set only around its forward.
    """

    def __init__(self) -> None:
        self.plan: KernelPlan | None = None  # None outside a planned forward: stock F.linear
        self.forced: str | None = None  # "linear" or "wxt" while measuring

    @contextlib.contextmanager
    def use(self, plan: KernelPlan) -> Iterator[None]:
        prev = self.plan
        self.plan = plan
        try:
            yield
        finally:
            self.plan = prev

    def route(self, rows: int) -> Route:
        """How a linear over ``rows`` rows runs now (stock ``F.linear`` outside a plan)."""
        if self.plan is None or rows > MAX_PLANNED_ROWS:
            return ("linear", rows)
        if self.forced is not None:
            return (self.forced, rows)
        return self.plan.route(rows)


class PlannedLinear(torch.nn.Linear):
    """An ``nn.Linear`` sharing the original's parameters, computed as the plan says."""

    def __init__(self, base: torch.nn.Linear, state: KernelState) -> None:
        torch.nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # the same Parameter: tied weights stay tied, no copy
        self.bias = base.bias
        self._kernel_state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # outside a planned forward (e.g. model.generate, the hf baseline) cost no more
        # than nn.Linear's own forward: one attribute test, then F.linear
        if self._kernel_state.plan is None:
            return F.linear(x, self.weight, self.bias)
        k = x.shape[-1]
        rows = x.numel() // max(1, k)
        mode, padded = self._kernel_state.route(rows)
        if mode == "linear" and padded == rows:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(rows, k)
        if padded > rows:
            x2 = torch.cat([x2, x2.new_zeros(padded - rows, k)])
        if mode == "wxt":
            # x2 must be row-major so that x2.T is the column-major operand MKL streams
            # fast; the transposed output of the previous (W @ x.T).T is not, and fed
            # as-is it made the next product ~4x slower (down_proj after gate/up here)
            y = torch.matmul(self.weight, x2.contiguous().t()).t().contiguous()
        else:
            y = F.linear(x2, self.weight)
        if padded > rows:
            y = y[:rows]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"
# torch's SDPA takes grouped heads together with a mask from 2.5 on (the check transformers uses)
SDPA_GQA_WITH_MASK = is_torch_greater_or_equal("2.5", accept_dev=True)


@contextlib.contextmanager
def sdpa_gqa_in_place() -> Iterator[None]:
    """Let torch's SDPA read grouped key/value heads in place during our CPU forwards.

    Why: with an attention mask (every tree, and any chain of 2+ tokens after the
    prompt) transformers copies each layer's keys and values once per query head group
    (``repeat_kv``) before SDPA, because CUDA's fast kernels take no mask with grouped
    heads. On the CPU, SDPA with ``enable_gqa`` and a mask gives bit-identical outputs
    without the copy: for SmolLM2 (9 query, 3 key/value heads) one layer's attention of
    2-9 tree nodes costs 0.04-0.08 ms against 0.08-0.12 ms at 128 tokens of context, and
    0.18-0.40 against 0.31-0.53 ms at 700 (1 thread, experiments/gqa_catchup_costs.py).
    transformers reads this switch at every call,
    so it is on only around the backend's own forwards; ``model.generate`` (the ``hf``
    baseline) runs untouched.
    """
    prev = os.environ.get(GQA_ENV)
    os.environ[GQA_ENV] = "1"
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop(GQA_ENV, None)
        else:
            os.environ[GQA_ENV] = prev


def install(model: torch.nn.Module, state: KernelState) -> int:
    """Swap every plain ``nn.Linear`` of ``model`` for a :class:`PlannedLinear`; returns how many."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.Linear:
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, PlannedLinear(child, state))
    return len(swaps)


def installed_state(model: torch.nn.Module) -> KernelState | None:
    for m in model.modules():
        if isinstance(m, PlannedLinear):
            return m._kernel_state
    return None


def plan_key(model: torch.nn.Module) -> dict:
    """What the measured plan depends on: machine, BLAS threads, library, dtype and shapes."""
    from ltd.machine import cpu_model

    cfg = model.config
    p = next(model.parameters())
    return {
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(p.dtype).replace("torch.", ""),
        "device": p.device.type,
        "architecture": type(model).__name__,
        "shape": [int(getattr(cfg, k, 0) or 0) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")],
        "rows": list(MEASURED_ROWS),
        "version": PLAN_VERSION,
    }


def plan_path(key: dict) -> Path:
    from ltd.fetch import keyed_cache_file

    return keyed_cache_file("kernels", key["architecture"], key)


def decide(measured: dict[int, dict[str, float]], min_gain: float = MIN_GAIN) -> dict[int, Route]:
    """Each row count's fastest route (formulation, padded rows) from measured forwards.

    Padding ``rows`` to a measured count ``p >= rows`` costs about what a forward of ``p``
    nodes costs, so every measured larger count is a candidate. An unmeasured count's own
    cost is taken as that of the next measured count above it. Plain ``F.linear`` on the
    real rows stays unless another route is at least ``min_gain`` faster; on equal cost,
    fewer padded rows win.
    """
    if not measured:
        return {}
    keys = sorted(measured)
    routes: dict[int, Route] = {}
    for rows in range(1, min(MAX_PLANNED_ROWS, keys[-1]) + 1):
        above = [k for k in keys if k >= rows]
        own = measured[rows] if rows in measured else measured[above[0]]
        cands = [(own[m], rows, m) for m in MODES]
        cands += [(measured[k][m], k, m) for k in above if k != rows for m in MODES]
        cost, padded, mode = min(cands, key=lambda c: (c[0], c[1]))
        if (mode, padded) != ("linear", rows) and cost < (1.0 - min_gain) * own["linear"]:
            routes[rows] = (mode, padded)
    return routes


def measure_plan(backend, rounds: int = 4, context: int = 128, budget_seconds: float = 60.0) -> KernelPlan:
    """Time whole tree forwards of the backend's model with each formulation, per row count.

    The two formulations alternate inside every round so that a slow moment of a shared
    machine hits both; the median over rounds decides. Large models get fewer rounds (at
    least 2) so that the whole measurement stays near ``budget_seconds``: a 1.5B model in
    fp32 takes 0.5-2 s per forward here, and 4 rounds would cost minutes.
    """
    state = backend._kernel_state
    if state is None:
        raise ValueError("measure_plan needs a backend with planned layers (kernels other than 'stock')")
    backend.kernel_plan = KernelPlan()  # planned forwards; ``forced`` picks the path
    context = max(1, min(context, int(backend.max_context) - max(MEASURED_ROWS) - 1))
    vocab = int(backend.vocab_size)
    ctx = [(7 * i + 11) % vocab for i in range(context)]
    times: dict[int, dict[str, list[float]]] = {r: {"linear": [], "wxt": []} for r in MEASURED_ROWS}

    def forward(rows: int, mode: str) -> float:
        state.forced = mode
        t0 = time.perf_counter()
        backend.score([(13 * j + 5) % vocab for j in range(rows)], [-1] + [0] * (rows - 1))
        dt = time.perf_counter() - t0
        backend.rollback()
        return dt

    backend.reset()
    try:
        backend.score(ctx, list(range(-1, context - 1)), last_only=True)
        backend.commit(list(range(context)))
        forward(1, "linear")  # warm-up of both paths
        forward(2, "wxt")
        # one round: two forwards per row count, multi-row ones ~1.5x a one-row forward
        per_round = 2 * 1.5 * forward(1, "linear") * len(MEASURED_ROWS)
        rounds = max(2, min(rounds, int(budget_seconds / max(per_round, 1e-9))))
        for rnd in range(rounds):
            for rows in MEASURED_ROWS:
                for mode in ("linear", "wxt") if rnd % 2 == 0 else ("wxt", "linear"):
                    times[rows][mode].append(forward(rows, mode))
    finally:
        state.forced = None
        backend.reset()
    measured = {r: {m: statistics.median(v) for m, v in t.items()} for r, t in times.items()}
    return KernelPlan(decide(measured), {str(r): t for r, t in measured.items()})


def resolve_plan(backend, mode: str) -> KernelPlan:
    """The plan for ``mode``: ``stock`` (none), ``auto`` (cached, else measured once), ``retune``."""
    from ltd.fileio import atomic_write_json

    if mode not in KERNEL_MODES:
        raise LtdError(f"--kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    if mode == "stock" or backend.device.type != "cpu":
        return KernelPlan()
    key = plan_key(backend.model)
    path = plan_path(key)
    if mode == "auto" and path.is_file():
        try:
            plan = KernelPlan.from_json(json.loads(path.read_text()))
            if plan.key == key:
                return plan
        except (ValueError, json.JSONDecodeError):
            log.warning("kernel plan %s is unreadable; measuring again", path)
    log.info("measuring matmul kernels for this machine and model (once; cached in %s)", path)
    t0 = time.perf_counter()
    plan = measure_plan(backend)
    plan.key = key
    atomic_write_json(path, plan.to_json())
    log.info("kernel plan: (W @ x.T).T for rows %s, padded %s (%.0f s)", sorted(plan.wxt_rows) or "none",
             plan.summary()["padded"] or "none", time.perf_counter() - t0)
    return plan
