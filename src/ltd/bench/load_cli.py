"""``ltd bench-load``: the command-line face of :mod:`ltd.bench.load` (flags in, files out).

Every flag is checked, and the prompts loaded, before the first server starts.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

from ltd.bench.load_config import (
    DEFAULT_CONCURRENCY, DEFAULT_MAX_BATCH, DEFAULT_STATIC_SHAPE, LoadConfig, builtin_configs, parse_configs, parse_shape,
    split_args,
)
from ltd.bench.suites import MIXED, SUITES, parse_suite_list
from ltd.cliargs import parse_int_list
from ltd.errors import LtdError
from ltd.registry import DEFAULT_MODEL

EXIT_INTERRUPTED = 130
EXIT_SERVER_FAILED = 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench-load`` subcommand to an argparse ``subparsers`` object."""
    names = ", ".join(builtin_configs())
    p = subparsers.add_parser(
        "bench-load",
        help="load-test ltd serve: concurrent streaming clients against each server configuration",
        description="Start ltd serve once per configuration (one at a time, on a free loopback port) and measure "
                    "tokens/s, requests/s, p50/p95 latency, time to first token and the server's peak RSS at each "
                    "concurrency level; write results.json and report.md.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the model every server loads (default {DEFAULT_MODEL})")
    p.add_argument("--configs", nargs="+", default=None, metavar="NAME[=ARGS]",
                   help=f"servers to compare: NAME=\"ltd serve arguments\" (e.g. fast=\"--method ar\") or a built-in "
                        f"name ({names}); 'serial' is the reference of the ratios (default: all built-ins)")
    d, k, v = DEFAULT_STATIC_SHAPE
    p.add_argument("--static-shape", default=f"{d}x{k}x{v}", metavar="DxKxV",
                   help=f"tree of the built-in batched-static server (default {d}x{k}x{v}, the best of ltd bench --grid)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"--max-batch of the built-in batched servers (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--server-args", default="", metavar="ARGS",
                   help="ltd serve arguments for every server, before each configuration's own (e.g. \"--backend llamacpp\")")
    p.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                   help="comma-separated client counts, one level each (default 1,2,4,8)")
    p.add_argument("--requests", type=int, default=16, help="requests per level at most (default 16)")
    p.add_argument("--time-limit", type=float, default=120.0, metavar="SECONDS",
                   help="no new request after this many seconds of a level; sent ones finish (default 120)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    p.add_argument("--suites", default=MIXED, help=f"comma-separated suites from {','.join(SUITES)}, or {MIXED} (default)")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each suite (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts' order (default 0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of every server (default: the library's choice)")
    p.add_argument("--startup-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long a server may take to answer /health (default 600)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="client-side timeout of one request (default 600)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed request sent to each server before its levels")
    p.add_argument("--out", required=True, help="output directory for results.json, report.md and the servers' logs")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """Validate every flag (no server starts)."""
    builtins = builtin_configs(parse_shape(args.static_shape), args.max_batch)
    configs = parse_configs(args.configs, builtins) if args.configs is not None else list(builtins.values())
    cfg = LoadConfig(
        configs=configs, model=args.model, concurrency=tuple(parse_int_list(args.concurrency, "--concurrency")),
        requests=args.requests, time_limit=args.time_limit, max_tokens=args.max_tokens,
        suites=tuple(parse_suite_list(args.suites)), limit=args.limit, seed=args.seed, threads=args.threads,
        server_args=split_args(args.server_args, "--server-args"), startup_timeout=args.startup_timeout,
        request_timeout=args.request_timeout, warmup=not args.no_warmup,
    )
    cfg.validate()
    return cfg


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the bench like Ctrl-C does, so the running server is stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    """Run ``ltd bench-load``: 130 after an interrupt, 1 when a server failed, else 0."""
    cfg = config_from_args(args)
    try:
        from ltd.bench.load import run_load
    except ImportError as exc:
        raise LtdError(f"ltd bench-load needs the serve extras ({exc.name} is missing): pip install -e '.[serve]'") from None

    out = Path(args.out)
    with _sigterm_interrupts():
        doc = run_load(cfg, out)
    print(summary_text(doc, out))
    if doc.get("interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_SERVER_FAILED if any(c.get("error") for c in doc["configs"]) else 0


def summary_text(doc: dict, out: Path) -> str:
    """A few lines for the terminal; report.md has the full table."""
    lines = ["interrupted: partial results written"] if doc.get("interrupted") else []
    lines.append(f"{'server':<16} {'clients':>7} {'ok':>5} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7} {'vs serial':>9}")
    for c in doc["configs"]:
        if c.get("error"):
            lines.append(f"{c['name']:<16} failed: {c['error']}")
        for lv in c["levels"]:
            ratio = lv.get("throughput_ratio")
            lines.append(f"{c['name']:<16} {lv['concurrency']:>7} {lv['ok']:>2}/{lv['requests']:<2} "
                         f"{lv['tokens_per_second']:>9.1f} {_s(lv['latency_p50'])} {_s(lv['latency_p95'])} "
                         f"{'-' if ratio is None else f'{ratio:.2f}x':>9}")
    lines.append(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return f"{'-':>7}" if value is None else f"{value:>7.2f}"
