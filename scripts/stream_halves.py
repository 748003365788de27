"""Per suite, each method's second half of the stream: accepted tokens per cycle and tokens/s.

``ltd bench`` reports second-half numbers over the whole stream; a domain-shift stream
(humaneval then gsm8k) needs them per suite. Reads the runs of a ``results.json`` (prompts
in file order, one repeat):

    .venv/bin/python scripts/stream_halves.py benchmarks/online-knn-80prompts-2026-11-28/results.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="results.json of ltd bench")
    args = ap.parse_args(argv)
    data = json.load(open(args.results))
    by: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in data["runs"]:
        by[r["suite"]][r["method"]].append(r)
    for suite, methods in by.items():
        print(suite)
        for method, runs in methods.items():
            half = runs[len(runs) // 2 :]
            accepted = sum(r["new_tokens"] for r in half) / max(1, sum(r["cycles"] for r in half))
            tps = sum(r["new_tokens"] for r in half) / sum(r["seconds"] for r in half)
            print(f"  {method:40s} prompts {len(runs):3d}  2nd half: accepted {accepted:.3f}  tokens/s {tps:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
