"""Command-line interface: thin commands over the library. Only this module prints.

Each command imports its machinery (torch, transformers, the rl and serve extras) when it
runs, inside its function: ``ltd --help`` and flag errors must not wait for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ltd.cliargs import add_latency_arg, add_model_args, add_online_args, load_engine
from ltd.errors import LtdError

DEMO_PROMPT = "Explain in a few sentences why the sky is blue."


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    from ltd.engine import GenerateConfig

    d = GenerateConfig()
    p.add_argument("--depth", type=int, default=d.depth, help=f"draft depth D (default {d.depth})")
    p.add_argument("--topk", type=int, default=d.topk, help=f"branching K per draft step (default {d.topk})")
    p.add_argument("--size", type=int, default=d.size, help=f"verified nodes V (default {d.size})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)


def _add_online_args(p: argparse.ArgumentParser) -> None:
    add_online_args(p, "decoding", "directory to restore/save what online adaptation learned")


def cmd_online(args) -> int:
    from ltd.online import reset_state

    if reset_state(args.directory):
        print(f"removed online state {args.directory}")
    else:
        print(f"no online state in {args.directory}")
    return 0


def _config_from(args, method: str):
    from ltd.engine import GenerateConfig

    cfg = GenerateConfig(
        method=method,
        max_new_tokens=args.max_new_tokens,
        depth=args.depth,
        topk=args.topk,
        size=args.size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        policy=getattr(args, "policy", None),
    )
    cfg.validate()
    return cfg


def _setup_threads(args) -> None:
    from ltd.runtime import apply_threads

    apply_threads(getattr(args, "threads", None))


def cmd_generate(args) -> int:
    from ltd.engine import method_of

    # speculation off: our plain loop (method ar), no drafter loaded; the output is the same
    method = "ar" if args.speculation == "off" else args.method
    cfg = _config_from(args, method)
    drafter = args.drafter
    if not method_of(method).uses_drafter and drafter is None:
        drafter = "none"  # the method never drafts: load none
    engine = load_engine(args, drafter)
    engine.latency_file = args.latency
    engine.prepare(cfg)  # a cost profile or a policy load is one-time work: keep it out of the timing
    if args.online:
        engine.enable_online(args.online, state_dir=args.online_state)
    prompt = engine.encode(args.prompt, chat=not args.raw)
    res = engine.generate(prompt, cfg)
    if args.online and args.online_state:
        engine.online.save_state(args.online_state)
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        print(res.text)
        print(
            f"\n[{res.method}] {res.new_tokens} tokens in {res.seconds:.2f} s = {res.tokens_per_second:.1f} tokens/s, "
            f"{res.cycles} cycles, {res.mean_accepted:.2f} tokens/cycle",
            file=sys.stderr,
        )
    return 0


def cmd_demo(args) -> int:
    """The README's main job: plain decoding against speculative decoding on two prompts.

    One is prose, where drafts are weak; the other (the first ``edit`` question of the
    bench suites) edits code that is in the prompt, where a suffix drafter copies many
    tokens per cycle. Every method runs on both, and every output must equal plain greedy
    decoding."""
    from ltd.bench.suites import load_suites
    from ltd.machine import cpu_model
    from ltd.engine import GenerateConfig, default_drafter_spec, default_policy_dir

    spec = args.drafter or default_drafter_spec(args.model, args.backend)
    if spec == "none":
        spec = "self"
    engine = load_engine(args, spec)
    copy_spec = _copy_drafter_spec(spec)
    copy_drafter = engine.load_drafter(copy_spec, device=args.device, dtype=args.dtype, threads=args.threads,
                                       kernels=args.kernels, head_dtype=args.head_dtype)
    edit = load_suites(["edit"], limit=1)[0]
    prompts = [("prose", args.prompt), (f"copy ({edit.key})", edit.turns[0])]
    ref = engine.reference_method
    print(f"model {args.model}, drafter {spec}, device {args.device}, CPU {cpu_model()}")
    print(f"suffix rows: drafter {copy_spec}")
    # ar: our own plain loop with the backend's kernels, so the gap between hf and ar is
    # the kernels' share and the gap between ar and static/ltd is speculation's own
    runs = [(m, GenerateConfig(method=m, max_new_tokens=args.max_new_tokens, depth=args.depth, topk=args.topk, size=args.size), None)
            for m in [ref, "ar", "static"]]
    if (default_policy_dir(args.model, args.backend) / "depth").is_dir():
        # the shipped learned policies decide depth and size per cycle
        runs.append(("ltd", GenerateConfig(method="ltd", max_new_tokens=args.max_new_tokens), None))
    d, k, v = DEMO_COPY_SHAPE  # deep, narrow trees: a suffix match is right many tokens in a row
    runs.append((f"static:{d}x{k}x{v} suffix",
                 GenerateConfig(method="static", max_new_tokens=args.max_new_tokens, depth=d, topk=k, size=v), copy_drafter))
    # warm-up so that one-time costs do not count against the first method
    engine.generate(engine.encode(args.prompt), GenerateConfig(method="ar", max_new_tokens=4))
    same = True
    for name, text in prompts:
        prompt = engine.encode(text)
        results = [(label, engine.generate(prompt, cfg, drafter=drafter)) for label, cfg, drafter in runs]
        if name == "prose":
            print(f"\nprompt: {text}\n\n{results[-2][1].text}")
        same = _print_demo_table(f"{name}: {_first_line(text)}", results) and same
    print(f"\noutputs of every method identical to plain greedy output ({ref}): {'yes' if same else 'NO'}")
    return 0 if same else 1


DEMO_COPY_SHAPE = (32, 1, 32)  # depth x top-k x size of the copy drafter's static tree


def _copy_drafter_spec(spec: str) -> str:
    """The demo's drafter for copies: the suffix drafter, merged with ``spec``'s model drafter."""
    from ltd.drafting.hybrid import MODEL_FREE_KINDS, split_hybrid_spec

    if spec.startswith("hybrid:"):
        return f"hybrid:suffix+{split_hybrid_spec(spec)[1]}"
    if spec.partition(":")[0] in MODEL_FREE_KINDS:
        return "suffix"
    return f"hybrid:suffix+{spec}"


def _first_line(text: str, width: int = 60) -> str:
    line = text.strip().splitlines()[0]
    return line if len(line) <= width else line[: width - 3] + "..."


def _print_demo_table(title: str, results: list) -> bool:
    """One prompt's methods against the first (plain decoding); returns whether all outputs equal it."""
    base = results[0][1]
    width = max(len(label) for label, _ in results)
    print(f"\n{title}")
    print(f"  {'method':<{width}}  tokens/s  speedup  tokens/cycle  output")
    same = True
    for i, (label, r) in enumerate(results):
        speed = r.tokens_per_second / base.tokens_per_second if base.tokens_per_second else 0.0
        equal = r.tokens == base.tokens
        same = same and equal
        verdict = "reference" if i == 0 else ("same" if equal else "DIFFERENT")
        print(f"  {label:<{width}}  {r.tokens_per_second:8.1f}  {speed:6.2f}x  {r.mean_accepted:12.2f}  {verdict}")
    return same


