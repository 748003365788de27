"""``ltd serve``: load a model once and serve it over an OpenAI-compatible HTTP API.

Every flag is checked before the model loads, so a typo costs a second, not a load.
Also runnable alone as ``python -m ltd.serve`` (same flags).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from ltd.cliargs import add_latency_arg, add_model_args, add_online_args, load_engine
from ltd.errors import LtdError
from ltd.serve.settings import ServeSettings

log = logging.getLogger(__name__)

API_KEY_ENV = "LTD_API_KEY"
WARMUP_PROMPT = "Hello"
WARMUP_TOKENS = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` flags (shared by ``ltd serve`` and ``python -m ltd.serve``)."""
    d = ServeSettings(model_name="")
    add_model_args(p)
    p.add_argument("--model-name", default=None, help="model id clients send and /v1/models lists (default: --model)")
    add_online_args(p, "serving", "directory to restore (at start) and save (periodically and at exit) online state")
    p.add_argument("--save-every", type=float, default=d.save_every, metavar="SECONDS",
                   help=f"save --online-state this often, between requests (0 = only at exit; default {d.save_every:.0f})")
    p.add_argument("--method", default=None, choices=["hf", "llama.cpp", "ar", "static", "ltd", "greedy", "suffix-rule", "schedule"],
                   help="static (tree speculation) when a drafter is available, else ar (plain decoding); "
                        "ltd = the learned policies (shipped for the model, or --policy DIR); "
                        "schedule = draft length by batch size from --schedule (vLLM's and TensorRT-LLM's way); "
                        "hf = transformers generate, llama.cpp = llama.cpp's plain greedy loop (--backend llamacpp), "
                        "both answered in one piece; greedy = expected throughput from this machine's measured costs "
                        "(may decide not to draft); suffix-rule = SuffixDecoding's rule (--drafter suffix)")
    add_latency_arg(p)
    p.add_argument("--schedule", default=d.schedule, metavar="B:L,...",
                   help=f"--method schedule's draft length L by batch size B (default {d.schedule})")
    p.add_argument("--policy", default=None, metavar="DIR",
                   help="LTD policy directory with depth/ and size/ for --method ltd (default: the shipped one)")
    p.add_argument("--depth", type=int, default=d.depth, help=f"draft depth D (default {d.depth})")
    p.add_argument("--topk", type=int, default=d.topk, help=f"branching K per draft step (default {d.topk})")
    p.add_argument("--size", type=int, default=d.size, help=f"verified nodes V (default {d.size})")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--queue-size", type=int, default=d.queue_size,
                   help=f"requests that may wait behind the one being decoded; more get 429 (default {d.queue_size})")
    p.add_argument("--max-batch", type=int, default=d.max_batch, metavar="N",
                   help="requests decoded together, sharing each target forward (continuous batching; hf backend); "
                        f"default {d.max_batch}: one at a time")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help=f"seconds from arrival to the last token, queue wait included; then 504 (default {d.timeout:.0f})")
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                   help=f"largest max_tokens a request may ask for (default {d.max_tokens_limit})")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help=f"max_tokens when a request gives none (default {d.default_max_tokens})")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body; more gets 413 (default: 8 bytes per context token + 64 KiB)")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout, metavar="SECONDS",
                   help=f"on SIGTERM/SIGINT, how long the running generation may finish before it is cancelled "
                        f"(default {d.drain_timeout:.0f})")
    p.add_argument("--allowed-hosts", default="",
                   help="comma-separated extra Host header names to serve besides localhost, 127.0.0.1, [::1] and "
                        "--host ('*' = any; guards against DNS rebinding)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV}, else none; "
                        f"prefer the variable: a flag shows in ps)")
    p.add_argument("--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (off by default)")
    p.add_argument("--no-warmup", action="store_true", help="skip the short generation that runs before serving")
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (chat and completions, streaming)",
        description="Start an OpenAI-compatible server (POST /v1/chat/completions, /v1/completions; "
                    "GET /v1/models, /health, /metrics) decoding with lossless tree speculation.",
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def resolve_method(model: str, drafter: str | None, method: str | None, backend: str = "hf") -> tuple[str, str]:
    """(method, drafter spec): static when a drafter is there, else ar; no drafter is
    loaded for methods that do not use one."""
    from ltd.engine import default_drafter_spec

    spec = drafter if drafter is not None else default_drafter_spec(model, backend)
    if method is None:
        method = "static" if spec != "none" else "ar"
    if method == "hf" and backend != "hf":
        raise LtdError("--method hf is transformers' generate; with --backend llamacpp use --method llama.cpp")
    if method == "llama.cpp" and backend != "llamacpp":
        raise LtdError("--method llama.cpp needs --backend llamacpp")
    if method in ("hf", "llama.cpp", "ar"):
        if drafter not in (None, "none"):
            log.warning("--method %s does not use the drafter %r; it is not loaded", method, drafter)
        spec = "none"
    elif spec == "none":
        raise LtdError(f"--method {method} needs a drafter; pass --drafter (e.g. self, a smaller model of the same family, "
                       "or an EAGLE-3 head) or use --method ar")
    return method, spec


