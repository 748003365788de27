"""results.json, report.md and plots of a bench.

Every file is written to a temporary name in the target directory and renamed into
place (``os.replace``), so a bench interrupted while writing never leaves a truncated
results.json behind. Plots use matplotlib's Agg backend (no display on servers).
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from ltd.bench.suites import ALL_TURN_SUITES, MIXED
from ltd.fileio import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
SPEEDUP_PNG = "speedup_by_suite.png"
GRID_PNG = "static_grid.png"
MAX_BARS = 8  # methods per suite in the bar plot; more is unreadable


def _turns(cfg: dict) -> str:
    """Which turns ran: multiturn questions always run every turn, the others the first
    unless --multi-turn."""
    if cfg.get("multi_turn"):
        return ", all turns"
    if any(s in ALL_TURN_SUITES or s == MIXED for s in cfg.get("suites", [])):
        return ", first turn; every turn of multiturn"
    return ", first turn"


def _kernel_lines(results: dict) -> list[str]:
    """Which row counts our hf forwards computed as (W @ x.T).T (the hf baseline keeps stock kernels)."""
    k = results.get("kernels")
    if not k:
        return []
    rows = k.get("wxt_rows") or []
    padded = k.get("padded") or {}
    if not rows and not padded:
        return ["- our hf forwards: stock F.linear matmuls"]
    line = f"- our hf forwards: (W @ x.T).T matmuls for {_ranges(rows)} rows, F.linear otherwise (measured plan, `--kernels`)"
    if padded:
        line += "; zero rows padded: " + ", ".join(f"{r}->{p}" for r, p in padded.items())
    return [line]


def _ranges(rows: list[int]) -> str:
    out, start, prev = [], None, None
    for r in rows:
        if start is None:
            start = prev = r
        elif r == prev + 1:
            prev = r
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = r
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (strict JSON), floats rounded for reading."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_results_json(results: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / RESULTS_JSON
    atomic_write_text(path, json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")
    return path


# -- markdown --------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _range(s: dict, key: str, digits: int = 2, suffix: str = "") -> str:
    mid, lo, hi = s.get(key), s.get(f"{key}_min"), s.get(f"{key}_max")
    if mid is None:
        return "-"
    if lo is None or hi is None or lo == hi:
        return f"{_fmt(mid, digits)}{suffix}"
    return f"{_fmt(mid, digits)}{suffix} [{_fmt(lo, digits)}-{_fmt(hi, digits)}]"


def render_markdown(results: dict, plots: dict[str, Path] | None = None) -> str:
    """A human-readable report: setup, overall table, per-suite speedups, mismatches."""
    methods = results.get("methods", {})
    base = results.get("baseline", "hf")
    lines = _setup_lines(results)
    lines += _overall_lines(methods, base)
    lines += _suite_lines(results.get("suites", {}), methods, base)
    lines += _best_lines(results)
    lines += _stream_lines(methods)
    if results.get("skipped"):
        lines += ["", "## Skipped methods", ""] + [f"- {line}" for line in results["skipped"]]
    lines += _mismatch_lines(methods)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{title}]({Path(path).name})" for title, path in plots.items()]
    lines += _definition_lines(base)
    return "\n".join(lines)


def _setup_lines(results: dict) -> list[str]:
    """The title and what ran where: machine, backend, drafter, suites, decoding settings."""
    cfg, mach = results.get("config", {}), results.get("machine", {})
    lines = [f"# ltd bench: {cfg.get('model', '?')}", ""]
    if results.get("interrupted"):
        lines += ["**Interrupted**: partial results (prompts every method finished).", ""]
    return lines + [
        f"- date: {results.get('date', '?')}",
        f"- machine: {mach.get('cpu_model', '?')}; {mach.get('torch_threads', '?')} torch threads "
        f"({mach.get('usable_cpus', '?')} usable CPUs); torch {mach.get('torch', '?')}, "
        f"transformers {mach.get('transformers', '?')}; {mach.get('device', '?')} {mach.get('dtype', '?')}",
        f"- backend: {cfg.get('backend', 'hf')}" + (f", {cfg['threads']} threads" if cfg.get("threads") else ""),
        *_kernel_lines(results),
        f"- drafter: {cfg.get('drafter') or 'default'}"
        + (f" (EAGLE-3 head weights: {cfg['head_dtype']})" if cfg.get("head_dtype") else "")
        + (f"; assistant: {cfg['assistant']}" if cfg.get("assistant") else ""),
        f"- suites: {', '.join(cfg.get('suites', []))} ({cfg.get('questions', '?')} questions"
        + _turns(cfg) + ")",
        f"- repeats: {cfg.get('repeats')}, max new tokens: {cfg.get('max_new_tokens')}, "
        f"temperature: {cfg.get('temperature')}" + (f", top-p {cfg.get('top_p')}" if cfg.get("temperature") else ""),
    ]


def _overall_lines(methods: dict, base: str) -> list[str]:
    lines = [
        "",
        "## Overall",
        "",
        f"| method | tokens/s (median over repeats [min-max]) | speedup vs {base} (median over prompts [min-max]) "
        f"| mean accepted | new tokens | outputs match {base} |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in methods.items():
        match = s.get("outputs_match")
        lines.append(
            f"| {label} | {_range(s, 'tokens_per_second', 1)} | {_range(s, 'speedup', 2, 'x')} "
            f"| {_fmt(s.get('mean_accepted'))} | {_fmt(s.get('new_tokens'), 0)} "
            f"| {'-' if match is None else f'{100 * match:.0f}%'} |"
        )
    return lines


def _suite_lines(suites: dict, methods: dict, base: str) -> list[str]:
    """Speedups and tokens/s per suite, one column each."""
    if not suites:
        return []
    names = list(suites)
    header = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines = ["", f"## Speedup vs {base} per suite (median over prompts)", "", *header]
    for label in methods:
        lines.append(f"| {label} | " + " | ".join(_fmt(suites[n].get(label, {}).get("speedup")) for n in names) + " |")
    lines += ["", "Tokens/s per suite (median over repeats):", "", *header]
    for label in methods:
        lines.append(f"| {label} | " + " | ".join(_fmt(suites[n].get(label, {}).get("tokens_per_second"), 1) for n in names) + " |")
    return lines


def _best_lines(results: dict) -> list[str]:
    """The grid's best static tree and best llama.cpp built-in speculation, when searched."""
    lines = []
    best = results.get("best_static")
    if best:
        lines += ["", "## Best static configuration", "",
                  f"**{best['method']}** (depth {best['depth']}, top-k {best['topk']}, size {best['size']}): "
                  f"speedup {_fmt(best.get('speedup'))}x, {_fmt(best.get('tokens_per_second'), 1)} tokens/s, "
                  f"selected by {best.get('criterion')} on {', '.join(best.get('selected_on', []))}."]
    peer = results.get("best_llamacpp_spec")
    if peer:
        length = peer.get("draft_length")
        lines += ["", "## Best llama.cpp built-in speculation", "",
                  f"**{peer['method']}** (type {peer['type']}, draft length {length or 'llama.cpp default'}): "
                  f"speedup {_fmt(peer.get('speedup'))}x, {_fmt(peer.get('tokens_per_second'), 1)} tokens/s, "
                  f"selected by {peer.get('criterion')} on {', '.join(peer.get('selected_on', []))}."]
    return lines


