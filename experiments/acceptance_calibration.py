"""Does a learned acceptance model make the greedy controller better? (replay)

Fits P(drafted node on the target's path) to recorded traces -- a logistic regression on
each node's score, depth and the cycle's suffix signals -- and replays the greedy
expected-throughput controller with raw scores against the same controller with the
fitted chances, per suite, beside the best static tree and the oracle.

Why it was tried: on the mixed stream's training split (SmolLM2, hybrid suffix + EAGLE-3
head) deep suffix nodes are far less likely than their count-based scores say (0.7 ->
37% on the path at depth >= 5). The fitted model is well calibrated (log-loss 0.316
against 0.525 for a constant), yet the greedy controller made the same replay
throughput with it (1.69x ar either way): it drafts less on copy-heavy text, where the
raw scores' optimism paid, and a little more on prose. Recorded in docs/results.md.

    .venv/bin/python experiments/acceptance_calibration.py --traces runs/mixed/traces \
        --latency runs/mixed/latency.json [--eval-traces DIR] [--policies DIR]
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ltd.control import StaticController
from ltd.control.base import MAX_SIZE
from ltd.control.spaces import rank_order, sizes_up_to
from ltd.control.throughput import ThroughputController
from ltd.errors import LtdError
from ltd.fileio import atomic_write_json, read_json
from ltd.rl.latency import LatencyModel
from ltd.rl.oracle import oracle_sequence, replay_controller
from ltd.rl.traces import TracePosition, TraceSet

log = logging.getLogger(__name__)

ACCEPTANCE_FORMAT = "ltd-acceptance-model"
ACCEPTANCE_VERSION = 1
ACCEPTANCE_FILE = "acceptance.json"
LOGIT_CLIP = 12.0
DEPTH_SCALE = 32.0
MATCH_SCALE = 64.0
OCCURRENCE_BITS = 6.0

# what each feature column is (the model refuses a file with another list)
FEATURES = (
    "logit",  # log(p / (1 - p)) of the node's cumulative score, clipped
    "first_level",  # 1 at depth 1 (the model drafter's level in a hybrid@1)
    "depth",  # depth / 32
    "log_depth",  # log2(depth) / 5
    "deep_logit",  # logit at depth >= 2
    "logit_x_depth",  # logit * depth / 32
    "match",  # suffix match length / 64
    "occurrences",  # log2(1 + occurrences merged) / 6
    "best_prob",  # the suffix trie's best first continuation's probability
    "trie_depth",  # the trie's depth / 32
    "chain",  # the best chain's length / 32
    "beyond_chain",  # 1 when the node lies deeper than the best chain
    "no_match",  # 1 when the drafter found no suffix match (or has no signals)
)


def _logit(scores: np.ndarray) -> np.ndarray:
    p = np.exp(np.clip(scores, -60.0, 0.0))
    with np.errstate(divide="ignore"):
        lg = np.log(p) - np.log1p(-np.minimum(p, 1.0 - 1e-12))
    return np.clip(lg, -LOGIT_CLIP, LOGIT_CLIP) / LOGIT_CLIP


def node_features(scores: np.ndarray, depths: np.ndarray, signals: np.ndarray | None) -> np.ndarray:
    """The [n, len(FEATURES)] feature matrix of n drafted nodes (cumulative log-probability
    scores and depths >= 1) of one cycle, with that cycle's drafter signals (or None)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    depths = np.maximum(np.asarray(depths, dtype=np.float64).reshape(-1), 1.0)
    n = scores.size
    sig = np.zeros(5) if signals is None else np.nan_to_num(np.asarray(signals, dtype=np.float64).reshape(-1)[:5])
    match, occurrences, best_prob, trie_depth, chain = sig.tolist()
    lg = _logit(scores)
    deep = (depths >= 2).astype(np.float64)
    out = np.empty((n, len(FEATURES)), dtype=np.float64)
    out[:, 0] = lg
    out[:, 1] = 1.0 - deep
    out[:, 2] = np.minimum(depths / DEPTH_SCALE, 1.0)
    out[:, 3] = np.log2(depths) / 5.0
    out[:, 4] = lg * deep
    out[:, 5] = lg * out[:, 2]
    out[:, 6] = min(match / MATCH_SCALE, 1.0)
    out[:, 7] = min(math.log2(1.0 + max(occurrences, 0.0)) / OCCURRENCE_BITS, 1.0)
    out[:, 8] = best_prob
    out[:, 9] = min(trie_depth / DEPTH_SCALE, 1.0)
    out[:, 10] = min(chain / DEPTH_SCALE, 1.0)
    out[:, 11] = (depths > max(chain, 1.0)).astype(np.float64)
    out[:, 12] = 1.0 if match <= 0 else 0.0
    return out


