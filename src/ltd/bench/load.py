"""``ltd bench-load``: concurrent loopback clients against ``ltd serve``, one server at a time.

For each server configuration the bench starts ``ltd serve`` as a subprocess
(:mod:`ltd.bench.load_server`), then runs each concurrency level in turn: that many
asyncio clients stream greedy chat completions from the workload, until the level's
request count is spent or its time limit passes (requests already sent finish). Per
request it records latency, time to the first text, completion tokens (from the
stream's usage chunk) and any error; the server's resident memory is sampled through
the level. Levels and servers never overlap: timing needs a quiet machine.

Results are written after every configuration, so an interrupted run keeps what it
measured (:mod:`ltd.bench.load_report` computes the statistics and the report).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import httpx

from ltd.bench.load_config import LoadConfig, ServerConfig, load_workload
from ltd.bench.load_report import level_summary, results_document, write_load_results
from ltd.bench.load_server import ServerProcess, free_port, serve_argv
from ltd.errors import LtdError
from ltd.machine import utc_now

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
RSS_PERIOD = 0.1  # seconds between memory samples
WARMUP_TOKENS = 8

Conversation = tuple[str, tuple[str, ...]]  # (key, user turns sent one after another)


@dataclass
class RequestRecord:
    """One request as a client saw it; times in seconds, ``start`` from the level's start."""

    key: str
    start: float
    latency: float
    ttft: float | None
    completion_tokens: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Reply:
    """What one streamed response held."""

    text: str = ""
    ttft: float | None = None
    completion_tokens: int | None = None
    done: bool = False
    error: str | None = None


async def _read_stream(resp: httpx.Response, t0: float) -> _Reply:
    """Parse the server-sent events of one chat completion (OpenAI's format)."""
    reply, parts = _Reply(), []
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            reply.done = True
            break
        event = json.loads(data)
        if "error" in event:
            err = event["error"]
            reply.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
            break
        for choice in event.get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                if reply.ttft is None:
                    reply.ttft = time.perf_counter() - t0
                parts.append(content)
        if event.get("usage"):
            reply.completion_tokens = int(event["usage"]["completion_tokens"])
    reply.text = "".join(parts)
    return reply


async def send_chat(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int,
                    key: str, level_start: float) -> tuple[RequestRecord, str]:
    """One streamed greedy request; never raises for a failed request (it is recorded)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", CHAT_PATH, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                reply = _Reply(error=f"HTTP {resp.status_code}: {_error_message(text)}")
            else:
                reply = await _read_stream(resp, t0)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        reply = _Reply(error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - t0
    if reply.error is None and not reply.done:
        reply.error = "the stream ended without [DONE]"
    elif reply.error is None and reply.completion_tokens is None:
        reply.error = "the stream carried no usage (stream_options.include_usage)"
    tokens = reply.completion_tokens if reply.error is None else 0
    record = RequestRecord(key, t0 - level_start, latency, reply.ttft, tokens or 0, reply.error)
    return record, reply.text


def _error_message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.strip()[:200] or "no body"


class _Budget:
    """The level's bound: at most ``count`` requests, none started after ``deadline``."""

    def __init__(self, count: int, seconds: float) -> None:
        self.left = count
        self.deadline = time.perf_counter() + seconds

    def take(self) -> bool:
        if self.left <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True


async def _client(client: httpx.AsyncClient, model: str, work: Iterator[Conversation], budget: _Budget,
                  max_tokens: int, level_start: float, records: list[RequestRecord]) -> None:
    """One user: takes the next conversation and sends its turns in order, each after the last reply."""
    while True:
        key, turns = next(work)
        messages: list[dict] = []
        for i, turn in enumerate(turns):
            if not budget.take():
                return
            messages.append({"role": "user", "content": turn})
            record, reply = await send_chat(client, model, messages, max_tokens, key if i == 0 else f"{key}/turn{i + 1}",
                                            level_start)
            records.append(record)
            if not record.ok:
                break  # a later turn needs this reply
            messages.append({"role": "assistant", "content": reply})


async def _sample_rss(rss: Callable[[], int], peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], rss())
        await asyncio.sleep(RSS_PERIOD)


