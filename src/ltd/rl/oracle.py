"""The hindsight-optimal schedule: the physical limit of any controller with this drafter
on this machine, and controllers measured against it in replay.

For one recorded sequence, a cycle from output position p with action (d, V) accepts
L(p, d, V) drafted tokens (exactly, see :mod:`ltd.rl.traces`) and moves to p + L + 1 at
the modelled cost T(d, V, context) of the :class:`~ltd.rl.latency.LatencyModel`. The
least total time to produce the output is a shortest path over positions, solved by a
backward DP::

    best[p] = min over (d, V) of  T(d, V, p) + best[min(p + L(p, d, V) + 1, end)]

with best[end] = 0, where end = len(output) - 1 (output[0] comes from the prefill). The
action d = 0 (a plain decoding step) is always allowed: if drafting does not pay on this
machine, the oracle decodes without it. The oracle's decisions cost nothing (no policy
calls): it is the limit, not a controller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ltd.control import Controller, StaticController
from ltd.control.spaces import DEFAULT_SIZES, sizes_up_to
from ltd.rl.latency import LatencyModel
from ltd.rl.sources import ReplaySource, run_controller
from ltd.rl.traces import TraceSequence, TraceSet

log = logging.getLogger(__name__)


@dataclass
class Schedule:
    """A decoding schedule of one sequence: its time and the action of every cycle."""

    key: str
    tokens: int
    seconds: float
    actions: list[dict] = field(default_factory=list)  # position, depth, size, accepted

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def cycles(self) -> int:
        return len(self.actions)


@dataclass
class Throughput:
    """Aggregate over sequences: total tokens / total time."""

    name: str
    schedules: list[Schedule]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.schedules)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.schedules)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_cycle(self) -> float:
        cycles = sum(s.cycles for s in self.schedules)
        return self.tokens / cycles if cycles else 0.0

    def to_json(self) -> dict:
        return {"name": self.name, "tokens": self.tokens, "seconds": round(self.seconds, 6),
                "tokens_per_second": round(self.tokens_per_second, 3), "tokens_per_cycle": round(self.tokens_per_cycle, 3)}


def oracle_sequence(
    seq: TraceSequence, latency: LatencyModel, sizes: Sequence[int] = DEFAULT_SIZES, max_depth: int | None = None
) -> Schedule:
    """The least-time schedule of one sequence (backward DP over positions)."""
    end = seq.cycle_tokens  # terminal position: len(output) - 1
    D = seq.max_depth if max_depth is None else min(max_depth, seq.max_depth)
    sizes = [v for v in sizes if seq.max_size is None or v <= seq.max_size]
    best = np.zeros(end + 1)
    choice: list[tuple[int, int, int, int]] = [(0, 0, 0, 1)] * (end + 1)
    prompt_len = int(seq.prompt.size)
    for p in range(end - 1, -1, -1):
        committed = prompt_len + p
        pos_depth = int(seq.arrays["depth"][p])
        level_counts = seq.arrays["level_counts"][p]
        cost = latency.cycle_seconds(0, 0, committed) + best[p + 1]
        pick = (0, 0, 0, p + 1)
        for d in range(1, min(D, pos_depth) + 1):
            drafted = int(level_counts[d])
            seen = set()
            for v in sizes:
                v_eff = min(v, drafted)
                if v_eff in seen:
                    continue  # larger V than the tree: same cycle as the smaller one
                seen.add(v_eff)
                L = seq.accepted(p, d, v_eff)
                nxt = min(p + L + 1, end)
                c = latency.cycle_seconds(d, v_eff, committed) + best[nxt]
                if c < cost:
                    cost, pick = c, (d, v_eff, L, nxt)
        best[p] = cost
        choice[p] = pick
    actions, p = [], 0
    while p < end:
        d, v, L, nxt = choice[p]
        actions.append({"position": p, "depth": d, "size": v, "accepted": L})
        p = nxt
    return Schedule(seq.key, end, float(best[0]) if end > 0 else 0.0, actions)


def oracle(traces: TraceSet, latency: LatencyModel, sizes: Sequence[int] | None = None) -> Throughput:
    """The hindsight-optimal throughput over all recorded sequences."""
    sizes = sizes_up_to(traces.max_size) if sizes is None else sizes
    return Throughput("oracle", [oracle_sequence(s, latency, sizes) for s in traces.sequences if s.num_positions])


def source_throughput(source, controller: Controller | Callable[[], Controller], name: str = "", sequences: int | None = None) -> Throughput:
    """A controller's throughput on a cycle source: replay (modelled time, policy calls as
    profiled) or live (:class:`~ltd.rl.sources.LiveSource`, measured time), so a policy's
    replay prediction can be checked live on the same prompts.

    ``controller`` may be a factory, called once per sequence, for controllers with
    state across cycles (the heuristic).
    """
    n = source.num_sequences if sequences is None else min(sequences, source.num_sequences)
    return Throughput(name or type(controller).__name__, [_run_schedule(source, controller, i) for i in range(n)])


def _run_schedule(source, controller: Controller | Callable[[], Controller], index: int) -> Schedule:
    """Sequence ``index`` decoded by ``controller`` (a fresh one if a factory is given)."""
    is_instance = hasattr(controller, "continue_drafting") and not isinstance(controller, type)
    outcomes = run_controller(source, controller if is_instance else controller(), index)
    return Schedule(
        getattr(source, "sequence_key", "") or str(index),
        sum(o.tokens for o in outcomes),
        sum(o.seconds for o in outcomes),
        [{"position": o.position, "depth": o.depth, "size": o.size, "accepted": o.accepted} for o in outcomes],
    )


def replay_controller(traces: TraceSet, latency: LatencyModel, controller: Controller | Callable[[], Controller], name: str = "") -> Throughput:
    """A controller's throughput in replay over all recorded sequences."""
    return source_throughput(ReplaySource(traces, latency), controller, name)


