"""Measure the n-gram drafter's reliability q(m): how often its top continuation is right
after an m-token match (the table ``ltd.drafting.ngram.DEFAULT_RELIABILITY``).

Input: conversations answered by the target itself (``ltd regenerate``), never the
benchmark suites. Each answer is walked position by position in file order, with a stream
memory of the answers before it, as ``--online memory`` serves; at every position the
drafter's trie is built as it would be, and its top chain is followed while the answer
agrees (the same count ``--online memory`` keeps, :mod:`ltd.online.reliability`). A top
child of a node d tokens deep continues an (n + d)-token match; it is right with
probability about ``q(n + d) * count(child) / count(node)``, so q(m) is estimated as
hits / sum of count shares over all top children at effective length m (the last entry
pools longer matches).

    .venv/bin/python experiments/ngram_calibration.py --data runs/regen/sharegpt_regen_528.jsonl \\
        --model smollm2-135m --out benchmarks/ngram-calibration-2026-11-27
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ltd.drafting.ngram import DEFAULT_RELIABILITY, NgramDrafter
from ltd.online.memory import StreamMemory
from ltd.online.reliability import OnlineReliability


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


def measure(pairs: list[tuple[list[int], list[int]]], depth: int = 6) -> OnlineReliability:
    """Hits and count shares per effective match length, counted by the drafter itself.

    The n-gram drafter serves every position of every answer with a stream memory of the
    answers before it, as ``--online memory`` does; after each draft it is shown the next
    ``depth`` answer tokens, and its online calibration counts its top chain against them.
    """
    drafter = NgramDrafter()
    drafter.memory = StreamMemory()
    drafter.calibration = counts = OnlineReliability(DEFAULT_RELIABILITY, strength=1e-9)  # no prior: the evidence alone
    for prompt, answer in pairs:
        drafter.reset()  # remembers the previous answer
        seq = prompt + answer
        for p in range(len(answer)):
            drafter.sync(seq[: len(prompt) + p], None)
            drafter.root(None, 1)
            drafter.sync(seq[: len(prompt) + p + depth], None)  # the target's next tokens score the draft
            drafter.end()
        drafter.sync(seq, None)
    return counts


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
    counts = measure(answers(path, tokenizer))
    table = [round(q, 2) for q in counts.table()]
    stats = {m + 1: {"hits": float(counts.hits[m]), "shares": float(counts.shares[m])} for m in range(len(table))}
    result = {"data": str(path), "model": args.model, "reliability": table, "per_match_length": stats}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    for m, s in stats.items():
        print(f"m={m}: {int(s['hits'])} of the top children right, summed count share {s['shares']:.0f}, q = {table[m - 1]:.2f}")
    print(f"reliability table: {result['reliability']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