async def run_level(client: httpx.AsyncClient, model: str, workload: Sequence[Conversation], concurrency: int,
                    requests: int, time_limit: float, max_tokens: int, rss: Callable[[], int]) -> dict:
    """``concurrency`` clients over the workload (from its start) until the budget is spent."""
    work = itertools.cycle(workload)
    budget = _Budget(requests, time_limit)
    records: list[RequestRecord] = []
    peak = [rss()]
    sampler = asyncio.create_task(_sample_rss(rss, peak))
    start = time.perf_counter()
    try:
        await asyncio.gather(*(_client(client, model, work, budget, max_tokens, start, records) for _ in range(concurrency)))
    finally:
        wall = time.perf_counter() - start
        sampler.cancel()
    peak[0] = max(peak[0], rss())
    return level_summary([asdict(r) for r in records], wall, concurrency, peak[0])


async def _served_model(client: httpx.AsyncClient, name: str) -> str:
    """The model id the server answers to (``--model-name`` may have changed it)."""
    try:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise LtdError(f"server {name!r} did not list its model on /v1/models ({type(exc).__name__}: {exc}); "
                       "is it ltd serve?") from None


async def _run_levels(cfg: LoadConfig, server: ServerProcess, workload: Sequence[Conversation],
                      on_level: Callable[[dict], None]) -> None:
    timeout = httpx.Timeout(cfg.request_timeout, connect=30.0)
    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 2, max_keepalive_connections=max(cfg.concurrency) + 2)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=timeout, limits=limits) as client:
        model = await _served_model(client, server.name)
        if cfg.warmup:  # untimed: the first long request grows the server's caches and allocator
            warm, _ = await send_chat(client, model, [{"role": "user", "content": workload[0][1][0]}], WARMUP_TOKENS,
                                      "warmup", 0.0)
            if not warm.ok:
                log.warning("server %s: the warm-up request failed (%s)", server.name, warm.error)
        for c in cfg.concurrency:
            log.info("server %s: concurrency %d", server.name, c)
            level = await run_level(client, model, workload, c, cfg.requests, cfg.time_limit, cfg.max_tokens,
                                    server.rss_bytes)
            log.info("server %s, concurrency %d: %d ok, %d errors, %.1f tokens/s", server.name, c, level["ok"],
                     level["errors"], level["tokens_per_second"] or 0.0)
            on_level(level)


def run_config(cfg: LoadConfig, server_cfg: ServerConfig, workload: Sequence[Conversation], out_dir: Path,
               on_level: Callable[[dict], None]) -> int:
    """Start one server, run every level against it, stop it; returns the server's pid."""
    port = free_port()
    argv = serve_argv(cfg.model, port, cfg.threads, max(cfg.concurrency), [*cfg.server_args, *server_cfg.args])
    env = {"OMP_NUM_THREADS": str(cfg.threads)} if cfg.threads is not None else {}  # every OpenMP pool, not only torch's
    server = ServerProcess(server_cfg.name, argv, port, out_dir / f"server-{server_cfg.name}.log", cfg.startup_timeout, env)
    with server:
        asyncio.run(_run_levels(cfg, server, workload, on_level))
    return int(server.pid or 0)


def run_load(cfg: LoadConfig, out_dir: str | Path) -> dict:
    """Every configuration at every level; results.json and report.md are rewritten after each level.

    A server that fails to start is recorded (``error``) and the next one runs. Ctrl-C
    stops the running server and returns what was measured, marked interrupted.
    """
    cfg.validate()
    out = Path(out_dir)
    workload = load_workload(cfg.suites, cfg.limit, cfg.seed)
    started = utc_now()
    measured: list[dict] = []

    def write(interrupted: bool = False) -> dict:
        doc = results_document(cfg, len(workload), measured, started, interrupted)
        write_load_results(doc, out)
        return doc

    for server_cfg in cfg.configs:
        entry = {"name": server_cfg.name, "args": list(server_cfg.args), "command": server_cfg.command, "levels": []}
        measured.append(entry)

        def on_level(level: dict, entry: dict = entry) -> None:
            entry["levels"].append(level)
            write()

        try:
            entry["server_pid"] = run_config(cfg, server_cfg, workload, out, on_level)
        except LtdError as exc:
            log.error("server %s: %s", server_cfg.name, exc)
            entry["error"] = str(exc)
        except KeyboardInterrupt:
            log.warning("interrupted during server %s; writing what was measured", server_cfg.name)
            return write(interrupted=True)
        doc = write()
    return doc
