"""Real check of the EAGLE-3 export: llama.cpp's converter, then its draft-eagle3 speculation.

For each prompt: llama.cpp plain greedy (``llama-simple``), llama.cpp's own loop with no
drafts (``llama-speculative-simple`` with an n-gram drafter that can never match: the
same loop and thread count, batch of one per step) for speed, and ``draft-eagle3`` with
our exported head. Greedy outputs must be equal; acceptance and tokens/s are recorded.

    PYTHONPATH=src python benchmarks/llamacpp-eagle3-export-2026-11-27/check.py --out benchmarks/llamacpp-eagle3-export-2026-11-27
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ltd.bench.machine import cpu_model, utc_now
from ltd.bench.suites import SUITES, load_suites
from ltd.drafting.eagle3 import Eagle3Head
from ltd.drafting.export import resolve_head_dir, write_export
from ltd.models import encode_prompt, load_model
from ltd.peers.eagle3_gguf import convert_export
from ltd.peers.llamacpp_build import PLAIN_BINARY, SPEC_BINARY, require_build
from ltd.peers.llamacpp_peer import output_tokens, target_gguf
from ltd.peers.llamacpp_spec import PeerSpec, parse_plain_run, parse_spec_run, plain_command, run_tool, spec_command


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--drafter", default="builtin:smollm2-135m-eagle3")
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-n", type=int, default=0, help="--spec-draft-n-max (0 = llama.cpp default)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    out = Path(args.out)
    work = out / "work"
    build = require_build()
    target = load_model(args.model)
    head_dir = resolve_head_dir(args.drafter)
    export = write_export(Eagle3Head.load(head_dir), target.model.get_input_embeddings().weight, target.model.config,
                          target.tokenizer, work / "export")
    gguf = work / "eagle3-head.gguf"
    t0 = time.perf_counter()
    convert_export(build, export.head_dir, export.target_dir, gguf)
    convert_seconds = time.perf_counter() - t0
    print(f"converted {export.head_dir} -> {gguf} in {convert_seconds:.1f} s", file=sys.stderr)

    tgt = target_gguf(args.model)
    spec = PeerSpec("draft-eagle3", args.draft_n)
    rows = []
    for q in load_suites(args.suites.split(","), None, limit=args.limit):
        prompt = encode_prompt(target.tokenizer, q.turns[0])
        text = target.tokenizer.decode(prompt, skip_special_tokens=False)
        ctx = len(prompt) + args.max_new_tokens + 64
        plain = parse_plain_run(*run_tool(plain_command(build.binary(PLAIN_BINARY), tgt, text, args.max_new_tokens)), text)
        base_cmd = spec_command(build.binary(SPEC_BINARY), PeerSpec("none"), tgt, text, args.max_new_tokens, ctx, args.threads)
        base = parse_spec_run(*run_tool(base_cmd), text)
        eagle = parse_spec_run(*run_tool(spec_command(build.binary(SPEC_BINARY), spec, tgt, text, args.max_new_tokens, ctx,
                                                      args.threads, draft_gguf=gguf)), text)
        eos = target.eos_token_ids
        ids_plain = output_tokens(target.tokenizer, plain, args.max_new_tokens, eos)
        ids_eagle = output_tokens(target.tokenizer, eagle, args.max_new_tokens, eos)
        ids_base = output_tokens(target.tokenizer, base, args.max_new_tokens, eos)
        row = {
            "prompt": q.key, "suite": q.suite, "prompt_tokens": len(prompt), "llamacpp_prompt_tokens": eagle.n_prompt,
            "match_nodraft": ids_eagle == ids_base, "match_plain": ids_eagle == ids_plain,
            "nodraft_matches_plain": ids_base == ids_plain,
            "tokens": len(ids_eagle), "n_drafted": eagle.n_drafted, "n_accept": eagle.n_accept,
            "acceptance_rate": round(eagle.acceptance_rate, 4),
            "tokens_per_cycle": round(eagle.n_predict / eagle.cycles, 3) if eagle.cycles else None,
            "eagle3_tps": round(eagle.n_predict / eagle.seconds, 2),
            "nodraft_tps": round(base.n_predict / base.seconds, 2),
            "plain_simple_tps": round(plain.n_predict / plain.seconds, 2) if plain.seconds else None,
        }
        for name, ref in (("nodraft", ids_base), ("plain", ids_plain)):
            if ref != ids_eagle:
                row[f"first_difference_{name}"] = first_difference(ref, ids_eagle)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    drafted = sum(r["n_drafted"] for r in rows)
    summary = {
        "date": utc_now(), "cpu_model": cpu_model(), "threads": args.threads, "model": args.model,
        "target_gguf": tgt.name, "drafter": args.drafter, "draft_n_max": args.draft_n or 3,
        "max_new_tokens": args.max_new_tokens, "prompts": len(rows), "convert_seconds": round(convert_seconds, 1),
        "outputs_match_nodraft": sum(r["match_nodraft"] for r in rows) / len(rows),
        "outputs_match_plain": sum(r["match_plain"] for r in rows) / len(rows),
        "nodraft_matches_plain": sum(r["nodraft_matches_plain"] for r in rows) / len(rows),
        "acceptance_rate": round(sum(r["n_accept"] for r in rows) / drafted, 4) if drafted else 0.0,
        "median_eagle3_tps": statistics.median(r["eagle3_tps"] for r in rows),
        "median_nodraft_tps": statistics.median(r["nodraft_tps"] for r in rows),
        "median_speedup": statistics.median(r["eagle3_tps"] / r["nodraft_tps"] for r in rows),
        "build": build.info(),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