def cmd_models(args) -> int:
    from ltd.models import cache_root, converted_dir, registry_gguf
    from ltd.registry import REGISTRY

    if args.action == "list":
        for name, entry in REGISTRY.items():
            conv = converted_dir(entry)
            status = "ready" if (conv / "config.json").is_file() else "not converted"
            print(f"{name:22} {entry.description}  [{status}]")
        print(f"cache: {cache_root()}")
        return 0
    if not args.name:
        raise LtdError("ltd models fetch needs a model name, e.g. ltd models fetch qwen2.5-coder-1.5b")
    if args.name not in REGISTRY:
        raise LtdError(f"unknown model {args.name!r}; known: {', '.join(REGISTRY)}")
    from ltd.models import resolve

    path = registry_gguf(REGISTRY[args.name], fetch=True)
    print(f"GGUF: {path}")
    where, _ = resolve(args.name, fetch=True)
    print(f"converted: {where}")
    return 0


def cmd_train_drafter(args) -> int:
    from ltd.train.pipeline import train_drafter
    from ltd.train.trainer import TrainConfig

    _setup_threads(args)
    cfg = TrainConfig(
        draft_vocab=args.draft_vocab,
        unroll=args.unroll,
        epochs=args.epochs,
        lr=args.lr,
        batch_tokens=args.batch_tokens,
        seed=args.seed,
        max_seq_len=args.max_seq_len,
        eval_every=args.eval_every,
        checkpoint_every=args.eval_every,
    )
    if cfg.draft_vocab < 16:
        raise LtdError(f"--draft-vocab must be at least 16, got {cfg.draft_vocab}")
    if cfg.unroll < 1:
        raise LtdError(f"--unroll must be >= 1, got {cfg.unroll}")
    out = Path(args.out)
    feature_dir = Path(args.features) if args.features else None
    init = Path(args.init) if args.init else None
    train_drafter(
        args.target, args.data, out, args.max_tokens, cfg, resume=args.resume, device=args.device,
        feature_dir=feature_dir, init_from=init,
    )
    print(f"head written to {out / 'head'}")
    return 0


