"""Statistics and report of ``ltd bench-load``: pure functions on per-request records.

The definitions of every number are :data:`DEFINITIONS`, which report.md repeats.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ltd.bench.load_config import SERIAL, LoadConfig
from ltd.bench.metrics import throughput
from ltd.bench.report import write_results_json
from ltd.fileio import atomic_write_text
from ltd.machine import cpu_model

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
MIB = 1024 * 1024
MAX_ERROR_KINDS = 5  # distinct error messages kept per level
DEFINITIONS = (
    "A level's wall time runs from its first request's start to its last response's end.",
    "tokens/s = completion tokens of the successful requests / wall time; requests/s = successful requests / wall time.",
    "latency = request sent to the stream's last event; TTFT (time to first token) = request sent to the first "
    "non-empty text delta. p50 (the median) and p95 are over the successful requests, by linear interpolation "
    "between order statistics (numpy's default).",
    "peak RSS = the most resident memory the server process (and its children) held while the level ran, sampled "
    "every 0.1 s; it includes what earlier levels left allocated.",
    "Ratios are against the serial configuration at the same concurrency: tokens/s over its tokens/s, p95 latency "
    "over its p95 latency.",
    "Servers and levels run one at a time; the clients run in one asyncio process on the same machine.",
)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile by linear interpolation; None for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def level_summary(records: Sequence[dict], wall: float, concurrency: int, peak_rss_bytes: int) -> dict:
    """One level's numbers from its request records (dicts with ``latency``, ``ttft``,
    ``completion_tokens``, ``error``); the records are kept alongside."""
    ok = [r for r in records if r.get("error") is None]
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tokens = sum(int(r["completion_tokens"]) for r in ok)
    errors = [r["error"] for r in records if r.get("error") is not None]
    return {
        "concurrency": concurrency,
        "wall_seconds": wall,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:MAX_ERROR_KINDS],
        "completion_tokens": tokens,
        "tokens_per_second": throughput(tokens, wall),
        "requests_per_second": throughput(len(ok), wall),
        "latency_p50": percentile(latencies, 50),
        "latency_p95": percentile(latencies, 95),
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "peak_rss_mib": peak_rss_bytes / MIB,
        "records": list(records),
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def with_ratios(configs: Sequence[dict], baseline: str = SERIAL) -> list[dict]:
    """A copy of the configurations whose levels carry ``throughput_ratio`` (tokens/s)
    and ``p95_latency_ratio`` against ``baseline`` at the same concurrency (None without it)."""
    out = copy.deepcopy(list(configs))
    base = next((c for c in out if c["name"] == baseline), None)
    by_level = {lv["concurrency"]: lv for lv in base["levels"]} if base else {}
    for c in out:
        for lv in c["levels"]:
            ref = by_level.get(lv["concurrency"], {})
            lv["throughput_ratio"] = _ratio(lv["tokens_per_second"], ref.get("tokens_per_second"))
            lv["p95_latency_ratio"] = _ratio(lv["latency_p95"], ref.get("latency_p95"))
    return out


def results_document(cfg: LoadConfig, prompts: int, configs: Sequence[dict], started: str,
                     interrupted: bool = False) -> dict:
    """results.json: the machine, the settings, every configuration's levels and ratios."""
    return {
        "benchmark": "ltd bench-load",
        "date": started,
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count()},
        "config": {
            "model": cfg.model, "threads": cfg.threads, "concurrency": list(cfg.concurrency),
            "requests": cfg.requests, "time_limit": cfg.time_limit, "max_tokens": cfg.max_tokens,
            "suites": list(cfg.suites), "limit": cfg.limit, "seed": cfg.seed, "prompts": prompts,
            "server_args": list(cfg.server_args), "warmup": cfg.warmup,
        },
        "baseline": SERIAL if any(c["name"] == SERIAL for c in configs) else None,
        "configs": with_ratios(configs),
        "interrupted": interrupted,
    }


def _num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _setup_lines(doc: dict) -> list[str]:
    c, m = doc["config"], doc["machine"]
    lines = [f"# ltd bench-load: {c['model']}", ""]
    if doc.get("interrupted"):
        lines += ["**Interrupted**: partial results (the levels that finished).", ""]
    return lines + [
        f"- date: {doc['date']}",
        f"- machine: {m['cpu_model']} ({m['cpu_count']} CPUs); server threads: {c['threads'] or 'the library default'}",
        f"- workload: {', '.join(c['suites'])} ({c['prompts']} prompts"
        + (f", first {c['limit']} of each suite" if c["limit"] else "") + f", seed {c['seed']}), "
        "streamed greedy chat completions, " + f"max_tokens {c['max_tokens']}",
        f"- each level: at most {c['requests']} requests, none started after {_num(c['time_limit'], 0)} s; "
        f"concurrency {', '.join(str(x) for x in c['concurrency'])}",
        "- servers" + (f" (all with `{' '.join(c['server_args'])}`)" if c["server_args"] else "") + ":",
        *[f"  - {s['name']}: `{s['command']}`" + (f" (**failed**: {s['error']})" if s.get("error") else "")
          for s in doc["configs"]],
    ]


def _table_lines(doc: dict) -> list[str]:
    lines = ["", "## Throughput, latency and memory", "",
             "| server | clients | ok / sent | tokens/s | requests/s | latency p50 s | latency p95 s | TTFT p50 s "
             f"| TTFT p95 s | peak RSS MiB | tokens/s vs {SERIAL} | p95 latency vs {SERIAL} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in doc["configs"]:
        for lv in s["levels"]:
            lines.append(
                f"| {s['name']} | {lv['concurrency']} | {lv['ok']} / {lv['requests']} | {_num(lv['tokens_per_second'], 1)} "
                f"| {_num(lv['requests_per_second'])} | {_num(lv['latency_p50'])} | {_num(lv['latency_p95'])} "
                f"| {_num(lv['ttft_p50'])} | {_num(lv['ttft_p95'])} | {_num(lv['peak_rss_mib'], 0)} "
                f"| {_num(lv.get('throughput_ratio'), 2, 'x')} | {_num(lv.get('p95_latency_ratio'), 2, 'x')} |")
    return lines


def _error_lines(doc: dict) -> list[str]:
    rows = [f"- {s['name']}, {lv['concurrency']} clients: {lv['errors']} failed: " + "; ".join(lv["error_kinds"])
            for s in doc["configs"] for lv in s["levels"] if lv["errors"]]
    return ["", "## Errors", "", *rows] if rows else []


def render_load_markdown(doc: dict) -> str:
    """report.md: setup, one table row per server and concurrency, errors, definitions."""
    lines = _setup_lines(doc) + _table_lines(doc) + _error_lines(doc)
    lines += ["", "## Definitions", "", *(f"- {d}" for d in DEFINITIONS), ""]
    return "\n".join(lines)


def write_load_results(doc: dict, out_dir: str | Path) -> None:
    """results.json and report.md, each written atomically."""
    out = Path(out_dir)
    write_results_json(doc, out)
    atomic_write_text(out / REPORT_MD, render_load_markdown(doc))
