"""Live cycle times against the latency model's prediction, per static tree or LTD.

Why: replay (``ltd oracle``) ranks trees by the latency profile; when live results
disagree, this says whether the profile misprices the cycles or the traces differ from
the live run in what gets accepted. Every cycle of a greedy run on real prompts is timed
(draft, verify, total) beside ``LatencyModel.cycle_seconds`` for the same depth, size and
context. ``ltd`` in ``--trees`` runs the shipped LTD policies too; its cycles are modelled
with the depth and size the policies chose and their calls charged as the profile prices
them, so its row says whether live LTD pays costs that replay does not see.

    .venv/bin/python experiments/cycle_costs.py --latency runs/avx2/latency.json --suite alpaca \\
        --trees 1x8x1,2x8x1,3x8x3 --threads 2 --out benchmarks/cycle-costs-avx2-2026-11-27
    .venv/bin/python experiments/cycle_costs.py --latency runs/avx512/latency.json --suite humaneval \\
        --trees 2x8x1,ltd --threads 2 --out benchmarks/cycle-costs-avx512-2026-11-27
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from ltd.bench.machine import machine_info
from ltd.bench.suites import load_suites, resolve_data_dir
from ltd.engine import Engine, GenerateConfig
from ltd.fileio import atomic_write_json, atomic_write_text
from ltd.rl.latency import LatencyModel


def _config(name: str, max_new_tokens: int) -> GenerateConfig:
    """``ltd`` (the shipped policies) or a static ``DEPTHxTOPKxSIZE`` tree."""
    if name == "ltd":
        return GenerateConfig(method="ltd", max_new_tokens=max_new_tokens)
    d, k, v = (int(x) for x in name.split("x"))
    return GenerateConfig(method="static", depth=d, topk=k, size=v, max_new_tokens=max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", required=True, help="latency profile JSON from ltd profile")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--suite", default="alpaca")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--trees", default="1x8x1,2x8x1,3x8x3", help="static DEPTHxTOPKxSIZE trees, and 'ltd' for the shipped policies")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    latency = LatencyModel.load(args.latency)
    configs = {name: _config(name, args.max_new_tokens) for name in args.trees.split(",")}
    engine = Engine.load(args.model)
    questions = load_suites([args.suite], resolve_data_dir(None), limit=args.limit)
    cycles: dict[str, list[dict]] = {name: [] for name in configs}
    for q in questions:
        prompt = engine.encode(q.turns[0])
        for name, config in configs.items():  # interleaved per prompt, so load changes hit every tree alike
            result = engine.generate(prompt, config)
            context = len(prompt)
            policy = config.method == "ltd"
            for c in result.cycle_log[1:]:
                modelled = latency.cycle_seconds(c.depth, c.size, context, depth_policy_calls=c.depth if policy else 0,
                                                 size_policy_calls=int(policy and c.depth > 0))
                cycles[name].append({
                    "live": c.total_seconds, "modelled": modelled, "depth": c.depth, "size": c.size,
                    "draft": c.draft_seconds, "modelled_draft": latency.draft_seconds(c.depth),
                    "verify": c.verify_seconds, "modelled_verify": latency.verify_time(c.size + 1, context),
                    "tokens": c.num_accepted + 1,
                })
                context += c.num_accepted + 1
    summary = {}
    for name, rows in cycles.items():
        mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
        summary[name] = {"cycles": len(rows), "live_ms": 1e3 * mean("live"), "modelled_ms": 1e3 * mean("modelled"),
                         "draft_ms": 1e3 * mean("draft"), "modelled_draft_ms": 1e3 * mean("modelled_draft"),
                         "verify_ms": 1e3 * mean("verify"), "modelled_verify_ms": 1e3 * mean("modelled_verify"),
                         "tokens_per_cycle": mean("tokens"), "mean_depth": mean("depth"), "mean_size": mean("size")}
    machine = machine_info("float32", "cpu")
    out = Path(args.out)
    atomic_write_json(out / "results.json", {"machine": machine, "latency": args.latency, "suite": args.suite, "limit": args.limit,
                                             "max_new_tokens": args.max_new_tokens, "threads": args.threads, "trees": summary})
    lines = [f"# Live cycle time against the latency model ({machine['cpu_model']}, {args.threads} threads)", "",
             f"{args.suite} x {args.limit}, {args.max_new_tokens} tokens; profile `{args.latency}`. Means per cycle, ms.", "",
             "| tree | cycles | live | modelled | live draft | modelled draft | live verify | modelled verify | tokens/cycle | depth | size |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {s['cycles']} | {s['live_ms']:.2f} | {s['modelled_ms']:.2f} | {s['draft_ms']:.2f} | {s['modelled_draft_ms']:.2f} | "
              f"{s['verify_ms']:.2f} | {s['modelled_verify_ms']:.2f} | {s['tokens_per_cycle']:.2f} | {s['mean_depth']:.2f} | "
              f"{s['mean_size']:.2f} |" for n, s in summary.items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
