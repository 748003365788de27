"""How much can any causal size rule gain over the best static tree with this drafter?

Why: the target we set LTD was 1.10x the best static tree on held-out suites. The hindsight
oracle (``ltd oracle``) bounds every controller, but it knows each draft's fate; a real
controller only sees the drafter's scores. This script builds the rule a perfectly
trained size policy would converge to if the scores were all it used: calibrate, on the
training suite's traces, how often a node with a given cumulative draft probability lies
on the target's greedy path; then, every cycle, draft ``--depth`` levels and verify the V
that maximises expected tokens per modelled second, (1 + sum of the top-V nodes'
calibrated probabilities) / T(depth, V). It is replayed beside the static tree and the
oracle on each trace set (the same replay as ``ltd oracle``), and written to ``--out``.

If this rule cannot beat the static tree, the drafter's confidence carries no usable
signal for a size choice at this machine's costs, and a learned policy is bounded by
the same fact.

    .venv/bin/python experiments/size_choice_ceiling.py --calibrate runs/bf16head/traces-bf16 \
        --latency runs/bf16head/latency-bf16.json --traces runs/bf16head/traces-{gsm8k,humaneval,mt_bench,qa,sum} \
        --out benchmarks/size-ceiling-2026-11-27
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ltd.bench.machine import machine_info
from ltd.control import ControllerBase, DraftStepState, StaticController
from ltd.fileio import atomic_write_json, atomic_write_text
from ltd.rl.latency import LatencyModel
from ltd.rl.oracle import compare
from ltd.rl.traces import TraceSet, path_ranks

BINS = np.linspace(0.0, 1.0, 11)
MAX_V = 16


def ranked_probs(scores: np.ndarray, depths: np.ndarray, depth: int) -> np.ndarray:
    """Probabilities of the drafted nodes of depth <= ``depth`` in tree-selection order."""
    keep = depths <= depth
    s, d = scores[keep].astype(np.float64), depths[keep]
    order = np.lexsort((np.arange(s.size), d, -s))
    return np.exp(s[order])


def calibrate(traces: TraceSet, depth: int) -> np.ndarray:
    """P(node on the greedy path) per probability bin, over the top MAX_V nodes of every position."""
    hits = np.zeros(BINS.size - 1)
    counts = np.zeros(BINS.size - 1)
    for seq in traces.sequences:
        for p in range(seq.num_positions):
            pos = seq[p]
            d = min(depth, pos.depth)
            ranks = path_ranks(pos)
            if ranks is None:
                continue
            probs = ranked_probs(pos.scores[1:], pos.depths[1:], d)[:MAX_V]
            on_path = np.zeros(probs.size)
            for r in ranks[d][np.isfinite(ranks[d])]:
                if r < probs.size:
                    on_path[int(r)] = 1.0
            b = np.clip(np.digitize(probs, BINS) - 1, 0, BINS.size - 2)
            np.add.at(counts, b, 1.0)
            np.add.at(hits, b, on_path)
    return np.where(counts > 0, hits / np.maximum(counts, 1), 0.0)


class ExpectedValueController(ControllerBase):
    """Fixed depth; V maximising calibrated expected tokens per modelled second."""

    def __init__(self, table: np.ndarray, latency: LatencyModel, depth: int, sizes: list[int]) -> None:
        self.table, self.latency, self.depth, self.sizes = table, latency, depth, sizes

    def continue_drafting(self, state: DraftStepState) -> bool:
        return state.step < self.depth

    def choose_size(self, state: DraftStepState) -> int:
        tree = state.tree
        probs = ranked_probs(tree.scores[1:].numpy(), tree.depths[1:].numpy(), self.depth)
        q = self.table[np.clip(np.digitize(probs, BINS) - 1, 0, BINS.size - 2)]
        gain = np.concatenate([[0.0], np.cumsum(q)])
        committed = state.context_length - 1
        best_v, best_rate = 0, (1.0) / self.latency.cycle_seconds(0, 0, committed)
        for v in self.sizes:
            if v < 1 or v > probs.size:
                continue
            rate = (1.0 + gain[v]) / self.latency.cycle_seconds(self.depth, v, committed)
            if rate > best_rate:
                best_v, best_rate = v, rate
        return best_v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrate", required=True, help="traces of the training suite")
    ap.add_argument("--traces", nargs="+", required=True, help="trace directories to replay on")
    ap.add_argument("--latency", required=True)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--static", default="2x3,3x3", help="static DEPTHxSIZE trees to compare")
    ap.add_argument("--sizes", default="1,2,3,4,5,6,8,16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    latency = LatencyModel.load(args.latency)
    sizes = [int(v) for v in args.sizes.split(",")]
    train = TraceSet.load(args.calibrate)
    table = calibrate(train, args.depth)
    topk = train.topk
    controllers = {f"static:{s.split('x')[0]}x{topk}x{s.split('x')[1]}": StaticController(int(s.split("x")[0]), topk, int(s.split("x")[1]))
                   for s in args.static.split(",")}
    controllers[f"expected-value (depth {args.depth})"] = lambda: ExpectedValueController(table, latency, args.depth, sizes)
    rows = {}
    for directory in [args.calibrate] + args.traces:
        traces = TraceSet.load(directory)
        report = compare(traces, latency, controllers, sizes=[0] + sizes)
        rows[directory] = {r["name"]: r["tokens_per_second"] for r in report["results"]}
    machine = machine_info("float32", "cpu")
    out = Path(args.out)
    atomic_write_json(out / "results.json", {"machine": machine, "latency": args.latency, "calibrated_on": args.calibrate,
                                             "calibration": {"bins": BINS.tolist(), "p_on_path": table.tolist()}, "replay_tokens_per_second": rows})
    names = list(next(iter(rows.values())))
    lines = [f"# Causal size rule vs static vs hindsight oracle, replay tokens/s ({machine['cpu_model']})", "",
             f"Calibrated on `{args.calibrate}` (first row, in-sample); latency `{args.latency}`.", "",
             "| traces | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {Path(d).name} | " + " | ".join(f"{r[n]:.1f}" for n in names) + " |" for d, r in rows.items()]
    lines += ["", "P(on the greedy path) by cumulative draft probability: "
              + ", ".join(f"{BINS[i]:.1f}-{BINS[i + 1]:.1f}: {table[i]:.2f}" for i in range(table.size))]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
