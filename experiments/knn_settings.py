"""Accepted length of the kNN online memory under different settings, on one suite streamed in order.

``ltd bench`` times every method; this only counts tokens per cycle (deterministic under
greedy decoding), so a settings comparison takes minutes and is not disturbed by a busy
machine. Each setting starts from an empty memory and the shipped head; the report gives
the mean accepted length over the second half of the stream, and its ratio to frozen.

    .venv/bin/python experiments/knn_settings.py --suite qa --limit 16 --out benchmarks/knn-settings-16prompts-2026-11-28/qa.json
    .venv/bin/python experiments/knn_settings.py --suite humaneval --limit 80 --max-new-tokens 128 \
        --settings default,node-votes,temperature-0.02 --out benchmarks/knn-settings-80prompts-2026-11-28/humaneval80.json
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict

import torch

from ltd.bench.suites import load_suites
from ltd.engine import Engine, GenerateConfig
from ltd.fileio import atomic_write_json
from ltd.online import OnlineAdapter
from ltd.online.knn import KnnConfig
from ltd.online.learner import adaptable_head

SETTINGS = {
    "default": KnnConfig(),
    "votes-only": KnnConfig(max_len=1),  # no retrieved continuations below the first token
    "fixed-share": KnnConfig(learn_weight=False),
    "node-votes": KnnConfig(node_votes=2),  # nodes below which the root's neighbours say nothing ask the store
    "temperature-0.02": KnnConfig(temperature=0.02),
    "temperature-0.1": KnnConfig(temperature=0.1),
}


def second_half(engine: Engine, prompts: list[list[int]], cfg: GenerateConfig, knn: KnnConfig | None) -> float:
    head = adaptable_head(engine.drafter)
    head.knn = None
    if knn is not None:
        OnlineAdapter(engine.drafter, "knn", knn_config=knn)  # attaches an empty memory to the head
    accepted = [engine.generate(p, cfg).mean_accepted for p in prompts]
    head.knn = None  # the next setting starts frozen again
    return statistics.mean(accepted[len(accepted) // 2 :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="qa")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--tree", default="3x8x3", help="static DxKxV")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default="default,votes-only,fixed-share", help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    torch.set_num_threads(args.threads)
    depth, topk, size = (int(x) for x in args.tree.split("x"))
    engine = Engine.load("smollm2-135m")
    prompts = [engine.encode(q.turns[0]) for q in load_suites([args.suite], limit=args.limit)]
    cfg = GenerateConfig(method="static", depth=depth, topk=topk, size=size, max_new_tokens=args.max_new_tokens)
    frozen = second_half(engine, prompts, cfg, None)
    rows = {"frozen": {"accepted_second_half": round(frozen, 4)}}
    print(f"{args.suite} frozen {frozen:.3f}", flush=True)
    for name in names:
        knn = SETTINGS[name]
        acc = second_half(engine, prompts, cfg, knn)
        rows[name] = {"settings": asdict(knn), "accepted_second_half": round(acc, 4), "vs_frozen": round(acc / frozen, 4)}
        print(f"{args.suite} {name} {acc:.3f} ({acc / frozen:.3f}x)", flush=True)
    atomic_write_json(args.out, {"suite": args.suite, "limit": args.limit, "tree": args.tree,
                                 "max_new_tokens": args.max_new_tokens, "results": rows})


if __name__ == "__main__":
    main()