def cmd_regenerate(args) -> int:
    from ltd.models import load_model
    from ltd.train.regenerate import regenerate

    _setup_threads(args)
    model = load_model(args.target, device=args.device, dtype=args.dtype)
    n = regenerate(
        model.model, model.tokenizer, args.data, Path(args.out), args.max_prompts,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
    )
    print(f"{n} conversations in {args.out}; train on them with: ltd train-drafter --data {args.out}")
    return 0


def cmd_export_drafter(args) -> int:
    from ltd.drafting.export import export_drafter

    _setup_threads(args)
    res = export_drafter(args.drafter, args.model, args.out, fmt=args.format, target_dir=args.target_dir, dtype=args.dtype)
    print(f"EAGLE-3 head ({res.draft_vocab_size} draft tokens over {res.vocab_size}) written to {res.head_dir}")
    print(f"target config and tokenizer in {res.target_dir}")
    print(f"convert to GGUF with llama.cpp: {res.convert_command()}")
    return 0


def cmd_peers(args) -> int:
    from ltd.peers.llamacpp_build import build_llamacpp, find_build, peer_dir

    if args.peer != "llama.cpp":
        raise LtdError(f"unknown peer {args.peer!r}; the buildable peer is llama.cpp")
    if args.action == "status":
        b = find_build()
        if b is None:
            print(f"llama.cpp: not built (cache {peer_dir()}); run: ltd peers build llama.cpp")
        else:
            info = b.info()
            print(f"llama.cpp: built in {b.root} ({info.get('sdist')}, {info.get('build_seconds')} s, {info.get('finished')})")
        return 0
    build, built_now = build_llamacpp(jobs=args.jobs, progress=lambda line: print(line, flush=True), force=args.force)
    info = build.info()
    if built_now:
        print(f"built llama.cpp peers in {info.get('build_seconds')} s: {build.build_dir / 'bin'}")
    else:
        print(f"llama.cpp peers already built in {build.build_dir / 'bin'} (took {info.get('build_seconds')} s); nothing to do")
    return 0


def cmd_drafter(args) -> int:
    """Tools for draft heads: ``shrink-vocab`` cuts a head's draft vocabulary to its N most frequent tokens."""
    from ltd.train.vocab import shrink_head_vocab

    small = shrink_head_vocab(args.head, args.features, args.size, args.out)
    size_mb = (Path(args.out) / "model.safetensors").stat().st_size / 1e6
    print(f"draft vocabulary -> {small.config.draft_vocab_size} tokens; {args.out}/model.safetensors {size_mb:.1f} MB")
    return 0


def _add_decode_parsers(sub) -> None:
    """``generate`` and ``demo``: decode a prompt."""
    p = sub.add_parser("generate", help="generate text for a prompt")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--method", default="static",
                   help="hf | llama.cpp | ar | static | ltd | heuristic | greedy (expected throughput from this machine's "
                        "measured costs; may decide not to draft) | suffix-rule (SuffixDecoding's rule, --drafter suffix) "
                        "(default static; hf needs --backend hf, llama.cpp --backend llamacpp)")
    p.add_argument("--policy", default=None, help="LTD policy dir with depth/ and size/ (default: the shipped one)")
    add_latency_arg(p)
    p.add_argument("--speculation", default="auto", choices=["auto", "off"],
                   help="auto: decode with --method; off: decode plainly (method ar; speculation helps code and "
                        "copying, can cost on prose; the output is the same) (default auto)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_online_args(p)
    _add_decode_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="generate with speculative decoding and plain decoding, side by side")
    add_model_args(p)
    p.add_argument("--prompt", default=DEMO_PROMPT)
    _add_decode_args(p)
    p.set_defaults(func=cmd_demo, max_new_tokens=96)


