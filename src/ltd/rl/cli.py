"""``ltd profile | record | train-policy | oracle | tune-policy``: the command-line face of :mod:`ltd.rl`.

Flags are checked before any model loads. Prompts for recording come from the benchmark
suites; only ``alpaca`` (the suite ``ltd bench --grid`` already tunes on) is a training
suite, the other five are held out for evaluation and are used only with
``--allow-held-out`` (the manifest records it). Questions judged whole (``multiturn``, also
inside ``mixed``) run every turn, as ``ltd bench`` runs them (:mod:`ltd.rl.prompts`).

Commands import their machinery (torch, gymnasium, stable-baselines3) when they run,
inside their functions: the flags are parsed and checked without them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ltd.cliargs import add_model_args, load_engine, parse_int_list
from ltd.defaults import ONLINE_VARIANTS
from ltd.errors import LtdError

log = logging.getLogger(__name__)

TRAINING_SUITES = ("alpaca",)
DEFAULT_RECORD_SUITE = "alpaca"
DEFAULT_STATIC = "5x32"


# -- shared flags -------------------------------------------------------------------------


def _need_rl(command: str) -> None:
    """One-line error instead of an ImportError when the rl extras are missing."""
    import importlib.util

    missing = [m for m in ("gymnasium", "stable_baselines3") if importlib.util.find_spec(m) is None]
    if missing:
        raise LtdError(f"ltd {command} needs {', '.join(missing)}: pip install 'ltd[rl]'")


def _threads(args) -> None:
    from ltd.runtime import apply_threads

    apply_threads(getattr(args, "threads", None))


def _load_engine(args):
    from ltd.engine import default_drafter_spec

    backend = getattr(args, "backend", "hf")
    spec = args.drafter if args.drafter is not None else default_drafter_spec(args.model, backend)
    if spec == "none":
        raise LtdError(f"model {args.model} has no default drafter; pass --drafter (self, ngram, a small LM or an EAGLE-3 head)")
    engine = load_engine(args, spec)
    return engine, spec


def _online_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--online", default=None, choices=ONLINE_VARIANTS,
                   help="record the drafter as it adapts online (e.g. knn), learning along the prompts in order, "
                        "so policies fit the drafter that serves with --online; a resumed run starts it afresh")


def _prompt_args(p: argparse.ArgumentParser, default_suite: str | None) -> None:
    from ltd.bench.suites import SUITES, TRAIN_OFFSET

    src = p.add_mutually_exclusive_group()
    src.add_argument("--suites", default=default_suite,
                     help=f"comma-separated suites from {','.join(SUITES)} (default {default_suite}; "
                          f"only {','.join(TRAINING_SUITES)} is for training, others need --allow-held-out)")
    src.add_argument("--questions", default=None, help="a question.jsonl file (question_id, category, turns) to use instead")
    p.add_argument("--data-dir", default=None, help="folder holding <suite>/question.jsonl (default: the copy shipped with ltd)")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each suite (after --offset)")
    p.add_argument("--offset", type=int, default=0,
                   help=f"skip the first N questions of each suite; from {TRAIN_OFFSET} on every suite is training data "
                        "(ltd bench judges on the first ones)")
    p.add_argument("--allow-held-out", action="store_true", help="allow the held-out evaluation suites (results are then in-sample)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")


def _questions(args):
    from ltd.bench.suites import TRAIN_OFFSET, load_questions, load_suites, parse_suite_list

    if args.limit is not None and args.limit < 1:
        raise LtdError(f"--limit must be at least 1, got {args.limit}")
    offset = getattr(args, "offset", 0)
    if args.questions:
        return (load_questions(args.questions, limit=args.limit, offset=offset),
                {"questions_file": str(Path(args.questions).resolve()), "offset": offset})
    names = parse_suite_list(args.suites)
    # from TRAIN_OFFSET on, every suite's questions are its training split
    held = [n for n in names if n not in TRAINING_SUITES] if offset < TRAIN_OFFSET else []
    if held and not args.allow_held_out:
        raise LtdError(
            f"suite(s) {', '.join(held)} are held out for evaluation; record on {', '.join(TRAINING_SUITES)}, "
            f"on their training split (--offset {TRAIN_OFFSET}) or pass --allow-held-out (the policies are then "
            "evaluated in-sample on them)"
        )
    return load_suites(names, args.data_dir, limit=args.limit, offset=offset), {"suites": names, "held_out": held, "offset": offset}


# -- ltd profile --------------------------------------------------------------------------


def run_profile(args) -> int:
    from ltd.rl.latency import profile_engine
    from ltd.control.spaces import DEFAULT_SIZES

    _need_rl("profile")
    _threads(args)
    sizes = parse_int_list(args.sizes, "--sizes") if args.sizes else list(DEFAULT_SIZES)
    if min(sizes) < 0:
        raise LtdError("--sizes must be >= 0")
    contexts = parse_int_list(args.contexts, "--contexts")
    if args.topk < 1 or args.max_depth < 1:
        raise LtdError("--topk and --max-depth must be at least 1")
    if not args.out.endswith(".json"):
        raise LtdError(f"--out must name a .json file, got {args.out}")
    if args.store_tokens < 0:
        raise LtdError(f"--store-tokens must be >= 0, got {args.store_tokens}")
    if args.store_tokens and "memory" not in (args.online or "").split("+"):
        raise LtdError("--store-tokens fills the suffix drafter's global store; add --online memory")
    engine, spec = _load_engine(args)
    if args.online:
        engine.enable_online(args.online)
    stored = fill_store(engine, args.store_tokens, args.data_dir) if args.store_tokens else None
    tokens = sorted({1} | {v + 1 for v in sizes})
    policy_sizes = sorted({v for v in sizes if v >= 1}) or [1]
    measured: dict = {}
    lat = profile_engine(engine, out=args.out, drafter_name=spec, topk=args.topk, max_depth=args.max_depth,
                         size=args.size, verify_tokens=tokens, contexts=contexts, repeats=args.repeats,
                         cycles=args.cycles, policy_sizes=policy_sizes, measured=measured)
    print(lat.summary())
    if stored is not None:
        print(f"suffix store: {stored} tokens of the shipped suites' text before the cycles")
    print(f"drafting per cycle: {1e3 * measured['draft_cycle_seconds']:.3f} ms (median) at depth <= {args.max_depth}, k={args.topk}")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


def fill_store(engine, tokens: int, data_dir: str | None = None) -> int:
    """Fill the suffix drafter's global store with ``tokens`` tokens of real text, as a
    server's store is after many requests: every suite's turns (raw, no chat
    template), one stored request each, cycled until ``tokens`` were added (the last one
    cut to fit). Returns the tokens the store then holds (at most its budget)."""
    from ltd.bench.suites import QUESTION_FILE, SUITES, load_suites, resolve_data_dir
    from ltd.online.adapter import suffix_drafter

    store = suffix_drafter(engine.drafter).store
    if store is None:
        raise LtdError("--store-tokens needs the suffix drafter's store; add --online memory")
    if tokens > store.budget:
        raise LtdError(f"--store-tokens {tokens} is more than the store holds ({store.budget} tokens); lower it")
    base = resolve_data_dir(data_dir)
    names = [name for name in SUITES if (base / name / QUESTION_FILE).is_file()]
    if not names:
        raise LtdError(f"--data-dir {base} holds no suite (<suite>/{QUESTION_FILE}); drop it to use the shipped suites")
    texts = [turn for q in load_suites(names, base) for turn in q.turns if turn.strip()]
    encoded: dict[int, list[int]] = {}
    added = turns = 0
    while tokens - added >= 3:  # a stored request is a separator and at least two tokens
        i = turns % len(texts)
        turns += 1
        if i not in encoded:
            encoded[i] = engine.encode(texts[i], chat=False)
        seq = encoded[i][: tokens - added - 1]
        if len(seq) >= 2:
            store.add(seq)
            added += len(seq) + 1
        elif turns > len(texts) and not added:
            raise LtdError("the suites' texts are too short to fill the store; check --data-dir")
    log.info("suffix store: %d tokens (%d requests) from the suites' text", len(store), len(store.lengths))
    return len(store)


# -- ltd record ---------------------------------------------------------------------------


def run_record(args) -> int:
    from ltd.rl.prompts import question_prompts
    from ltd.rl.traces import record

    _threads(args)
    for name in ("max_depth", "topk", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise LtdError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_size is not None and args.max_size < 1:
        raise LtdError("--max-size must be at least 1")
    questions, source = _questions(args)
    engine, spec = _load_engine(args)
    keys, prompts = question_prompts(engine, questions, chat=not args.raw)
    meta = {"model": args.model, "drafter": spec, "backend": getattr(args, "backend", "hf"), "chat": not args.raw, **source}
    if args.online:  # the drafter learns along the prompts, in order, as it would while serving
        engine.enable_online(args.online)
        meta["online"] = args.online
    path = record(engine, prompts, max_depth=args.max_depth, topk=args.topk, max_new_tokens=args.max_new_tokens,
                  out_dir=args.out, max_size=args.max_size, keys=keys, meta=meta, progress=not args.no_progress)
    man = json.loads(Path(path).read_text())
    positions = sum(s["positions"] for s in man["sequences"])
    print(f"{len(man['sequences'])} sequences, {positions} decision points in {args.out}")
    return 0


# -- ltd train-policy ---------------------------------------------------------------------


def run_train(args) -> int:
    from ltd.rl.latency import LatencyModel
    from ltd.control.spaces import DEFAULT_SIZES
    from ltd.rl.train import PolicyTrainConfig, eval_subset, replay_source_factory, train_policies
    from ltd.rl.traces import TraceSet

    _need_rl("train-policy")
    _threads(args)
    cfg = PolicyTrainConfig(
        stage=args.stage, env=args.env, iterations=args.iterations, rounds=args.rounds, n_steps=args.n_steps,
        batch_size=args.batch_size, n_epochs=args.epochs, learning_rate=args.lr, seed=args.seed,
        sizes=tuple(parse_int_list(args.sizes, "--sizes")) if args.sizes else DEFAULT_SIZES,
        fixed_depth=args.fixed_depth, fixed_size=args.fixed_size, min_depth=args.min_depth, reward=args.reward, ent_coef=args.ent_coef, checkpoint_every=args.checkpoint_every,
        eval_sequences=args.eval_sequences, warm_start=args.warm_start, warm_steps=args.warm_steps,
    )
    cfg.validate()
    latency = LatencyModel.load(args.latency)
    traces = TraceSet.load(args.traces) if args.traces else None
    inputs = {"latency": str(Path(args.latency).resolve())}
    if args.env == "replay":
        if traces is None:
            raise LtdError("--env replay needs --traces DIR (record them with ltd record)")
        family = None
        if args.cost_variants or args.cost_profiles:
            from ltd.rl.latency import cost_family

            paths = [p.strip() for p in args.cost_profiles.split(",") if p.strip()]
            others = [LatencyModel.load(p) for p in paths]
            family = cost_family(latency, args.cost_variants, others, seed=args.seed)
            inputs["cost_family"] = {"variants": args.cost_variants, "profiles": [str(Path(p).resolve()) for p in paths]}
            print(f"training over {len(family)} cost tables (this machine's, {len(others)} other profiles, "
                  f"{args.cost_variants} variants)")
        make_source = replay_source_factory(traces, latency, family, seed=args.seed)
        inputs["traces"] = str(Path(args.traces).resolve())
    else:
        from ltd.rl.prompts import question_prompts, resolve_prompts
        from ltd.rl.sources import LiveSource

        questions, source = _questions(args)
        engine, spec = _load_engine(args)
        keys, turns = question_prompts(engine, questions, chat=not args.raw)
        prompts = resolve_prompts(engine, keys, turns, args.max_new_tokens)
        topk = traces.topk if traces is not None else args.topk
        max_depth = traces.max_depth if traces is not None else args.max_depth
        live = LiveSource(engine.backend, engine.drafter, prompts, latency, topk=topk, max_depth=max_depth,
                          max_new_tokens=args.max_new_tokens, eos_token_ids=engine.target.eos_token_ids)
        make_source = lambda: live  # noqa: E731 - one set of models, phases run one after another
        inputs.update({"model": args.model, "drafter": spec, **source})
    result = train_policies(cfg, args.out, latency, make_source,
                            eval_traces=eval_subset(traces, cfg.eval_sequences) if traces is not None else None,
                            inputs=inputs, resume=args.resume, progress=args.progress)
    for kind, path in (("depth", result.depth_policy), ("size", result.size_policy)):
        if path is not None:
            print(f"{kind} policy: {path}")
    if result.evaluation:
        print(format_report(result.evaluation))
    print(f"TensorBoard logs: {Path(args.out) / 'tb'}")
    return 0


# -- ltd oracle ---------------------------------------------------------------------------


def _parse_static(text: str, topk: int) -> dict:
    from ltd.control import StaticController

    out = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise LtdError(f"--static entries look like DEPTHxSIZE (e.g. 5x32), got {item!r}")
        d, v = int(parts[0]), int(parts[1])
        out[f"static:{d}x{topk}x{v}"] = StaticController(depth=d, topk=topk, size=v)
    return out


def _add_live(args, traces, latency, controllers: dict, report: dict) -> dict:
    """Re-run ar and every controller with the real models on the traces' prompts."""
    from ltd.control import StaticController
    from ltd.rl.oracle import add_live
    from ltd.rl.sources import LiveSource, run_controller

    man = traces.manifest
    args.model = args.model or man.get("model")
    if not args.model:
        raise LtdError("the traces do not name their model; pass --model")
    if args.drafter is None:
        args.drafter = man.get("drafter")
    args.backend = man.get("backend", "hf")  # re-run on the backend that recorded the traces
    _threads(args)
    engine, _ = _load_engine(args)
    prompts = [s.prompt.tolist() for s in traces.sequences if s.num_positions]
    max_new = int(man.get("max_new_tokens") or max(int(s.output.size) for s in traces.sequences))
    source = LiveSource(engine.backend, engine.drafter, prompts, latency, topk=traces.topk, max_depth=traces.max_depth,
                        max_new_tokens=max_new, eos_token_ids=engine.target.eos_token_ids)
    run_controller(source, StaticController(depth=1, topk=traces.topk, size=1), 0, max_cycles=8)  # warm-up
    return add_live(report, source, controllers)


