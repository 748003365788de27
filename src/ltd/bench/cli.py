"""``ltd bench``: the command-line face of :mod:`ltd.bench` (flags in, files out).

All checks that need no model (methods, suites, grid lists) run before the models
load, so a typo costs a second, not a model load.

``--grid`` tunes the static tree on ``alpaca`` by default: general instructions, the
closest of the six suites to ordinary chat traffic and the least like the code/math/
summary suites it is then compared on. The best configuration's alpaca numbers are
in-sample; judge it on the other suites.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import sys

from ltd.bench.methods import grid_methods, grid_peer_methods, parse_methods, with_baseline
from ltd.bench.runner import BenchConfig, GridSpec, run_bench
from ltd.bench.suites import MIXED, SUITES, interleave, load_hub_suite, load_questions, load_suites, parse_suite_list, resolve_data_dir
from ltd.cliargs import add_latency_arg, add_model_args, parse_int_list
from ltd.errors import LtdError

log = logging.getLogger(__name__)

DEFAULT_METHODS = "ar,static:5x8x32"  # after the backend's baseline (hf or llama.cpp)
DEFAULT_GRID_SUITE = "alpaca"
DEFAULT_GRID_DEPTHS = "2,3,4,5,6"
DEFAULT_GRID_SIZES = "4,8,16,32,48"
DEFAULT_GRID_PEER_TYPES = "ngram-simple,ngram-map-k,ngram-mod,draft-simple,draft-eagle3"
DEFAULT_GRID_PEER_LENGTHS = "3,6,10"
EXIT_INTERRUPTED = 130


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark generation methods side by side (speedup vs transformers generate)",
        description=(
            "Run methods interleaved per prompt on SpecBench-style suites and write results.json, "
            "report.md and plots. Speedups are pairwise ratios to the backend's plain decoding: 'hf' "
            "(transformers generate) or, with --backend llamacpp, 'llama.cpp'."
        ),
    )
    add_model_args(p)
    p.add_argument("--assistant", default=None, help="draft model for hf-assisted (default: the drafter when it is a standalone LM)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--suites", default=None, help=f"comma-separated suites from {','.join(SUITES)}, or {MIXED} (all interleaved in a fixed, seeded order) (default: all)")
    src.add_argument("--questions", default=None, help="a question.jsonl file (question_id, category, turns); categories become the breakdown")
    p.add_argument("--data-dir", default=None, help="folder holding <suite>/question.jsonl (default: the copy shipped with ltd)")
    p.add_argument("--from-hub", action="store_true", help="build the suites from their Hugging Face datasets (needs internet and `datasets`)")
    p.add_argument("--interleave", action="store_true",
                   help=f"run the questions interleaved in the fixed, seeded order of {MIXED} (a stream of "
                        "mixed work, e.g. for +online methods), not suite by suite")
    p.add_argument("--multi-turn", action="store_true", help="run every turn (later turns follow hf's replies); default: first turn only (multiturn always runs both)")
    p.add_argument("--methods", default=None, help=f"comma-separated: hf, llama.cpp, ar, static:DxKxV, ltd[:DIR], greedy, suffix-rule, "
                        f"hf-assisted, prompt-lookup, llama.cpp-spec:TYPE[:N] (default: the baseline,{DEFAULT_METHODS}; "
                        "with --grid: the baseline)")
    add_latency_arg(p)
    p.add_argument("--limit", type=int, default=None, help="first N questions of each suite (after --offset)")
    p.add_argument("--offset", type=int, default=0, help="skip the first N questions of each suite (default 0)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each method per prompt; min/median/max are reported (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (outputs are compared with hf)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--out", required=True, help="output directory for results.json, report.md and plots")
    p.add_argument("--grid", action="store_true", help="sweep static depth x size at fixed --topk on --grid-suite and name the best")
    p.add_argument("--grid-suite", default=DEFAULT_GRID_SUITE,
                   help=f"suite name or question.jsonl for --grid (default {DEFAULT_GRID_SUITE}: general instructions; "
                        "its numbers for the chosen configuration are in-sample)")
    p.add_argument("--grid-depths", default=DEFAULT_GRID_DEPTHS, help=f"depths D for --grid (default {DEFAULT_GRID_DEPTHS})")
    p.add_argument("--grid-sizes", default=DEFAULT_GRID_SIZES, help=f"verification sizes V for --grid (default {DEFAULT_GRID_SIZES})")
    p.add_argument("--topk", type=int, default=8, help="branching K of the --grid trees (default 8)")
    p.add_argument("--grid-peers", action="store_true",
                   help="with --grid, also sweep llama.cpp's built-in speculative types x draft lengths "
                        "(llama.cpp-spec:TYPE:N, with llama.cpp-spec:none as their no-draft reference; "
                        "needs ltd peers build llama.cpp) and name the best")
    p.add_argument("--grid-peer-types", default=DEFAULT_GRID_PEER_TYPES,
                   help=f"llama.cpp speculative types for --grid-peers (default {DEFAULT_GRID_PEER_TYPES})")
    p.add_argument("--grid-peer-lengths", default=DEFAULT_GRID_PEER_LENGTHS,
                   help=f"draft lengths N for --grid-peers (default {DEFAULT_GRID_PEER_LENGTHS})")
    p.add_argument("--prompt-lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens of the prompt-lookup peer (default 10)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of repeat 0 (repeat r uses seed + r)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each method")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _questions(args: argparse.Namespace):
    """Questions and a description of their source, from --suites/--questions/--grid."""
    if args.limit is not None and args.limit < 1:
        raise LtdError(f"--limit must be at least 1, got {args.limit}")
    if args.grid:
        if args.suites or args.questions:
            raise LtdError("--grid runs on --grid-suite only; drop --suites/--questions (or run a separate bench)")
        target = args.grid_suite
        if target in SUITES or target == MIXED:
            names = [target]
        elif target.endswith(".jsonl") or Path(target).is_file():
            return load_questions(target, limit=args.limit, offset=args.offset), {"questions_file": str(Path(target).resolve())}
        else:
            raise LtdError(f"--grid-suite {target!r} is neither a suite ({', '.join(SUITES)}) nor a .jsonl file")
    elif args.questions:
        return (load_questions(args.questions, limit=args.limit, offset=args.offset),
                {"questions_file": str(Path(args.questions).resolve()), "offset": args.offset})
    else:
        names = parse_suite_list(args.suites) if args.suites else list(SUITES)
    if args.from_hub:
        if args.offset:
            raise LtdError("--offset reads the shipped suites (or --data-dir); drop it with --from-hub")
        questions = []
        for name in names:
            questions += load_hub_suite(name, limit=args.limit)
        return questions, {"data_source": "huggingface-hub"}
    data_dir = resolve_data_dir(args.data_dir)
    source = {"data_dir": str(data_dir.resolve())}
    if args.offset:
        source["offset"] = args.offset
    return load_suites(names, data_dir, limit=args.limit, offset=args.offset), source


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Validate every flag and build the bench configuration (no model is loaded)."""
    grid = None
    if args.grid:
        depths = parse_int_list(args.grid_depths, "--grid-depths")
        sizes = parse_int_list(args.grid_sizes, "--grid-sizes")
        grid_specs = grid_methods(depths, sizes, args.topk)
        peer_types: list[str] = []
        peer_lengths: list[int] = []
        if args.grid_peers:
            peer_types = [t.strip() for t in args.grid_peer_types.split(",") if t.strip()]
            peer_lengths = parse_int_list(args.grid_peer_lengths, "--grid-peer-lengths")
            grid_specs += grid_peer_methods(peer_types, peer_lengths)
        user = parse_methods(args.methods, args.backend) if args.methods else []
        user_labels = {m.label for m in user}
        methods = with_baseline(user + [g for g in grid_specs if g.label not in user_labels], args.backend)
        grid = GridSpec(args.grid_suite, depths, sizes, args.topk, peer_types, peer_lengths)
    else:
        if args.grid_peers:
            raise LtdError("--grid-peers extends --grid; add --grid")
        methods = parse_methods(args.methods or DEFAULT_METHODS, args.backend)
    if args.prompt_lookup_tokens < 1:
        raise LtdError(f"--prompt-lookup-tokens must be at least 1, got {args.prompt_lookup_tokens}")
    questions, source = _questions(args)
    if args.interleave:
        questions, source = interleave(questions), {**source, "interleaved": True}
    config = BenchConfig(
        model=args.model,
        methods=methods,
        questions=questions,
        drafter=args.drafter,
        assistant=args.assistant,
        repeats=args.repeats,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        multi_turn=args.multi_turn,
        warmup=not args.no_warmup,
        progress=not args.no_progress,
        prompt_lookup_tokens=args.prompt_lookup_tokens,
        grid=grid,
        source={**source, "limit": args.limit},
        backend=args.backend,
        threads=args.threads,
        kernels=args.kernels,
        head_dtype=args.head_dtype,
        latency=args.latency,
    )
    config.validate()
    return config