def _add_drafter_parsers(sub) -> None:
    """Make, export and shrink draft heads, and the data they train on."""
    p = sub.add_parser("regenerate", help="regenerate training responses with the target (self-distillation data)")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--data", default="sharegpt", help="sharegpt or a jsonl file of conversations (first user turns)")
    p.add_argument("--out", required=True, help="jsonl file to append to (resumable)")
    p.add_argument("--max-prompts", type=int, default=2000)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_regenerate)

    p = sub.add_parser("train-drafter", help="train an EAGLE-3 style draft head for a target")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--data", default="sharegpt", help="sharegpt or a jsonl file of conversations")
    p.add_argument("--out", required=True)
    p.add_argument("--features", default=None, help="feature cache dir (default OUT/features)")
    p.add_argument("--max-tokens", type=int, default=400_000, help="training tokens to featurize")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--unroll", type=int, default=3)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init", default=None, help="start from this head directory (continued training, new schedule)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_train_drafter)

    p = sub.add_parser("export-drafter", help="export an EAGLE-3 head in the standard layout (llama.cpp, vLLM, SGLang)")
    p.add_argument("--drafter", default="builtin:smollm2-135m-eagle3", help="builtin:NAME or an EAGLE-3 head directory")
    p.add_argument("--model", default="smollm2-135m", help="the head's target (for embeddings, config and tokenizer)")
    p.add_argument("--format", default="eagle3", choices=["eagle3"])
    p.add_argument("--out", required=True, help="directory to write the head to (replaced atomically)")
    p.add_argument("--target-dir", default=None, help="where to write the target's config and tokenizer (default OUT/target)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_export_drafter)

    p = sub.add_parser("drafter", help="tools for EAGLE-3 draft heads")
    p.add_argument("action", choices=["shrink-vocab"], help="shrink-vocab: keep the N most frequent draft tokens")
    p.add_argument("--head", required=True, help="EAGLE-3 head directory")
    p.add_argument("--features", required=True, help="the feature cache it was trained on (token frequencies)")
    p.add_argument("--size", type=int, required=True, help="new draft vocabulary size")
    p.add_argument("--out", required=True, help="directory to write the smaller head to")
    p.set_defaults(func=cmd_drafter)


def _add_tool_parsers(sub) -> None:
    """Housekeeping: online state, embedded models, peer builds."""
    p = sub.add_parser("online", help="manage saved online-adaptation state")
    p.add_argument("action", choices=["reset"])
    p.add_argument("directory")
    p.set_defaults(func=cmd_online)

    p = sub.add_parser("models", help="list or fetch embedded models")
    p.add_argument("action", choices=["list", "fetch"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("peers", help="build other engines' speculative decoders for ltd bench")
    p.add_argument("action", choices=["build", "status"])
    p.add_argument("peer", choices=["llama.cpp"])
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    p.add_argument("--force", action="store_true", help="rebuild even when a build exists")
    p.set_defaults(func=cmd_peers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltd", description="Lossless tree speculative decoding that learns to draft")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_decode_parsers(sub)
    _add_drafter_parsers(sub)
    _add_tool_parsers(sub)

    from ltd.bench import cli as bench_cli
    from ltd.bench import load_cli as bench_load_cli
    from ltd.rl import cli as rl_cli
    from ltd.serve import cli as serve_cli

    bench_cli.add_parser(sub)
    bench_load_cli.add_parser(sub)
    rl_cli.add_parsers(sub)
    serve_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except LtdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    import warnings

    warnings.filterwarnings("ignore")


if __name__ == "__main__":
    sys.exit(main())