def _stream_lines(methods: dict) -> list[str]:
    """Each ``+online`` method beside the same method without it, over the stream's second
    half (prompts in run order): what the memory learned along the stream buys."""
    rows = []
    for label, s in methods.items():
        base, plus, _ = label.partition("+online=")
        if plus and base in methods:
            ours, theirs = s.get("tokens_per_second_second_half"), methods[base].get("tokens_per_second_second_half")
            ratio = ours / theirs if ours and theirs else None
            rows.append(f"| {label} | {base} | {_fmt(ours, 1)} | {_fmt(theirs, 1)} | {_fmt(ratio)}x "
                        f"| {_fmt(s.get('mean_accepted_second_half'))} | {_fmt(methods[base].get('mean_accepted_second_half'))} |")
    if not rows:
        return []
    return ["", "## Online adaptation over the stream's second half", "",
            "| method | without online | tokens/s | tokens/s without | ratio | mean accepted | mean accepted without |",
            "|---|---|---|---|---|---|---|", *rows]


def _mismatch_lines(methods: dict) -> list[str]:
    """Greedy outputs that differ from their reference, with the margin that tells a tie from a bug."""
    rows = [(label, m) for label, s in methods.items() for m in s.get("mismatches", [])]
    if not rows:
        return []
    lines = ["", "## Greedy outputs that differ from their reference", "",
             "A top-2 margin (of the reference's logits) below the backend's tie margin (1e-4 on transformers in "
             "float32; in a 16-bit dtype 4 rounding steps at the logit's size, 0.625 at a logit of 20 in bfloat16) is a "
             "numerical tie; a larger one points at a bug, except across engines (llama.cpp's quantized kernels "
             "against transformers' dense weights).", "",
             "| method | reference | prompt | first differing token | reference token | method token "
             "| reference top-2 logit margin | tie |",
             "|---|---|---|---|---|---|---|---|"]
    for label, m in rows:
        tie = m.get("numerical_tie")
        ref = m.get("reference", "hf") + (" (cross-engine)" if m.get("cross_engine") else "")
        lines.append(
            f"| {label} | {ref} | {m['prompt']} | {m['position']} | {_fmt(m.get('reference_token'))} "
            f"| {_fmt(m.get('output_token'))} | {_fmt(m.get('reference_top2_margin'), 6)} "
            f"| {'-' if tie is None else ('yes' if tie else 'NO')} |"
        )
    return lines