def compare(traces: TraceSet, latency: LatencyModel, controllers: dict[str, Controller | Callable[[], Controller]], sizes: Sequence[int] | None = None) -> dict:
    """Oracle, plain decoding and each controller in replay, as fractions of the oracle."""
    best = oracle(traces, latency, sizes)
    ar_seconds = sum(
        sum(latency.ar_seconds(int(s.prompt.size) + p) for p in range(s.cycle_tokens)) for s in traces.sequences if s.num_positions
    )
    rows = [best.to_json() | {"fraction_of_oracle": 1.0}]
    ar_tps = best.tokens / ar_seconds if ar_seconds > 0 else 0.0
    rows.append({"name": "ar", "tokens": best.tokens, "seconds": round(ar_seconds, 6), "tokens_per_second": round(ar_tps, 3),
                 "tokens_per_cycle": 1.0, "fraction_of_oracle": round(ar_tps / best.tokens_per_second, 4) if best.tokens_per_second else 0.0})
    for name, ctrl in controllers.items():
        t = replay_controller(traces, latency, ctrl, name)
        frac = t.tokens_per_second / best.tokens_per_second if best.tokens_per_second else 0.0
        rows.append(t.to_json() | {"fraction_of_oracle": round(frac, 4)})
    for r in rows:
        r["speedup_vs_ar"] = round(r["tokens_per_second"] / ar_tps, 3) if ar_tps else 0.0
    return {"cpu_model": latency.machine.get("cpu_model", "unknown"), "sequences": len(best.schedules),
            "positions": traces.num_positions, "results": rows}


def add_live(report: dict, source, controllers: dict[str, Controller | Callable[[], Controller]]) -> dict:
    """Run ``ar`` and each controller live (``source`` a :class:`~ltd.rl.sources.LiveSource`
    over the traces' prompts) and put the measured tokens/s beside replay's prediction.

    This is the check that replay tells the truth: a controller's live/replay ratio near
    1 means the latency model and the traces describe this machine.
    """
    runs = {"ar": StaticController(depth=0, topk=1, size=0), **controllers}
    names = [row["name"] for row in report["results"] if row["name"] in runs]
    # Interleaved by prompt (every method on prompt i, then on prompt i + 1), as ltd bench
    # does: a slow spell of a shared machine then hits every method alike.
    schedules: dict[str, list[Schedule]] = {n: [] for n in names}
    for i in range(source.num_sequences):
        for name in names:
            schedules[name].append(_run_schedule(source, runs[name], i))
    for row in report["results"]:
        if row["name"] not in schedules:
            continue
        t = Throughput(row["name"], schedules[row["name"]])
        row["live_tokens_per_second"] = round(t.tokens_per_second, 3)
        row["live_tokens_per_cycle"] = round(t.tokens_per_cycle, 3)
        row["live_over_replay"] = round(t.tokens_per_second / row["tokens_per_second"], 4) if row["tokens_per_second"] else 0.0
        log.info("%s: replay %.2f tok/s, live %.2f tok/s", row["name"], row["tokens_per_second"], t.tokens_per_second)
    ar = next((r for r in report["results"] if r["name"] == "ar" and "live_tokens_per_second" in r), None)
    if ar and ar["live_tokens_per_second"]:
        for row in report["results"]:
            if "live_tokens_per_second" in row:
                row["live_speedup_vs_ar"] = round(row["live_tokens_per_second"] / ar["live_tokens_per_second"], 3)
    report["live"] = True
    return report