def format_report(report: dict) -> str:
    lines = [f"CPU: {report['cpu_model']}; {report['sequences']} sequences, {report['positions']} positions (replay)",
             f"{'method':<22} {'tokens/s':>9} {'vs ar':>7} {'of oracle':>10} {'tokens/cycle':>13}"]
    live = report.get("live", False)
    if live:
        lines[1] += f" {'live tok/s':>11} {'live vs ar':>11} {'live/replay':>12}"
    for r in report["results"]:
        line = (f"{r['name']:<22} {r['tokens_per_second']:>9.1f} {r['speedup_vs_ar']:>6.2f}x "
                f"{100 * r['fraction_of_oracle']:>9.1f}% {r['tokens_per_cycle']:>13.2f}")
        if live and "live_tokens_per_second" in r:
            line += f" {r['live_tokens_per_second']:>11.1f} {r.get('live_speedup_vs_ar', 0):>10.2f}x {r['live_over_replay']:>12.3f}"
        lines.append(line)
    return "\n".join(lines)


RULES = ("greedy", "suffix-rule")


def _rule_controllers(names: str, traces, latency) -> dict:
    """The rule baselines of ``--rules``, as factories (both keep per-sequence state)."""
    from ltd.control.suffix_rule import SuffixRuleController
    from ltd.control.throughput import ThroughputController

    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in RULES]
    if unknown:
        raise LtdError(f"unknown --rules {', '.join(unknown)}; choose from {', '.join(RULES)}")
    cap = traces.max_size or 10**9
    rules = {}
    if "greedy" in wanted:
        # the greedy controller never verifies more than the traces kept
        rules["greedy"] = lambda: _CappedSize(ThroughputController(latency, topk=traces.topk, max_depth=traces.max_depth), cap)
    if "suffix-rule" in wanted:
        rules["suffix-rule"] = lambda: _CappedSize(SuffixRuleController(topk=traces.topk, max_depth=traces.max_depth), cap)
    return rules