def _definition_lines(base: str) -> list[str]:
    return [
        "",
        "## Definitions",
        "",
        "- Methods run in one process with models loaded once, after one warm-up run of each; "
        "for each prompt and repeat, every method runs back to back (A B C A B C ...).",
        "- tokens/s: total new tokens / total seconds over the prompts of one repeat (prefill included); "
        "median over repeats.",
        f"- speedup: tokens/s over {base}'s tokens/s on the same prompt and repeat; median over repeats, "
        "then median over prompts.",
        f"- mean accepted: tokens added per target verification ({base}: 1).",
        f"- outputs match: share of prompts whose greedy output equals its reference's ({base}'s, or llama.cpp's "
        "for llama.cpp's own speculation) token for token.",
        "- llama.cpp-spec:TYPE[:N]: llama.cpp's own speculative loop (llama-speculative-simple, greedy) on the "
        "target's GGUF; its time is the tool's own prompt + decode time (model load excluded); its tokens are "
        "its output text re-tokenized.",
        "",
    ]


# -- plots -----------------------------------------------------------------------------


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _plot_methods(results: dict) -> list[str]:
    """Methods shown in the per-suite bars: all but hf; of a big static grid, the best."""
    labels = [m for m in results.get("methods", {}) if m != results.get("baseline", "hf")]
    if len(labels) <= MAX_BARS:
        return labels
    best = (results.get("best_static") or {}).get("method")
    best_peer = (results.get("best_llamacpp_spec") or {}).get("method")
    keep = [m for m in labels if (not m.startswith("static:") or m == best)
            and (not m.startswith("llama.cpp-spec:") or m == best_peer)]
    return keep[:MAX_BARS]


def plot_speedup_by_suite(results: dict, path: Path) -> bool:
    """Grouped bars: median speedup vs hf, one group per suite, one bar per method."""
    suites = results.get("suites", {})
    labels = _plot_methods(results)
    if not suites or not labels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(suites)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(names) * max(1, len(labels)) ** 0.5), 4))
    for i, label in enumerate(labels):
        vals = [suites[n].get(label, {}).get("speedup") for n in names]
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel(f"speedup vs {results.get('baseline', 'hf')} (median over prompts)")
    ax.set_title(f"{results.get('config', {}).get('model', '')} on {results.get('machine', {}).get('cpu_model', '')}", fontsize=9)
    ax.legend(fontsize=8)
    _save_figure(fig, path)
    plt.close(fig)
    return True


def plot_static_grid(results: dict, path: Path) -> bool:
    """Tokens/s against verification size V, one line per (depth, top-k)."""
    methods = results.get("methods", {})
    lines: dict[tuple[int, int], list[tuple[int, dict]]] = {}
    for label, s in methods.items():
        if not label.startswith("static:") or "+" in label:  # adapting variants are not grid points
            continue
        d, k, v = (int(x) for x in label.split(":", 1)[1].split("x"))
        lines.setdefault((d, k), []).append((v, s))
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (d, k), pts in sorted(lines.items()):
        pts.sort(key=lambda p: p[0])
        xs = [v for v, _ in pts]
        ys = [s.get("tokens_per_second") or 0.0 for _, s in pts]
        lo = [max(0.0, y - (s.get("tokens_per_second_min") or y)) for y, (_, s) in zip(ys, pts)]
        hi = [max(0.0, (s.get("tokens_per_second_max") or y) - y) for y, (_, s) in zip(ys, pts)]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"D={d}, K={k}")
    base = methods.get(results.get("baseline", "hf"), {}).get("tokens_per_second")
    if base:
        ax.axhline(base, color="black", linewidth=0.8, linestyle="--", label=results.get("baseline", "hf"))
    ar = methods.get("ar", {}).get("tokens_per_second")
    if ar:
        ax.axhline(ar, color="gray", linewidth=0.8, linestyle=":", label="ar")
    sizes = sorted({v for pts in lines.values() for v, _ in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(v) for v in sizes])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("verification size V (nodes)")
    ax.set_ylabel("tokens/s (median over repeats)")
    ax.set_title("static trees", fontsize=9)
    ax.legend(fontsize=8)
    _save_figure(fig, path)
    plt.close(fig)
    return True


def write_all(results: dict, out_dir: Path) -> dict[str, Path]:
    """results.json, the plots, then report.md (which links the plots)."""
    out_dir = Path(out_dir)
    written = {"results": write_results_json(results, out_dir)}
    plots: dict[str, Path] = {}
    for title, name, fn in (
        ("speedup per suite", SPEEDUP_PNG, plot_speedup_by_suite),
        ("tokens/s against V", GRID_PNG, plot_static_grid),
    ):
        try:
            if fn(results, out_dir / name):
                plots[title] = out_dir / name
        except ImportError:
            log.warning("matplotlib is not installed; skipping %s (pip install matplotlib)", name)
    written.update({str(k): v for k, v in plots.items()})
    path = out_dir / REPORT_MD
    atomic_write_text(path, render_markdown(_clean(results), plots))
    written["report"] = path
    log.info("wrote %s", ", ".join(str(p) for p in written.values()))
    return written
