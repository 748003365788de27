"""Command-line flags that several commands share (generate, demo, bench, serve, RL).

One definition per flag keeps their names, choices and help identical everywhere.
Torch-free, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse

from ltd.defaults import DEFAULT_HEAD_DTYPE, DEFAULT_KERNELS, HEAD_DTYPE_HELP, HEAD_DTYPES, KERNEL_MODES, KERNELS_HELP, ONLINE_VARIANTS
from ltd.errors import LtdError
from ltd.registry import DEFAULT_MODEL
from ltd.runtime import apply_threads, check_device

DRAFTER_HELP = (
    "none | ngram[:N] | self | builtin:NAME | EAGLE-3 head dir | a small LM | hybrid:ngram[:N]+DRAFTER[@D] "
    "(default: the model's shipped drafter; ngram on llamacpp)"
)

ONLINE_HELP = ("adapt the drafter while {doing}: knn = a kNN memory of the EAGLE-3 head's states labelled by the target; "
               "memory = the suffix drafter's store of past outputs (--drafter suffix or hybrid:suffix+...); knn+memory = both")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """``--kernels`` and ``--head-dtype``: how our forwards run (never what they output)."""
    p.add_argument("--kernels", default=DEFAULT_KERNELS, choices=KERNEL_MODES, help=KERNELS_HELP)
    p.add_argument("--head-dtype", default=DEFAULT_HEAD_DTYPE, choices=HEAD_DTYPES, help=HEAD_DTYPE_HELP)


def add_model_args(p, drafter: bool = True, model_default: str | None = DEFAULT_MODEL, default_help: str | None = None) -> None:
    """The target, drafter, device, dtype, threads, speed and backend flags of every command that loads an engine.

    ``p`` is a parser or an argument group. ``model_default`` None with ``default_help``
    lets a command fill the model and drafter in later (e.g. from recorded traces).
    """
    model_help = default_help or f"default: {model_default}"
    p.add_argument("--model", default=model_default, help=f"registry name, HF id or local dir ({model_help})")
    if drafter:
        p.add_argument("--drafter", default=None, help=DRAFTER_HELP if default_help is None else f"a drafter spec ({default_help})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of torch and llama.cpp (default: the library's choice)")
    add_speed_args(p)
    p.add_argument("--backend", default="hf", choices=["hf", "llamacpp"],
                   help="hf (transformers; --device/--dtype apply) or llamacpp (the GGUF on llama.cpp) (default hf)")


def load_engine(args: argparse.Namespace, drafter: str | None):
    """Apply ``--threads``, check ``--device`` and load the engine the model flags name.

    ``drafter`` is the spec the command settled on (None: the model's default). The
    engine module is imported here, not at the top: it pulls in torch and transformers,
    which ``--help`` must not wait for.
    """
    from ltd.engine import Engine

    apply_threads(args.threads)
    check_device(args.device)
    return Engine.load(
        args.model, drafter=drafter, device=args.device, dtype=args.dtype, backend=args.backend,
        threads=args.threads, kernels=args.kernels, head_dtype=args.head_dtype,
    )


def add_latency_arg(p) -> None:
    """``--latency PATH``: a full ``ltd profile`` file for the cost-aware methods."""
    p.add_argument("--latency", default=None, metavar="PATH",
                   help="cost profile (ltd profile --out) for the cost-aware method greedy "
                        "(default: a quick profile, measured once per machine and cached)")


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"2,3,4"`` -> [2, 3, 4] with an error naming the flag."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LtdError(f"{flag} takes comma-separated integers, e.g. 2,4,8; got {text!r}") from None
    if not values:
        raise LtdError(f"{flag} is empty; give comma-separated integers")
    return values


def add_online_args(p: argparse.ArgumentParser, doing: str, state_help: str) -> None:
    """``--online VARIANT`` and ``--online-state DIR``."""
    p.add_argument("--online", default=None, choices=ONLINE_VARIANTS, help=ONLINE_HELP.format(doing=doing))
    p.add_argument("--online-state", default=None, help=state_help)
