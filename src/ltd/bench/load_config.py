"""What ``ltd bench-load`` runs: named server configurations, levels and the workload.

Checked before any server starts, so a typo costs a second, not a model load.

A server configuration is a name plus extra ``ltd serve`` arguments, written
``NAME=ARGS`` on the command line (``serial="--method static"``); a bare ``NAME``
picks one of the built-in configurations, which name the four servers to compare:
today's serial server, batched plain decoding, batched with a static tree and
batched with the default (learned) method.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Sequence

from ltd.bench.suites import MIXED, Question, interleave, load_suites, mixed_stream
from ltd.defaults import DEFAULT_DEPTH, DEFAULT_SIZE, DEFAULT_TOPK
from ltd.errors import LtdError
from ltd.registry import DEFAULT_MODEL

SERIAL = "serial"  # the configuration other ones are compared with
DEFAULT_MAX_BATCH = 8
DEFAULT_CONCURRENCY = (1, 2, 4, 8)
DEFAULT_STATIC_SHAPE = (DEFAULT_DEPTH, DEFAULT_TOPK, DEFAULT_SIZE)  # the best static tree of `ltd bench --grid`
# flags the bench sets on every server itself: a configuration may not override them
RESERVED_FLAGS = ("--model", "--host", "--port", "--threads", "--api-key")
OWN_FLAGS = ("--model", "--threads")  # ... of which these are bench-load flags too
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHAPE_RE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


@dataclass(frozen=True)
class ServerConfig:
    """One server to measure: a name for the report and the ``ltd serve`` arguments it adds."""

    name: str
    args: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        """How the report shows it."""
        return shlex.join(["ltd", "serve", *self.args])


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"3x8x16"`` -> (depth, top-k, size), each at least 1."""
    m = _SHAPE_RE.match(text.strip())
    if not m or min(int(g) for g in m.groups()) < 1:
        raise LtdError(f"--static-shape {text!r}: write DxKxV with positive integers, e.g. 3x8x16 (depth x top-k x size)")
    d, k, v = (int(g) for g in m.groups())
    return d, k, v


def builtin_configs(static_shape: tuple[int, int, int] = DEFAULT_STATIC_SHAPE,
                    max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, ServerConfig]:
    """The four servers of the comparison, by name (their order is the report's)."""
    if max_batch < 1:
        raise LtdError(f"--max-batch must be at least 1, got {max_batch}")
    d, k, v = static_shape
    batch = ("--max-batch", str(max_batch))
    return {
        SERIAL: ServerConfig(SERIAL, ()),
        "batched-ar": ServerConfig("batched-ar", (*batch, "--method", "ar")),
        "batched-static": ServerConfig("batched-static", (*batch, "--method", "static", "--depth", str(d),
                                                          "--topk", str(k), "--size", str(v))),
        "batched-ltd": ServerConfig("batched-ltd", (*batch, "--method", "ltd")),
    }


def split_args(text: str, what: str) -> tuple[str, ...]:
    """Shell-style words of ``text``, none of them a flag the bench sets itself."""
    try:
        words = tuple(shlex.split(text))
    except ValueError as exc:
        raise LtdError(f"{what}: cannot split {text!r} into arguments ({exc}); check its quotes") from None
    for word in words:
        flag = word.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            fix = f"use ltd bench-load {flag} instead" if flag in OWN_FLAGS else "drop it"
            raise LtdError(f"{what}: ltd bench-load sets {flag} on every server itself; {fix}")
    return words


def parse_configs(items: Sequence[str], builtins: dict[str, ServerConfig]) -> list[ServerConfig]:
    """``["serial", "spec=--method static --depth 3"]`` -> configurations, names unique."""
    if not items:
        raise LtdError(f"--configs is empty; give NAME=ARGS items or built-in names ({', '.join(builtins)})")
    configs: list[ServerConfig] = []
    for item in items:
        name, eq, rest = item.partition("=")
        name = name.strip()
        if not eq:
            if name not in builtins:
                raise LtdError(f"--configs {item!r}: not a built-in configuration ({', '.join(builtins)}); "
                               f"write NAME=\"ARGS\", e.g. fast=\"--method ar\"")
            configs.append(builtins[name])
            continue
        if not _NAME_RE.match(name):
            raise LtdError(f"--configs {item!r}: a name is letters, digits, '.', '_' or '-' before '=', "
                           f"e.g. fast=\"--method ar\"")
        configs.append(ServerConfig(name, split_args(rest, f"--configs {name}")))
    names = [c.name for c in configs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LtdError(f"--configs names {', '.join(twice)} more than once; give each configuration its own name")
    return configs


@dataclass
class LoadConfig:
    """One load benchmark: every configuration at every concurrency level, one after another.

    Each level sends at most ``requests`` requests and starts none after ``time_limit``
    seconds; requests already sent finish. ``server_args`` go to every server before
    the configuration's own arguments (which therefore win).
    """

    configs: list[ServerConfig]
    model: str = DEFAULT_MODEL
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    requests: int = 16
    time_limit: float = 120.0
    max_tokens: int = 64
    suites: tuple[str, ...] = (MIXED,)
    limit: int | None = None
    seed: int = 0
    threads: int | None = None
    server_args: tuple[str, ...] = ()
    startup_timeout: float = 600.0
    request_timeout: float = 600.0
    warmup: bool = True
    source: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not self.configs:
            raise LtdError("no server configuration to run; give --configs")
        if not self.concurrency or min(self.concurrency) < 1:
            raise LtdError(f"--concurrency needs positive integers, e.g. 1,2,4,8; got {list(self.concurrency)}")
        if len(set(self.concurrency)) != len(self.concurrency):
            raise LtdError(f"--concurrency lists a level twice ({list(self.concurrency)}); list each once")
        checks = [("--requests", self.requests, 1), ("--max-tokens", self.max_tokens, 1),
                  ("--threads", self.threads, 1), ("--limit", self.limit, 1)]
        for flag, value, least in checks:
            if value is not None and value < least:
                raise LtdError(f"{flag} must be at least {least}, got {value}")
        for flag, seconds in [("--time-limit", self.time_limit), ("--startup-timeout", self.startup_timeout),
                              ("--request-timeout", self.request_timeout)]:
            if not seconds > 0:
                raise LtdError(f"{flag} must be a positive number of seconds, got {seconds}")


def load_workload(suites: Sequence[str], limit: int | None, seed: int) -> list[tuple[str, tuple[str, ...]]]:
    """The prompts, as (key, user turns to send) in a seeded order.

    ``mixed`` is the seeded stream of every suite; named suites are interleaved by the
    same rule. Only the first turn of a question is sent, except for suites whose later
    turns are the point (multiturn), which a client sends one after another, each with
    the server's earlier replies in the conversation.
    """
    names = list(suites)
    if names == [MIXED]:
        questions: list[Question] = mixed_stream(limit=limit, seed=seed)
    else:
        questions = interleave(load_suites(names, limit=limit), seed)
    return [(q.key, q.turns if q.all_turns else q.turns[:1]) for q in questions]