def settings_from_args(args: argparse.Namespace, method: str) -> ServeSettings:
    settings = ServeSettings(
        model_name=args.model_name or args.model,
        method=method,
        depth=args.depth,
        topk=args.topk,
        size=args.size,
        queue_size=args.queue_size,
        max_batch=args.max_batch,
        policy=args.policy,
        schedule=args.schedule,
        timeout=args.timeout,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
        max_body_bytes=args.max_body_bytes,
        bind_host=args.host,
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
        api_key=args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None),
        docs=args.docs,
        drain_timeout=args.drain_timeout,
        online_state=args.online_state if args.online else None,
        save_every=args.save_every,
    )
    settings.validate()
    return settings


def _check_bind(settings: ServeSettings, port: int) -> None:
    if not 0 <= port <= 65535:
        raise LtdError(f"--port must be between 0 and 65535, got {port}")
    host = settings.bind_host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return
    if settings.api_key is None:
        log.warning("binding to %s without --api-key: anyone who can reach this port can use it", host)
    if not settings.allowed_hosts:
        log.warning("binding to %s: only requests whose Host is localhost, 127.0.0.1, [::1] or %s are served; "
                    "add the names clients use with --allowed-hosts", host, host)


def load_serving_engine(args: argparse.Namespace, settings: ServeSettings, spec: str):
    """Load the engine, warm it up, then turn online learning on.

    The warm-up runs before online learning is attached, so the start-up generation
    leaves the learned state (kNN memory, stream memory, head weights) exactly as it
    was restored: a restart must not teach the drafter "Hello" every time.
    """
    engine = load_engine(args, spec)
    engine.latency_file = getattr(args, "latency", None)
    # one-time work (a cost profile, a drafter check) before serving, and before online learning is attached
    engine.prepare(settings.generate_config(WARMUP_TOKENS, 0.0, 1.0, None))
    if not args.no_warmup:
        # One-time costs (kernel selection, allocator growth) should not land on the first client.
        engine.generate(engine.encode(WARMUP_PROMPT), settings.generate_config(WARMUP_TOKENS, 0.0, 1.0, None))
        engine.drafter.reset()  # forget the warm-up sequence, or the first request would hand it to the memory
    if args.online:
        engine.enable_online(args.online, state_dir=args.online_state)
    return engine


def run(args: argparse.Namespace) -> int:
    """Run ``ltd serve`` until interrupted."""
    try:
        import uvicorn

        from ltd.serve.app import create_app
    except ImportError as exc:
        raise LtdError(f"ltd serve needs the serve extras ({exc.name} is missing): pip install -e '.[serve]'") from None

    from ltd.runtime import check_device, enable_compute_thread, on_compute_thread
    from ltd.serve.server import GracefulServer

    check_device(args.device)
    # the model is loaded, warmed up and run on one thread (see ltd.runtime.ComputeThread);
    # this one serves HTTP
    enable_compute_thread()
    backend = args.backend
    method, spec = resolve_method(args.model, args.drafter, args.method, backend)
    settings = settings_from_args(args, method)
    _check_bind(settings, args.port)
    if logging.getLogger("ltd.serve").getEffectiveLevel() > logging.INFO:
        logging.getLogger("ltd.serve").setLevel(logging.INFO)  # start, disconnects, shutdown and saves are worth a line

    engine = on_compute_thread(load_serving_engine, args, settings, spec)
    app = create_app(engine, settings)
    log.info("model %s, drafter %s, method %s: http://%s:%d/v1", args.model, spec, method, args.host, args.port)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=5,
    )
    # SIGTERM/SIGINT drain the server; the app's lifespan then saves the online state.
    GracefulServer(config, app.state.shutdown).run()
    saver = app.state.saver
    if saver is not None and saver.last_reason != "shutdown":  # a second signal skipped the lifespan's save
        saver.save("exit")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ltd.serve``: the same command without the ``ltd`` front end."""
    parser = argparse.ArgumentParser(prog="python -m ltd.serve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (DEBUG for ltd)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("ltd").setLevel(logging.DEBUG)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return run(args)
    except LtdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
