"""Do LTD policies fit a machine they were not trained on? (replay, per cost table)

Replays the same traces under several cost tables -- this machine's profile and other
machines' profiles put on its plain step (:func:`ltd.rl.latency.adopt`) -- and compares,
on each table: the hindsight oracle, the best static tree of a small grid, the greedy
rule, and each given policy directory (cost-conditioned policies read the table they
are replayed under; version-3 policies cannot). A policy trained over a family of cost
tables should stay near the oracle on every table; one trained on one table only there.

    .venv/bin/python experiments/transfer_replay.py --traces runs/mixed/traces \\
        --latency runs/mixed/latency.json --tables benchmarks/ltd-ceiling-avx512-2026-11-27/latency.json \\
        --policies family=runs/mixed/policy-family machine=runs/mixed/policy-machine --out transfer.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ltd.control import StaticController
from ltd.control.learned import LTDController
from ltd.control.policy import load_policy
from ltd.control.throughput import ThroughputController
from ltd.fileio import atomic_write_json
from ltd.rl.latency import LatencyModel, adopt
from ltd.rl.oracle import compare
from ltd.rl.sources import ReplaySource, run_controller
from ltd.rl.traces import TraceSet

GRID = ((1, 1), (2, 1), (2, 2), (3, 3), (4, 4), (5, 6), (6, 8), (8, 12), (12, 16))


def policy_share(traces: TraceSet, latency: LatencyModel, make) -> dict:
    """Depth and size policy calls per cycle and their share of the modelled time, in replay."""
    source = ReplaySource(traces, latency)
    depth_calls = size_calls = cycles = 0
    seconds = 0.0
    for i in range(source.num_sequences):
        for out in run_controller(source, make(), i):
            cycles, seconds = cycles + 1, seconds + out.seconds
            if out.depth > 0:  # asked after every step from the first, but not at the deepest level
                depth_calls += out.depth if out.depth < traces.max_depth else out.depth - 1
                size_calls += 1
    spent = depth_calls * latency.depth_policy_seconds + size_calls * latency.size_policy_seconds
    return {"depth_calls_per_cycle": round(depth_calls / cycles, 3), "size_calls_per_cycle": round(size_calls / cycles, 3),
            "policy_share": round(spent / seconds, 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", required=True)
    ap.add_argument("--latency", required=True, help="this machine's profile (the base of the other tables)")
    ap.add_argument("--tables", nargs="*", default=[], help="other machines' profiles")
    ap.add_argument("--policies", nargs="*", default=[], help="NAME=DIR of ltd train-policy outputs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    traces = TraceSet.load(args.traces)
    base = LatencyModel.load(args.latency)
    tables = {"this machine": base}
    for path in args.tables:
        tables[Path(path).parent.name + "/" + Path(path).name] = adopt(LatencyModel.load(path), base, path)
    policies = {}
    for item in args.policies:
        name, _, where = item.partition("=")
        policies[name] = (load_policy(Path(where) / "depth", kind="depth"), load_policy(Path(where) / "size", kind="size"))
    cap = traces.max_size or 64
    report = {}
    for tname, table in tables.items():
        ctrls = {f"static:{d}x{traces.topk}x{v}": StaticController(depth=min(d, traces.max_depth), topk=traces.topk, size=min(v, cap))
                 for d, v in GRID}
        ctrls["greedy"] = lambda t=table: ThroughputController(t, topk=traces.topk, max_depth=traces.max_depth)
        for pname, (dp, sp) in policies.items():
            ctrls[f"ltd:{pname}"] = lambda dp=dp, sp=sp, t=table: LTDController.from_policies(
                dp, sp, topk=traces.topk, costs=t if dp.spec.needs_costs else None)
        rows = {r["name"]: r for r in compare(traces, table, ctrls)["results"]}
        statics = {n: r for n, r in rows.items() if n.startswith("static:")}
        best = max(statics, key=lambda n: statics[n]["tokens_per_second"])
        keep = ["oracle", "ar", best, "greedy"] + [f"ltd:{p}" for p in policies]
        report[tname] = {n: {"speedup_vs_ar": rows[n]["speedup_vs_ar"], "fraction_of_oracle": rows[n]["fraction_of_oracle"],
                             "tokens_per_cycle": rows[n]["tokens_per_cycle"]} for n in keep}
        print(tname)
        for n in keep:
            r = report[tname][n]
            print(f"  {n:<24} {r['speedup_vs_ar']:5.2f}x ar  {100 * r['fraction_of_oracle']:5.1f}% of oracle  {r['tokens_per_cycle']:.2f} tok/cycle")
    overhead = {}
    for pname, (dp, sp) in policies.items():
        overhead[pname] = policy_share(traces, base, lambda dp=dp, sp=sp: LTDController.from_policies(
            dp, sp, topk=traces.topk, costs=base if dp.spec.needs_costs else None))
        o = overhead[pname]
        print(f"ltd:{pname}: {o['depth_calls_per_cycle']:.2f} depth and {o['size_calls_per_cycle']:.2f} size calls per cycle, "
              f"{100 * o['policy_share']:.2f}% of the modelled time on this machine's table")
    if args.out:
        atomic_write_json(args.out, {"cpu_model": base.machine.get("cpu_model", "unknown"), "tables": report,
                                     "policy_overhead": overhead})


if __name__ == "__main__":
    main()