class _CappedSize:
    """A controller whose verification size is capped at the traces' recorded size."""

    def __init__(self, inner, cap: int) -> None:
        self.inner, self.cap = inner, cap

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def choose_size(self, state) -> int:
        return min(self.inner.choose_size(state), self.cap)


def run_oracle(args) -> int:
    from ltd.control import StaticController
    from ltd.control.learned import HeuristicController, LTDController
    from ltd.fileio import atomic_write_json
    from ltd.rl.latency import LatencyModel
    from ltd.rl.oracle import compare
    from ltd.control.spaces import sizes_up_to
    from ltd.rl.traces import TraceSet

    latency = LatencyModel.load(args.latency)
    traces = TraceSet.load(args.traces, limit=args.limit)
    sizes = sizes_up_to(traces.max_size) if not args.sizes else tuple(parse_int_list(args.sizes, "--sizes"))
    if traces.max_size is not None and max(sizes) > traces.max_size:
        raise LtdError(f"--sizes exceed the traces' --max-size {traces.max_size}")
    cap = traces.max_size or 10**9
    static = args.static
    if static == DEFAULT_STATIC:  # fit the default to the traces
        static = f"{min(5, traces.max_depth)}x{min(32, cap)}"
    controllers = _parse_static(static, traces.topk) if static else {}
    for name, c in controllers.items():
        if c.size > cap:
            raise LtdError(f"{name} verifies more nodes than the traces recorded (--max-size {cap})")
        if c.depth > traces.max_depth:
            raise LtdError(f"{name} drafts deeper than the traces (--max-depth {traces.max_depth})")
    if not args.no_heuristic:
        d0 = min(5, traces.max_depth)
        controllers["heuristic"] = lambda: HeuristicController(depth=d0, topk=traces.topk, size=min(32, cap),
                                                               max_depth=traces.max_depth)
    controllers.update(_rule_controllers(args.rules, traces, latency))
    depth_dir, size_dir = args.depth_policy, args.size_policy
    if args.policies:
        root = Path(args.policies)
        depth_dir = depth_dir or (root / "depth" if (root / "depth" / "policy.json").is_file() else None)
        size_dir = size_dir or (root / "size" if (root / "size" / "policy.json").is_file() else None)
        if depth_dir is None and size_dir is None:
            raise LtdError(f"{root} holds no depth/ or size/ policy; pass the output directory of ltd train-policy")
    if depth_dir or size_dir:
        _need_rl("oracle --policies")
        from ltd.control.policy import load_policy

        dp = load_policy(depth_dir, kind="depth") if depth_dir else None
        sp = load_policy(size_dir, kind="size") if size_dir else None
        # a factory: the controller keeps a per-sequence history
        controllers["ltd"] = lambda: LTDController.from_policies(dp, sp, depth=min(5, traces.max_depth), size=min(32, cap),
                                                                 topk=traces.topk, costs=latency)
    if not args.sizes:
        # The oracle is the limit for the controllers beside it only if it may choose every
        # size they can: add the static trees' sizes and the size policy's set.
        extra = {c.size for c in controllers.values() if isinstance(c, StaticController)}
        if size_dir:
            extra |= set(sp.spec.sizes)
        sizes = tuple(sorted(set(sizes) | {v for v in extra if v <= cap}))
    report = compare(traces, latency, controllers, sizes)
    report["oracle_sizes"] = [int(v) for v in sizes]
    if args.live:
        report = _add_live(args, traces, latency, controllers, report)
    if args.out:
        atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# -- ltd tune-policy ----------------------------------------------------------------------


