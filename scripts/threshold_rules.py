"""How much of the oracle a simple rule on the draft scores reaches, in replay.

The question behind the LTD issue's 90%-of-oracle bar: is the gap between a trained policy
and the hindsight oracle the policy's fault, or is the information simply not in the
draft scores? This sweeps threshold rules that see what the policies see (the top-1
draft probability after step 1, the best candidate after step 2):

- draft one step; verify ``V1`` nodes if the best first-step probability exceeds ``th1``,
  else verify nothing (a plain step);
- draft a second step if the best first-step probability exceeds ``th2``; then verify ``V2``.

and prints the best rules as a fraction of the oracle's tokens/s (modelled time, the same
traces and latency profile as ``ltd oracle``).

    .venv/bin/python scripts/threshold_rules.py --traces runs/ltd/traces --latency runs/ltd/latency2.json
"""

from __future__ import annotations

import argparse
import json

import torch

from ltd.control import ControllerBase, DraftStepState
from ltd.rl.latency import LatencyModel
from ltd.rl.oracle import oracle, replay_controller
from ltd.rl.traces import TraceSet


class ThresholdRule(ControllerBase):
    """Draft 1-2 steps and verify by thresholds on the draft probabilities."""

    def __init__(self, th1: float, th2: float, v1: int, v2: int, topk: int) -> None:
        self.th1, self.th2, self.v1, self.v2, self.topk = th1, th2, v1, v2, topk

    def continue_drafting(self, state: DraftStepState) -> bool:
        if state.step == 0:
            return True
        if state.step == 1:
            return float(torch.exp(state.candidate_scores.max())) > self.th2
        return False

    def choose_size(self, state: DraftStepState) -> int:
        tree = state.tree
        if tree.max_depth >= 2:
            return self.v2
        first = tree.scores[1:][tree.depths[1:] == 1]
        return self.v1 if float(torch.exp(first.max())) > self.th1 else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", required=True)
    ap.add_argument("--latency", required=True)
    ap.add_argument("--sizes", default="0,2,4,8,16", help="the oracle's verification sizes")
    ap.add_argument("--top", type=int, default=5, help="rules to print")
    args = ap.parse_args()
    traces, latency = TraceSet.load(args.traces), LatencyModel.load(args.latency)
    best = oracle(traces, latency, [int(s) for s in args.sizes.split(",")]).tokens_per_second
    rows = []
    for th1 in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5):
        for th2 in (0.5, 0.7, 0.9, 1.01):  # 1.01: never a second step
            for v1 in (2, 4, 8):
                for v2 in (4, 8):
                    if th2 > 1 and v2 != 4:
                        continue
                    rule = lambda: ThresholdRule(th1, th2, v1, v2, traces.topk)  # noqa: E731
                    tps = replay_controller(traces, latency, rule, "rule").tokens_per_second
                    rows.append({"th1": th1, "th2": th2, "v1": v1, "v2": v2, "tokens_per_second": round(tps, 3),
                                 "fraction_of_oracle": round(tps / best, 4)})
    rows.sort(key=lambda r: -r["tokens_per_second"])
    print(json.dumps({"oracle_tokens_per_second": round(best, 3), "rules_tried": len(rows), "best": rows[: args.top]}, indent=2))


if __name__ == "__main__":
    main()
