"""Tune online adaptation offline: prequential step-1/2 agreement on a recorded stream.

Decoding a stream with a real verifier costs minutes per setting; this records the
target's greedy outputs, features and logits once (the exact signal the online learner
receives at commit time) and then replays the commits into an OnlineLearner per
setting, scoring each prompt with the head *before* it learns from that prompt
(prequential). Agreement is a proxy for accepted length; the decision that matters is
then checked live with ``ltd bench ... +online=VARIANT``.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/online_tune.py --grid 1   # then --grid 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from ltd.bench.suites import load_suites
from ltd.drafting.eagle3 import Eagle3Drafter
from ltd.engine import Engine, GenerateConfig
from ltd.online import OnlineConfig, OnlineLearner
from ltd.train.trainer import TrainConfig, sequence_loss


def record(engine: Engine, suites: list[str], limit: int, max_new: int) -> list[dict]:
    drafter = engine.drafter
    stream = []
    for suite in suites:
        for q in load_suites([suite], limit=limit):
            prompt = engine.encode(q.turns[0])
            out = engine.generate(prompt, GenerateConfig(method="ar", max_new_tokens=max_new)).tokens
            full = prompt + out
            engine.backend.reset()
            res = engine.backend.score(full, list(range(-1, len(full) - 1)), drafter.feature_layers)
            engine.backend.reset()
            stream.append({"suite": suite, "prompt_len": len(prompt), "tokens": full,
                           "logits": res.logits.float(), "features": res.features.float()})
    return stream


def seq_dict(item: dict, learner: OnlineLearner) -> dict:
    k = learner.cfg.label_topk
    logp = torch.log_softmax(item["logits"], dim=-1)
    val, idx = torch.topk(logp, k, dim=-1)
    mask = torch.zeros(len(item["tokens"]), dtype=torch.uint8)
    mask[item["prompt_len"] - 1 :] = 1  # positions whose next token is generated
    return {"input_ids": torch.tensor(item["tokens"]), "features": item["features"], "top_ids": idx, "top_logp": val, "loss_mask": mask}


@torch.no_grad()
def agreement(learner: OnlineLearner, seq: dict) -> tuple[float, float]:
    _, hits, valid = sequence_loss(learner.head, learner.embed, seq, learner.t2d_index, TrainConfig(unroll=2))
    keep = seq["loss_mask"][: valid.numel()].bool() & valid
    a1 = float(hits[0][keep].float().mean())
    keep2 = keep.clone()
    keep2[:1] = False
    a2 = float(hits[1][keep2].float().mean()) if len(hits) > 1 else 0.0
    return a1, a2


def simulate(engine: Engine, stream: list[dict], cfg: OnlineConfig | None, chunk: int = 2) -> dict:
    drafter = Eagle3Drafter(copy.deepcopy(engine.drafter.head), engine.drafter.embed)
    learner = OnlineLearner(drafter, cfg or OnlineConfig(variant="plain", lr=0.0))
    rows = []
    for item in stream:
        seq = seq_dict(item, learner)
        rows.append((item["suite"], *agreement(learner, seq)))
        if cfg is None:
            continue
        n, pl = len(item["tokens"]), item["prompt_len"]
        learner.on_commit(item["tokens"][:pl], item["logits"][:pl], item["features"][:pl])
        for s in range(pl, n, chunk):
            e = min(s + chunk, n)
            learner.on_commit(item["tokens"][s:e], item["logits"][s:e], item["features"][s:e])
        learner.buf.clear()  # a new request starts a new context
    out = {"updates": learner.stats.updates, "update_seconds": round(learner.stats.update_seconds, 2)}
    for suite in dict.fromkeys(r[0] for r in rows):
        sr = [r for r in rows if r[0] == suite]
        half = sr[len(sr) // 2 :]
        out[suite] = {"step1": round(statistics.mean(r[1] for r in sr), 4),
                      "step1_second_half": round(statistics.mean(r[1] for r in half), 4)}
    return out


# Grid 1 (2026-11-27): midlayer beat lm_head and all, lr 3e-4 beat 1e-3, window 32 / unroll 1
# matched window 96 / unroll 2 at a third of the cost. Grid 2 checked the neighbours of the winner.
GRIDS = {
    1: [("plain", "midlayer", 3e-4, 16, 96, 2), ("plain", "midlayer", 3e-4, 16, 32, 1), ("plain", "midlayer", 1e-3, 16, 32, 1),
        ("plain", "midlayer", 1e-3, 8, 32, 1), ("plain", "lm_head", 1e-3, 16, 32, 1), ("plain", "all", 1e-3, 16, 32, 1),
        ("optimistic", "midlayer", 1e-3, 16, 32, 1), ("hedge", "midlayer", 1e-3, 16, 32, 1)],
    2: [("plain", "midlayer", 1e-4, 16, 32, 1), ("plain", "midlayer", 3e-4, 32, 32, 1), ("plain", "midlayer", 3e-4, 16, 16, 1),
        ("optimistic", "midlayer", 3e-4, 16, 32, 1), ("hedge", "midlayer", 3e-4, 16, 32, 1)],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suites", default="humaneval,gsm8k")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--cache", default="runs/online_stream.pt")
    ap.add_argument("--grid", type=int, default=1, choices=sorted(GRIDS), help="which settings to compare (see GRIDS)")
    ap.add_argument("--out", default=None, help="report JSON (default runs/online_tune_gridN.json)")
    args = ap.parse_args()
    engine = Engine.load("smollm2-135m")
    cache = Path(args.cache)
    if cache.is_file():
        stream = torch.load(cache)
    else:
        t0 = time.perf_counter()
        stream = record(engine, args.suites.split(","), args.limit, args.max_new_tokens)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(stream, cache)
        print(f"recorded {len(stream)} sequences in {time.perf_counter() - t0:.0f} s")
    settings = {"frozen": None}
    grid = GRIDS[args.grid]
    for variant, params, lr, every, window, unroll in grid:
        name = f"{variant}/{params}/lr{lr:g}/every{every}/window{window}/unroll{unroll}"
        settings[name] = OnlineConfig(variant=variant, params=params, lr=lr, update_every=every, window=window, unroll=unroll)
    report = {}
    for name, cfg in settings.items():
        report[name] = simulate(engine, stream, cfg)
        print(name, json.dumps(report[name]), flush=True)
    Path(args.out or f"runs/online_tune_grid{args.grid}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
