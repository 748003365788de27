"""Measure the n-gram drafter's reliability q(m): how often its top continuation is right
after an m-token match (the table ``ltd.drafting.ngram.DEFAULT_RELIABILITY``).

Input: conversations answered by the target itself (``ltd regenerate``), never the
benchmark suites. Each answer is walked position by position in file order, with a stream
memory of the answers before it, as ``--online memory`` serves; at every position the
drafter's trie is built as it would be, and its top chain is followed while the answer
agrees. A top child of a node d tokens deep continues an (n + d)-token match; it is right
with probability about ``q(n + d) * count(child) / count(node)``, so q(m) is estimated as
hits / sum of count shares over all top children at effective length m.

    .venv/bin/python scripts/ngram_calibration.py --data runs/regen/sharegpt_regen_528.jsonl \\
        --model smollm2-135m --out benchmarks/ngram-calibration
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from ltd.drafting.ngram import DEFAULT_MAX_LEN, DEFAULT_MAX_N, SEP, build_trie, find_matches
from ltd.online.memory import DEFAULT_CAPACITY
from ltd.online.memory import DEFAULT_MAX_N as MEMORY_MAX_N

MAX_M = 8  # longer matches share the last entry


def answers(path: Path, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids through the chat template, answer ids) of each conversation's first turn."""
    from ltd.models import encode_prompt

    out = []
    for line in path.read_text().splitlines():
        conv = json.loads(line)["conversations"]
        if len(conv) < 2:
            continue
        prompt = encode_prompt(tokenizer, conv[0]["value"], chat=True)
        out.append((prompt, tokenizer(conv[1]["value"], add_special_tokens=False)["input_ids"]))
    return out


def measure(pairs: list[tuple[list[int], list[int]]], depth: int = 6) -> dict[int, dict[str, float]]:
    """Per effective match length m: top-child trials, hits and summed count shares."""
    stats: dict[int, dict[str, float]] = defaultdict(lambda: {"trials": 0, "hits": 0, "shares": 0.0})
    memory = np.zeros(0, dtype=np.int64)
    for prompt, answer in pairs:
        seq = np.asarray(prompt + answer, dtype=np.int64)
        for p in range(len(answer)):
            ctx = seq[: len(prompt) + p]
            n, ends = find_matches(ctx, DEFAULT_MAX_N)
            arr = ctx
            if memory.size:
                joined = np.concatenate([memory, [SEP], ctx])
                n_mem, ends_mem = find_matches(joined, MEMORY_MAX_N)
                if ends_mem and n_mem > n:
                    arr, n, ends = joined, n_mem, ends_mem
            if not ends:
                continue
            node = build_trie(arr, ends, DEFAULT_MAX_LEN)
            for d in range(min(depth, len(answer) - p)):
                if not node.count or not node.children:
                    break
                tok, child = node.ranked()[0]
                s = stats[min(n + d, MAX_M)]
                s["trials"] += 1
                s["shares"] += child.count / node.count
                if tok != answer[p + d]:
                    break
                s["hits"] += 1
                node = child
        memory = np.concatenate([memory, [SEP], seq])[-DEFAULT_CAPACITY:]
    return dict(sorted(stats.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="jsonl written by ltd regenerate (the target's own answers)")
    ap.add_argument("--model", default="smollm2-135m", help="the target whose tokenizer reads the data")
    ap.add_argument("--out", required=True, help="directory for calibration.json")
    args = ap.parse_args(argv)
    path = Path(args.data)
    if not path.is_file():
        print(f"error: no data file {path}; write one with: ltd regenerate --data sharegpt --out {path}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from ltd.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(args.model)[0])
    stats = measure(answers(path, tokenizer))
    table = {m: round(s["hits"] / s["shares"], 2) for m, s in stats.items() if s["shares"] > 0}
    result = {"data": str(path), "model": args.model, "reliability": [min(1.0, table[m]) for m in sorted(table)], "per_match_length": stats}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    for m, s in stats.items():
        print(f"m={m}: {int(s['trials'])} top children, right {s['hits'] / s['trials']:.2f}, q = {table[m]:.2f}")
    print(f"reliability table: {result['reliability']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
