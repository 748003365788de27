"""How much can cross-request memory add on a stream? A hindsight bound from traces.

The target we set the online drafter was 1.10x the frozen drafter's accepted length on the
second half of a humaneval stream. The stream memory (``--online memory``) can only help
where a remembered continuation is right and the frozen tree's is not. This walks traces
recorded with the frozen drafter (``ltd record``, prompts in file order) cycle by cycle,
as a static DEPTHxSIZE tree would, and at each cycle also looks the context up in the
memory of all earlier sequences (prompt and output, as ``StreamMemory`` keeps them, with
the n-gram drafter's own ``find_matches`` and ``build_trie``: the remembered occurrences
of the longest suffix found, as the drafter matches). The *bound* accepts
``max(frozen, memory)`` tokens, where ``memory`` is the longest prefix of the target's
continuation found along *any* remembered path after those occurrences, capped at SIZE:
an arbiter that always knew which of the two to verify, at no cost. A memory that drafts
this way cannot beat it at that tree.

    .venv/bin/python experiments/memory_bound.py --traces runs/avx512/traces-humaneval \\
        --trees 1x1,3x3,4x5,8x8 --out benchmarks/memory-bound-2026-11-27
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ltd.drafting.ngram import SEP, build_trie, find_matches
from ltd.fileio import atomic_write_json, atomic_write_text
from ltd.online.memory import DEFAULT_MAX_N
from ltd.rl.traces import TraceSet


def remembered(memory: np.ndarray, context: np.ndarray, continuation: np.ndarray, size: int, max_n: int) -> int:
    """Longest prefix of ``continuation`` (at most ``size`` tokens) along any remembered path."""
    if not memory.size:
        return 0
    joined = np.concatenate([memory, [SEP], context])
    _, ends = find_matches(joined, max_n, max_matches=10**9)
    ends = [e for e in ends if e < memory.size]  # occurrences in the memory, not the context
    if not ends:
        return 0
    node, length = build_trie(joined, ends, size), 0
    for tok in continuation[:size].tolist():
        node = node.children.get(int(tok))
        if node is None:
            break
        length += 1
    return length


def walk(seq, depth: int, size: int, memory: np.ndarray | None, max_n: int) -> tuple[int, int]:
    """(tokens, cycles) of one sequence under a static tree, optionally with the bound's arbiter."""
    prompt, out = seq.prompt.astype(np.int64), seq.output.astype(np.int64)
    tokens = cycles = p = 0
    while p < seq.num_positions:
        acc = seq.accepted(p, depth, size)
        if memory is not None:
            context = np.concatenate([prompt, out[: p + 1]])
            acc = max(acc, remembered(memory, context, out[p + 1 :], size, max_n))
        tokens, cycles, p = tokens + acc + 1, cycles + 1, p + acc + 1
    return tokens, cycles


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", required=True, help="traces of the stream, recorded in file order with the frozen drafter")
    ap.add_argument("--trees", default="1x1,3x3,4x5,8x8", help="static DEPTHxSIZE trees")
    ap.add_argument("--max-n", type=int, default=DEFAULT_MAX_N, help="longest suffix looked up in the memory")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    traces = TraceSet.load(args.traces)
    seqs = [s for s in traces.sequences if s.num_positions]
    half = len(seqs) // 2
    rows = {}
    for tree in args.trees.split(","):
        depth, size = (int(x) for x in tree.split("x"))
        if depth > traces.max_depth or (traces.max_size is not None and size > traces.max_size):
            raise SystemExit(f"tree {tree} exceeds the traces (max depth {traces.max_depth}, max size {traces.max_size})")
        frozen, bound = [0, 0], [0, 0]
        memory = np.zeros(0, dtype=np.int64)
        for i, seq in enumerate(seqs):
            if i >= half:  # the second half of the stream, as ltd bench reports it
                for acc, mem in ((frozen, None), (bound, memory)):
                    t, c = walk(seq, depth, size, mem, args.max_n)
                    acc[0] += t
                    acc[1] += c
            memory = np.concatenate([memory, [SEP], seq.prompt.astype(np.int64), seq.output.astype(np.int64)])
        rows[f"{depth}x{traces.topk}x{size}"] = {"frozen": frozen[0] / frozen[1], "bound": bound[0] / bound[1],
                                                  "ratio": (bound[0] / bound[1]) / (frozen[0] / frozen[1])}
    out = Path(args.out)
    atomic_write_json(out / "results.json", {"traces": args.traces, "sequences": len(seqs), "second_half_from": half,
                                             "max_n": args.max_n, "trees": rows})
    lines = ["# Cross-request memory: hindsight bound on the stream's second half", "",
             f"traces `{args.traces}` ({len(seqs)} sequences in file order; second half from {half}); memory lookups up to "
             f"{args.max_n} tokens. Tokens per cycle:", "",
             "| tree | frozen | bound (best of frozen and memory, every cycle) | bound / frozen |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['frozen']:.3f} | {r['bound']:.3f} | {r['ratio']:.3f}x |" for name, r in rows.items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