def _subcommand(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with this module's own parsers, so a composed step gets every default
    its command has (one place for them)."""
    parser = argparse.ArgumentParser(prog="ltd")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _model_argv(args) -> list[str]:
    """The shared model flags of ``args`` as command-line arguments."""
    argv = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--backend", args.backend,
            "--kernels", args.kernels, "--head-dtype", args.head_dtype]
    if args.drafter is not None:
        argv += ["--drafter", args.drafter]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv


def run_tune(args) -> int:
    """profile -> record -> train-policy into one directory: policies fitted to this machine.

    Why: the best tree depends on what verification costs here, and that differs between
    machines (two 2-core AMD EPYC hosts of ours price V = 3 at 1.24x the cost of V = 1
    with AVX2 only and at 1.04x with AVX-512). Shipped policies carry the costs of the
    machine that trained them. Each step is skipped or resumed when its output is already
    in ``--out``, so an interrupted run continues where it stopped.
    """
    from ltd.rl.latency import LatencyModel

    _need_rl("tune-policy")
    sizes = parse_int_list(args.sizes, "--sizes")
    if min(sizes) < 0:
        raise LtdError("--sizes must be >= 0")
    if max(sizes) > args.max_size:
        raise LtdError(f"--sizes go up to {max(sizes)} but --max-size is {args.max_size}; raise --max-size or drop the larger sizes")
    for name in ("limit", "max_depth", "topk", "max_new_tokens", "iterations"):
        if getattr(args, name) < 1:
            raise LtdError(f"--{name.replace('_', '-')} must be at least 1")
    out = Path(args.out)
    latency, traces, policy = out / "latency.json", out / "traces", out / "policy"
    model = _model_argv(args)
    if latency.is_file():
        known = LatencyModel.load(latency)
        if known.draft_topk != args.topk:
            raise LtdError(f"{latency} was profiled with top-k {known.draft_topk}, not {args.topk}; delete it or choose another --out")
        print(f"[1/3] reusing the latency profile {latency}")
    else:
        print(f"[1/3] profiling this machine -> {latency}")
        out.mkdir(parents=True, exist_ok=True)
        run_profile(_subcommand(["profile", *model, "--out", str(latency), "--topk", str(args.topk),
                                 "--max-depth", str(args.max_depth), "--size", str(max(1, args.fixed_size)),
                                 "--sizes", args.sizes, "--contexts", args.contexts, "--repeats", str(args.repeats),
                                 "--cycles", str(args.cycles)]))
    print(f"[2/3] recording draft trees -> {traces}")
    prompts = ["--questions", args.questions] if args.questions else ["--suites", args.suites]
    if args.data_dir:
        prompts += ["--data-dir", args.data_dir]
    prompts += ["--allow-held-out"] * args.allow_held_out + ["--raw"] * args.raw + ["--offset", str(args.offset)]
    run_record(_subcommand(["record", *model, *prompts, "--limit", str(args.limit), "--max-depth", str(args.max_depth),
                            "--topk", str(args.topk), "--max-size", str(args.max_size),
                            "--max-new-tokens", str(args.max_new_tokens), "--out", str(traces)]
                           + ["--online", args.online] * bool(args.online) + ["--no-progress"] * args.no_progress))
    print(f"[3/3] training the depth and size policies -> {policy}")
    run_train(_subcommand(["train-policy", "--env", "replay", "--stage", "both", "--traces", str(traces),
                           "--latency", str(latency), "--sizes", args.sizes, "--min-depth", "1",
                           "--fixed-depth", str(args.fixed_depth), "--fixed-size", str(args.fixed_size),
                           "--iterations", str(args.iterations), "--n-steps", str(args.n_steps),
                           "--batch-size", str(min(128, args.n_steps)), "--reward", "gain",
                           "--warm-start", "expected-value", "--threads", str(args.threads or 1),
                           "--out", str(policy), "--resume"]))
    print(f"policies fitted to this machine: {policy}\nuse them with: ltd generate --method ltd --policy {policy} "
          f"(also ltd bench and ltd serve)")
    return 0


# -- parsers ------------------------------------------------------------------------------


def _add_profile_parser(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure draft, verify and overhead costs on this machine (latency model JSON + PNG)")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output FILE.json (a PNG is written next to it)")
    p.add_argument("--topk", type=int, default=8, help="branching k of the draft steps (default 8)")
    p.add_argument("--max-depth", type=int, default=8, help="draft steps to measure (default 8)")
    p.add_argument("--size", type=int, default=32, help="verification size of the measured cycles (default 32)")
    p.add_argument("--sizes", default=None, help="verification sizes V to measure (default 1,2,4,8,16,24,32,48,64; 0 is always added)")
    p.add_argument("--contexts", default="128,512,1024", help="committed context lengths (default 128,512,1024)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds over the verify grid; medians are kept (default 15)")
    p.add_argument("--cycles", type=int, default=20, help="real cycles timed for draft steps and overhead (default 20)")
    p.add_argument("--online", default=None, choices=ONLINE_VARIANTS,
                   help="profile the drafter as it serves with --online (memory: the suffix drafter's global store)")
    p.add_argument("--store-tokens", type=int, default=0,
                   help="with --online memory: fill the store with N tokens of the shipped suites' text first "
                        "(the drafting cost of a full store; default 0)")
    p.add_argument("--data-dir", default=None, help="folder holding <suite>/question.jsonl for --store-tokens (default: the shipped copy)")
    p.set_defaults(func=run_profile)


def _add_record_parser(subparsers) -> None:
    p = subparsers.add_parser("record", help="record max-depth draft trees along greedy outputs (replay traces)")
    add_model_args(p)
    _prompt_args(p, DEFAULT_RECORD_SUITE)
    p.add_argument("--max-depth", type=int, default=8, help="maximum draft depth D (default 8)")
    p.add_argument("--topk", type=int, default=8, help="branching k (default 8)")
    p.add_argument("--max-size", type=int, default=64, help="largest verification size V to support (prunes the stored trees; default 64)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", required=True, help="trace directory (resumable: finished prompts are skipped)")
    _online_arg(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_record)


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train-policy", help="train LTD depth/size policies with PPO (replay or live)")
    p.add_argument("--env", default="replay", choices=["replay", "live"])
    p.add_argument("--stage", default="both", choices=["size", "depth", "both"])
    p.add_argument("--iterations", type=int, default=20, help="PPO iterations (rollout + update) per phase (default 20)")
    p.add_argument("--rounds", type=int, default=1, help="co-adaptive rounds for --stage both: size, (depth, size) x N (default 1)")
    p.add_argument("--n-steps", type=int, default=512, help="environment steps per iteration (default 512)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default=None, help="size-policy actions V (default 0,1,2,4,8,16,24,32,48,64, capped by the traces; 0 = verify no drafted node)")
    p.add_argument("--fixed-depth", type=int, default=5, help="depth of the fixed rule while training size first (default 5)")
    p.add_argument("--fixed-size", type=int, default=32, help="size of the fixed rule while training depth alone (default 32)")
    p.add_argument("--min-depth", type=int, default=1, choices=[0, 1],
                   help="1: every cycle drafts at least one step (the paper); 0: the depth policy may also decode plainly")
    p.add_argument("--reward", default="rate", choices=["rate", "gain"],
                   help="rate: the cycle's speedup over plain decoding; gain: tokens minus plain-decoding tokens in the same time")
    p.add_argument("--ent-coef", type=float, default=0.01, help="PPO entropy bonus: more keeps exploring drafting choices longer (default 0.01)")
    p.add_argument("--warm-start", default="none", choices=["none", "expected-value"],
                   help="before PPO, clone a rule into each new phase's policy: expected-value = the V with the most expected "
                        "tokens per modelled second for size, the fixed depth for depth (ltd.rl.imitation; default none)")
    p.add_argument("--warm-steps", type=int, default=8192, help="decisions collected from the rule to clone (default 8192)")
    p.add_argument("--checkpoint-every", type=int, default=5, help="iterations between checkpoints (default 5)")
    p.add_argument("--eval-sequences", type=int, default=32, help="recorded sequences used to evaluate each phase in replay")
    p.add_argument("--traces", default=None, help="trace directory (needed for --env replay; evaluation for live)")
    p.add_argument("--latency", required=True, help="latency profile JSON from ltd profile")
    p.add_argument("--cost-variants", type=int, default=0,
                   help="replay: also time sequences by N variants of --latency (verification's marginal cost x1/4..4, "
                        "draft steps x1/3..3), so the policies learn to read the cost table they observe (default 0)")
    p.add_argument("--cost-profiles", default="",
                   help="replay: comma-separated profiles of other machines (ltd profile files) to train over as well")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--progress", action="store_true", help="show SB3's progress bar")
    live = p.add_argument_group("live environment")
    add_model_args(live)
    _prompt_args(live, DEFAULT_RECORD_SUITE)
    live.add_argument("--topk", type=int, default=8, help="branching k when no --traces fix it (default 8)")
    live.add_argument("--max-depth", type=int, default=8, help="maximum depth when no --traces fix it (default 8)")
    live.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=run_train)


def _add_oracle_parser(subparsers) -> None:
    p = subparsers.add_parser("oracle", help="hindsight-optimal throughput on traces, and controllers as a fraction of it")
    p.add_argument("--traces", required=True)
    p.add_argument("--latency", required=True)
    p.add_argument("--policies", default=None, help="output directory of ltd train-policy (uses its depth/ and size/)")
    p.add_argument("--depth-policy", default=None)
    p.add_argument("--size-policy", default=None)
    p.add_argument("--static", default=DEFAULT_STATIC, help="static DEPTHxSIZE configurations to compare (default 5x32)")
    p.add_argument("--no-heuristic", action="store_true", help="leave out the +2/-1 depth heuristic")
    p.add_argument("--rules", default="", help="rules to compare beside the static trees, comma-separated: greedy (the "
                   "expected-throughput stop on the calibrated scores, with the --latency costs), suffix-rule "
                   "(SuffixDecoding's: draft every level the drafter gives, verify all)")
    p.add_argument("--sizes", default=None, help="sizes V the oracle may choose (default: 0,1,2,4,8,16,... up to the traces' max size, plus every size the compared static trees and size policy can choose)")
    p.add_argument("--limit", type=int, default=None, help="first N recorded sequences")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="also write the report as JSON")
    live = p.add_argument_group("live check (--live: run ar and each controller with the real models on the traces' prompts)")
    live.add_argument("--live", action="store_true", help="measure live tokens/s beside replay's prediction")
    add_model_args(live, model_default=None, default_help="default: the one that recorded the traces")
    p.set_defaults(func=run_oracle)


def _add_tune_parser(subparsers) -> None:
    p = subparsers.add_parser("tune-policy", help="profile, record and train LTD policies for this machine in one command",
                              description="Profile this machine, record draft trees on the first --limit (default 10) prompts of "
                                          "alpaca and train the depth and size policies, all into --out; rerunning resumes.")
    add_model_args(p)
    _prompt_args(p, DEFAULT_RECORD_SUITE)
    p.set_defaults(limit=10)
    p.add_argument("--out", required=True, help="directory for latency.json, traces/ and policy/ (rerun to resume)")
    p.add_argument("--max-depth", type=int, default=6, help="maximum draft depth D (default 6)")
    p.add_argument("--topk", type=int, default=8, help="branching k (default 8)")
    p.add_argument("--max-size", type=int, default=16, help="largest verification size recorded (default 16)")
    p.add_argument("--sizes", default="0,1,2,3,4,5,6,8", help="size-policy actions V (default 0,1,2,3,4,5,6,8)")
    p.add_argument("--fixed-depth", type=int, default=3, help="depth of the rule the size policy first trains with (default 3)")
    p.add_argument("--fixed-size", type=int, default=3, help="size of the rule the depth policy first trains with (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens recorded per prompt (default 96)")
    p.add_argument("--iterations", type=int, default=100, help="PPO iterations per phase (default 100)")
    p.add_argument("--n-steps", type=int, default=512, help="environment steps per PPO iteration (default 512)")
    p.add_argument("--contexts", default="128,512", help="context lengths the profile measures (default 128,512)")
    p.add_argument("--repeats", type=int, default=15, help="profile rounds over the verify grid (default 15)")
    p.add_argument("--cycles", type=int, default=20, help="real cycles the profile times (default 20)")
    _online_arg(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_tune)


def add_parsers(subparsers) -> None:
    """Add ``profile``, ``record``, ``train-policy``, ``oracle`` and ``tune-policy`` to an argparse subparsers object."""
    _add_profile_parser(subparsers)
    _add_record_parser(subparsers)
    _add_train_parser(subparsers)
    _add_oracle_parser(subparsers)
    _add_tune_parser(subparsers)