@dataclass
class AcceptanceModel:
    """P(node on the target's path) = sigmoid(features . weights + bias)."""

    weights: np.ndarray
    bias: float
    drafter: str = ""  # the drafter whose traces it was fitted on (a check, not a key)
    fitted_on: dict | None = None  # what it was fitted on: traces, nodes, log-loss

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        if self.weights.size != len(FEATURES):
            raise LtdError(f"acceptance model has {self.weights.size} weights for {len(FEATURES)} features; refit it")

    def node_probs(self, scores, depths, signals) -> np.ndarray:
        """Acceptance chances of the nodes, in the order given."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.size == 0:
            return np.zeros(0)
        z = node_features(scores, depths, signals) @ self.weights + self.bias
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))
        return np.where(np.isfinite(scores), p, 0.0)

    # -- persistence -------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": ACCEPTANCE_FORMAT, "version": ACCEPTANCE_VERSION, "features": list(FEATURES),
                "weights": [round(float(w), 8) for w in self.weights], "bias": round(float(self.bias), 8),
                "drafter": self.drafter, "fitted_on": self.fitted_on or {}}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @staticmethod
    def from_json(data: dict, where: str = "acceptance model") -> "AcceptanceModel":
        if not isinstance(data, dict) or data.get("format") != ACCEPTANCE_FORMAT:
            raise LtdError(f"{where} is not an ltd acceptance model; fit one with ltd fit-acceptance")
        if int(data.get("version", -1)) != ACCEPTANCE_VERSION:
            raise LtdError(f"{where} has version {data.get('version')}, this ltd reads {ACCEPTANCE_VERSION}; refit it")
        if list(data.get("features", [])) != list(FEATURES):
            raise LtdError(f"{where} was fitted on other features ({data.get('features')}); refit it with this ltd")
        try:
            return AcceptanceModel(np.asarray(data["weights"], dtype=np.float64), float(data["bias"]),
                                   str(data.get("drafter", "")), dict(data.get("fitted_on") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise LtdError(f"{where} is malformed ({type(exc).__name__}: {exc}); refit it") from None

    @staticmethod
    def load(path: str | Path) -> "AcceptanceModel":
        path = Path(path)
        if path.is_dir():
            path = path / ACCEPTANCE_FILE
        if not path.is_file():
            raise LtdError(f"no acceptance model at {path}; fit one with ltd fit-acceptance")
        return AcceptanceModel.from_json(read_json(path, "acceptance model"), str(path))


def stack_features(rows: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, len(FEATURES)))


log = logging.getLogger(__name__)


def on_path(pos: TracePosition) -> np.ndarray:
    """For each stored node of ``pos``'s tree (root first): is it on the target's greedy path?"""
    n = pos.tokens.size
    hit = np.zeros(n, dtype=bool)
    children: dict[int, list[int]] = {}
    for i in range(1, n):
        children.setdefault(int(pos.parents[i]), []).append(i)
    node = 0
    for tok in pos.continuation[: pos.depth].tolist():
        nxt = next((c for c in children.get(node, []) if int(pos.tokens[c]) == tok), None)
        if nxt is None:
            break
        node = nxt
        hit[node] = True
    return hit


def training_pairs(traces: TraceSet) -> tuple[np.ndarray, np.ndarray]:
    """(features, on-path labels) of every stored drafted node of every position."""
    xs, ys = [], []
    for seq in traces.sequences:
        for p in range(seq.num_positions):
            pos = seq[p]
            if pos.tokens.size <= 1:
                continue
            scores = pos.scores[1:].astype(np.float64)
            keep = np.isfinite(scores)
            if not keep.any():
                continue
            xs.append(node_features(scores[keep], pos.depths[1:][keep], pos.signals))
            ys.append(on_path(pos)[1:][keep])
    if not xs:
        raise LtdError("the traces hold no drafted nodes to fit an acceptance model on; record with a drafter")
    return stack_features(xs), np.concatenate(ys).astype(np.float64)


def fit_acceptance(traces: TraceSet, l2: float = 1e-4, drafter: str = "") -> AcceptanceModel:
    """The logistic regression of on-path on the node features, over all recorded nodes."""
    x_np, y_np = training_pairs(traces)
    x = torch.as_tensor(x_np, dtype=torch.float64)
    y = torch.as_tensor(y_np, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(loss_fn)
    with torch.no_grad():
        logits = x @ w + b
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y))
        base_p = float(y.mean().clamp(1e-9, 1 - 1e-9))
        base = -(base_p * np.log(base_p) + (1 - base_p) * np.log(1 - base_p))
    fitted = {"traces": str(traces.directory) if getattr(traces, "directory", None) else "", "nodes": int(y.numel()),
              "on_path": int(y.sum()), "log_loss": round(loss, 6), "log_loss_constant": round(float(base), 6)}
    log.info("acceptance model: %d nodes, log-loss %.4f (constant %.4f)", y.numel(), loss, base)
    return AcceptanceModel(w.detach().numpy().copy(), float(b.detach()), drafter, fitted)


def calibration_table(model: AcceptanceModel | None, traces: TraceSet, bins: tuple[float, ...] = (0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0001)) -> list[dict]:
    """Predicted against observed on-path rates, binned by prediction (raw scores when
    ``model`` is None): the check that the model says what the target does."""
    x, y = training_pairs(traces)
    if model is None:
        lg = x[:, 0] * 12.0  # the clipped logit of the raw score
        pred = 1.0 / (1.0 + np.exp(-lg))
    else:
        pred = 1.0 / (1.0 + np.exp(-np.clip(x @ model.weights + model.bias, -40, 40)))
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        m = (pred >= lo) & (pred < hi)
        if m.any():
            rows.append({"bin": f"{lo:.2f}-{min(hi, 1.0):.2f}", "nodes": int(m.sum()), "predicted": round(float(pred[m].mean()), 4),
                         "observed": round(float(y[m].mean()), 4)})
    return rows


class FittedThroughput(ThroughputController):
    """The greedy rule with the fitted chances in place of ``exp(score)``."""

    def __init__(self, costs: LatencyModel, model: AcceptanceModel, **kw) -> None:
        super().__init__(costs, **kw)
        self.model = model

    def _node_probs(self, state) -> np.ndarray:
        scores = state.tree.scores[1:].double().numpy()
        depths = state.tree.depths[1:].numpy()
        finite = np.isfinite(scores)
        scores, depths = scores[finite], depths[finite]
        order = rank_order(scores, depths)[:MAX_SIZE]  # the order verification takes them
        return self.model.node_probs(scores[order], depths[order], state.signals)

    def _frontier_probs(self, scores: np.ndarray, state) -> np.ndarray:
        # a child is never likelier than its parent: the frontier nodes as the model rates them
        return self.model.node_probs(scores, np.full(scores.size, state.step), state.signals)


def per_suite(traces: TraceSet, latency: LatencyModel, controllers: dict) -> dict:
    """tokens/s over ar and tokens per cycle by suite (and ALL) for the oracle and each controller."""
    keys = [s["key"] for s in traces.manifest["sequences"]]
    runs = {n: replay_controller(traces, latency, c, n) for n, c in controllers.items()}
    rows = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0, 0]))
    for i, seq in enumerate(traces.sequences):
        suite = keys[i].split("/")[0]
        best = oracle_sequence(seq, latency, sizes_up_to(traces.max_size))
        ar = sum(latency.ar_seconds(int(seq.prompt.size) + p) for p in range(seq.cycle_tokens))
        for group in (suite, "ALL"):
            for name, sch in [("oracle", best)] + [(n, runs[n].schedules[i]) for n in runs]:
                r = rows[group][name]
                r[0], r[1], r[2] = r[0] + sch.tokens, r[1] + sch.seconds, r[2] + sch.cycles
            r = rows[group]["ar"]
            r[0], r[1] = r[0] + best.tokens, r[1] + ar
    out = {}
    for group, d in rows.items():
        ar = d["ar"][0] / d["ar"][1]
        out[group] = {n: {"speedup_vs_ar": round(v[0] / v[1] / ar, 3), "tokens_per_cycle": round(v[0] / max(v[2], 1), 2)}
                      for n, v in d.items() if n != "ar"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", required=True, help="traces to fit on")
    ap.add_argument("--latency", required=True)
    ap.add_argument("--eval-traces", default=None, help="traces to replay on (default: the fitting traces)")
    ap.add_argument("--out", default=None, help="write the model and the tables here (JSON)")
    args = ap.parse_args()
    fit_on = TraceSet.load(args.traces)
    latency = LatencyModel.load(args.latency)
    model = fit_acceptance(fit_on)
    evaluate = TraceSet.load(args.eval_traces) if args.eval_traces else fit_on
    table = {"raw": calibration_table(None, evaluate), "fitted": calibration_table(model, evaluate)}
    for name, rows in table.items():
        print(name)
        for r in rows:
            print(f"  {r['bin']:>10}  nodes {r['nodes']:>6}  predicted {r['predicted']:.3f}  observed {r['observed']:.3f}")
    depth = evaluate.max_depth
    controllers = {"static:3x8x3": StaticController(depth=min(3, depth), topk=evaluate.topk, size=3),
                   "greedy": lambda: ThroughputController(latency, topk=evaluate.topk, max_depth=depth),
                   "greedy+fitted": lambda: FittedThroughput(latency, model, topk=evaluate.topk, max_depth=depth)}
    suites = per_suite(evaluate, latency, controllers)
    for group, d in sorted(suites.items()):
        print(f"{group:10s}", "  ".join(f"{n} {v['speedup_vs_ar']:.2f}x/{v['tokens_per_cycle']:.1f}" for n, v in d.items()))
    if args.out:
        atomic_write_json(args.out, {"model": model.to_json(), "calibration": table, "replay": suites,
                                     "cpu_model": latency.machine.get("cpu_model", "unknown")})


if __name__ == "__main__":
    main()
