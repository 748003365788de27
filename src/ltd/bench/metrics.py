"""Aggregation of timings: medians over repeats and ratios paired per prompt.

Pure functions on plain numbers, so the arithmetic is tested on synthetic timings.

Definitions (all reported in results.json):

- ``tokens_per_second``: for each repeat, total new tokens / total seconds over the
  prompts; the median over repeats (min and max alongside).
- ``speedup``: for each prompt and repeat, tokens/s of the method over tokens/s of the
  baseline *in the same repeat* (measured seconds apart, so slow drift of a shared
  machine cancels); per prompt the median over repeats; overall the median over prompts
  (min and max over prompts alongside). ``speedup_aggregate`` is the plain ratio of the
  two ``tokens_per_second`` values, for reference.
- ``mean_accepted``: tokens added per verification cycle, weighted by cycles.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Run:
    """One timed generation."""

    method: str
    prompt: str
    suite: str
    repeat: int
    new_tokens: int
    seconds: float
    cycles: int = 0
    mean_accepted: float | None = None


def throughput(tokens: float, seconds: float) -> float:
    """Tokens per second; 0 for a run that took no measurable time."""
    return tokens / seconds if seconds > 0 else 0.0


def spread(values: Iterable[float]) -> dict[str, float] | None:
    """Median, min and max (None for no values)."""
    vals = [float(v) for v in values]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def per_repeat_totals(runs: Sequence[Run]) -> dict[int, tuple[int, float]]:
    """repeat -> (total new tokens, total seconds) over the prompts of that repeat."""
    totals: dict[int, list[float]] = defaultdict(lambda: [0, 0.0])
    for r in runs:
        totals[r.repeat][0] += r.new_tokens
        totals[r.repeat][1] += r.seconds
    return {k: (int(v[0]), float(v[1])) for k, v in sorted(totals.items())}


def per_repeat_throughput(runs: Sequence[Run]) -> list[float]:
    """Aggregate tokens/s of each repeat, in repeat order."""
    return [throughput(t, s) for t, s in per_repeat_totals(runs).values()]


def pairwise_speedups(runs: Sequence[Run], baseline: Sequence[Run]) -> dict[str, float]:
    """prompt -> median over repeats of (method tokens/s) / (baseline tokens/s), same repeat.

    Pairs missing on either side (an interrupted bench) or with a zero baseline are
    skipped; a prompt with no valid pair is left out.
    """
    base = {(r.prompt, r.repeat): throughput(r.new_tokens, r.seconds) for r in baseline}
    ratios: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        b = base.get((r.prompt, r.repeat))
        if b is None or b <= 0:
            continue
        ratios[r.prompt].append(throughput(r.new_tokens, r.seconds) / b)
    return {p: statistics.median(v) for p, v in ratios.items() if v}


def weighted_mean_accepted(runs: Sequence[Run]) -> float | None:
    """Mean tokens per cycle over all runs, weighted by their cycle counts."""
    num = 0.0
    den = 0
    for r in runs:
        if r.mean_accepted is None or r.cycles <= 0 or math.isnan(r.mean_accepted):
            continue
        num += r.mean_accepted * r.cycles
        den += r.cycles
    return num / den if den else None


def match_fraction(flags: Iterable[bool]) -> float | None:
    """Share of prompts whose output equals the baseline's (None when not compared)."""
    vals = list(flags)
    return sum(1 for f in vals if f) / len(vals) if vals else None


def summarize(runs: Sequence[Run], baseline: Sequence[Run], matches: Mapping[str, bool] | None = None) -> dict:
    """The numbers reported for one method (over one suite or all)."""
    tps = spread(per_repeat_throughput(runs))
    base_tps = spread(per_repeat_throughput(baseline))
    per_prompt = pairwise_speedups(runs, baseline)
    speed = spread(per_prompt.values())
    totals = per_repeat_totals(runs)
    prompts = sorted({r.prompt for r in runs})
    flags = [matches[p] for p in prompts if matches is not None and p in matches]
    # Stream order (first appearance): online methods should improve over the second half.
    order = list(dict.fromkeys(r.prompt for r in runs))
    late_prompts = set(order[len(order) // 2 :])
    late = [r for r in runs if r.prompt in late_prompts]
    late_tps = spread(per_repeat_throughput(late)) if late else None
    return {
        "tokens_per_second": tps["median"] if tps else None,
        "tokens_per_second_min": tps["min"] if tps else None,
        "tokens_per_second_max": tps["max"] if tps else None,
        "speedup": speed["median"] if speed else None,
        "speedup_min": speed["min"] if speed else None,
        "speedup_max": speed["max"] if speed else None,
        "speedup_aggregate": (tps["median"] / base_tps["median"]) if tps and base_tps and base_tps["median"] > 0 else None,
        "mean_accepted": weighted_mean_accepted(runs),
        "mean_accepted_second_half": weighted_mean_accepted(late) if late else None,
        "tokens_per_second_second_half": late_tps["median"] if late_tps else None,
        "new_tokens": statistics.median(t for t, _ in totals.values()) if totals else 0,
        "seconds": statistics.median(s for _, s in totals.values()) if totals else 0.0,
        "prompts": len(prompts),
        "repeats": len(totals),
        "outputs_match": match_fraction(flags),
    }


def summarize_all(
    runs: Sequence[Run],
    methods: Sequence[str],
    baseline: str,
    matches: Mapping[str, Mapping[str, bool]] | None = None,
) -> tuple[dict[str, dict], dict[str, dict[str, dict]]]:
    """(per-method summaries, per-suite per-method summaries)."""
    matches = matches or {}
    by_method: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_method[r.method].append(r)
    base_runs = by_method.get(baseline, [])
    overall = {m: summarize(by_method[m], base_runs, matches.get(m)) for m in methods if by_method.get(m)}
    suites = sorted({r.suite for r in runs})
    per_suite: dict[str, dict[str, dict]] = {}
    for suite in suites:
        base_s = [r for r in base_runs if r.suite == suite]
        per_suite[suite] = {
            m: summarize([r for r in by_method[m] if r.suite == suite], base_s, matches.get(m))
            for m in methods
            if any(r.suite == suite for r in by_method.get(m, []))
        }
    return overall, per_suite


def best_method(summaries: Mapping[str, dict], candidates: Sequence[str], key: str = "speedup") -> str | None:
    """The candidate with the highest ``key`` (ties: the earlier candidate)."""
    best, best_val = None, -math.inf
    for name in candidates:
        val = summaries.get(name, {}).get(key)
        if val is not None and val > best_val:
            best, best_val = name, val
    return best