def run(args: argparse.Namespace) -> int:
    """Run ``ltd bench``; returns the exit code (130 after Ctrl-C, with results written)."""

    from ltd.runtime import apply_threads

    apply_threads(args.threads)
    config = config_from_args(args)
    for line in config.drop_unbuilt_peers():
        print(line, file=sys.stderr)
    out = Path(args.out)
    log.info("bench: %d questions x %d methods x %d repeats -> %s", len(config.questions), len(config.methods), config.repeats, out)
    results = run_bench(config, out_dir=out)
    print(summary_text(results, out))
    return EXIT_INTERRUPTED if results.get("interrupted") else 0


def summary_text(results: dict, out: Path) -> str:
    """A few lines for the terminal; report.md has the full tables."""
    lines = []
    if results.get("interrupted"):
        lines.append("interrupted: partial results written")
    lines.append(f"{'method':<22} {'tokens/s':>9} {'speedup':>8} {'accepted':>9} {'match':>6}")
    for label, s in results.get("methods", {}).items():
        tps = s.get("tokens_per_second")
        sp = s.get("speedup")
        acc = s.get("mean_accepted")
        match = s.get("outputs_match")
        lines.append(
            f"{label:<22} {tps if tps is not None else float('nan'):>9.1f} "
            f"{sp if sp is not None else float('nan'):>7.2f}x "
            f"{acc if acc is not None else float('nan'):>9.2f} "
            f"{'-' if match is None else f'{100 * match:.0f}%':>6}"
        )
    for line in results.get("skipped", []):
        if "not built" not in line:  # unbuilt peers were reported before the run
            lines.append(line)
    best = results.get("best_static")
    if best:
        lines.append(f"best static: {best['method']} ({best['speedup']:.2f}x)" if best.get("speedup") is not None else f"best static: {best['method']}")
    peer = results.get("best_llamacpp_spec")
    if peer and peer.get("speedup") is not None:
        lines.append(f"best llama.cpp built-in: {peer['method']} ({peer['speedup']:.2f}x)")
    lines.append(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return "\n".join(lines)
