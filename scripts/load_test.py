#!/usr/bin/env python
"""Bounded load and fault test of ``ltd serve`` on loopback.

One command runs every phase against ``python -m ltd.serve`` subprocesses on free
loopback ports and writes ``results.json`` and ``report.md``:

- ``load``: N concurrent clients x M requests (chat, greedy, alternating streamed and
  non-streamed; clients honour Retry-After on 429): p50/p95 latency, time to first
  token, tokens/s, 429s, failures, RSS before/after/peak, and whether greedy outputs
  agree across clients and stream modes;
- ``burst``: B requests at once, no retries: status counts and the Retry-After values;
- ``disconnects``: D streams closed after their first chunk: generations cancelled,
  time until the worker is idle, disconnect lines in the server log;
- ``huge``: H parallel requests with a ~20 MB valid JSON body each: status counts and
  the server's peak RSS against its idle RSS (sampled every 0.2 s; the server is
  killed if it passes ``--rss-ceiling-gib``, to protect the machine);
- ``sigterm``: a fresh server with ``--online memory``; a long stream, a queued
  request, then SIGTERM: how the stream ended, what the queued request got, the exit
  code, and whether the online state on disk reloads.

With ``--before OLD/results.json`` the report puts each figure beside the one of that
earlier run (e.g. the same command with ``PYTHONPATH`` pointing at older code). Flags
that an older server does not know are left out. It stops by itself; every server is
always terminated.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/load_test.py --clients 8 --requests 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import shutil
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

log = logging.getLogger("load_test")

PROMPTS = [
    "What would be the best type of exercise for a person who has arthritis?",
    "Calculate the atomic mass for lithium.",
    "Give three tips for staying healthy.",
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn leaves.",
    "What is the capital of Australia?",
    "Suggest a name for a bakery.",
    "Describe a cat to someone who has never seen one.",
]
MAX_ATTEMPTS = 200  # 429 retries per request, far above what a bounded run needs
RSS_SAMPLE_SECONDS = 0.5


@dataclass
class RequestResult:
    client: int
    index: int
    prompt: int
    stream: bool
    ok: bool = False
    status: int | None = None
    error: str | None = None
    attempts: int = 0
    rejected_429: int = 0
    latency: float | None = None  # the successful attempt: queue wait + generation
    latency_with_retries: float | None = None
    ttft: float | None = None  # streamed requests: time to the first text chunk
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None


@dataclass
class RssSampler:
    """Samples the server's resident memory in the background (peak and timeline)."""

    pid: int
    interval: float = RSS_SAMPLE_SECONDS
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        proc = psutil.Process(self.pid)
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((round(time.monotonic() - t0, 2), proc.memory_info().rss))
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def server_env(args) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}


def server_knows(args, flag: str) -> bool:
    """Whether the server under test has ``flag`` (an older one may not)."""
    if not hasattr(server_knows, "help"):
        server_knows.help = subprocess.run([sys.executable, "-m", "ltd.serve", "--help"], capture_output=True, text=True,
                                           env=server_env(args), timeout=120).stdout
    return flag in server_knows.help


def start_server(args, port: int, log_path: Path, drafter: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "ltd.serve",
        "--model", args.model, "--drafter", drafter or args.drafter, "--method", args.method,
        "--depth", str(args.depth), "--topk", str(args.topk), "--size", str(args.size),
        "--host", "127.0.0.1", "--port", str(port),
        "--queue-size", str(args.queue_size), "--timeout", str(args.request_timeout),
        "--threads", str(args.threads), "--no-access-log", *extra,
    ]
    env = server_env(args)
    log.info("starting: %s", " ".join(cmd))
    out = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} during startup; see server.log")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy within {timeout:.0f} s")


def one_attempt(client: httpx.Client, body: dict, res: RequestResult) -> tuple[int, float | None]:
    """Send one request; returns (status, Retry-After seconds when 429). Fills ``res`` on 200."""
    t0 = time.monotonic()
    if not body["stream"]:
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code == 200:
            data = r.json()
            res.latency = time.monotonic() - t0
            res.text = data["choices"][0]["message"]["content"]
            res.finish_reason = data["choices"][0]["finish_reason"]
            res.completion_tokens = data["usage"]["completion_tokens"]
            res.ok = True
        elif r.status_code != 429:
            res.error = r.text[:300]
        return r.status_code, float(r.headers.get("Retry-After", 1)) if r.status_code == 429 else None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            if r.status_code != 429:
                res.error = r.text[:300]
            return r.status_code, float(r.headers.get("Retry-After", 1)) if r.status_code == 429 else None
        parts: list[str] = []
        done = False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                res.error = json.dumps(chunk["error"])
                return 200, None
            if chunk.get("usage"):
                res.completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                text = choice["delta"].get("content")
                if text:
                    if res.ttft is None:
                        res.ttft = time.monotonic() - t0
                    parts.append(text)
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
        res.latency = time.monotonic() - t0
        res.text = "".join(parts)
        res.ok = done
        if not done:
            res.error = "stream ended without [DONE]"
    return 200, None


def run_client(url: str, args, cid: int, deadline: float, results: list[RequestResult]) -> None:
    with httpx.Client(base_url=url, timeout=args.request_timeout + 30) as client:
        for j in range(args.requests):
            if time.monotonic() > deadline:
                return
            p = (cid + j) % len(PROMPTS)
            res = RequestResult(client=cid, index=j, prompt=p, stream=(cid + j) % 2 == 0)
            body = {
                "model": args.model,
                "messages": [{"role": "user", "content": PROMPTS[p]}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": res.stream,
            }
            if res.stream:
                body["stream_options"] = {"include_usage": True}
            t_first = time.monotonic()
            while res.attempts < MAX_ATTEMPTS and time.monotonic() < deadline:
                res.attempts += 1
                try:
                    status, retry_after = one_attempt(client, body, res)
                except httpx.HTTPError as exc:
                    res.error = f"{type(exc).__name__}: {exc}"
                    break
                res.status = status
                if status != 429:
                    break
                res.rejected_429 += 1
                time.sleep(min(retry_after or 1.0, max(0.0, deadline - time.monotonic())))
            if res.ok:
                res.latency_with_retries = time.monotonic() - t_first
            elif res.error is None:
                res.error = "gave up: time limit reached while rejected with 429"
            results.append(res)


def scrape_metrics(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    wanted = ("ltd_generated_tokens_total", "ltd_cycles_total", "ltd_mean_accepted_length", "ltd_tokens_per_second",
              "ltd_requests_rejected_total", "ltd_queue_depth")
    out = {k: values[k] for k in wanted if k in values}
    out.update({k: v for k, v in values.items() if k.startswith("ltd_generations_total")})
    return out


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    lat = [r.latency for r in ok if r.latency is not None]
    lat_retry = [r.latency_with_retries for r in ok if r.latency_with_retries is not None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.completion_tokens for r in ok)
    per_request_tps = [r.completion_tokens / r.latency for r in ok if r.latency]
    texts: dict[int, set[str]] = {}
    for r in ok:
        texts.setdefault(r.prompt, set()).add(r.text)
    r3 = lambda x: None if x is None else round(x, 3)  # noqa: E731
    return {
        "requests": len(results),
        "succeeded": len(ok),
        "failed": len(results) - len(ok),
        "rejected_429": sum(r.rejected_429 for r in results),
        "streamed": sum(r.stream for r in ok),
        "completion_tokens": tokens,
        "wall_seconds": r3(wall),
        "tokens_per_second": r3(tokens / wall if wall > 0 else 0.0),
        "requests_per_second": r3(len(ok) / wall if wall > 0 else 0.0),
        "latency_p50": r3(percentile(lat, 50)),
        "latency_p95": r3(percentile(lat, 95)),
        "latency_mean": r3(statistics.fmean(lat) if lat else None),
        "latency_with_retries_p50": r3(percentile(lat_retry, 50)),
        "latency_with_retries_p95": r3(percentile(lat_retry, 95)),
        "ttft_p50": r3(percentile(ttft, 50)),
        "ttft_p95": r3(percentile(ttft, 95)),
        "per_request_tokens_per_second_p50": r3(percentile(per_request_tps, 50)),
        "prompts_with_differing_outputs": sorted(p for p, t in texts.items() if len(t) > 1),
    }


def steady_growth_mib(memory: dict) -> float:
    """RSS growth from a quarter into the run to its end: a leak keeps growing there,
    while allocator warm-up (new prompt lengths, first cycles) is over by then."""
    timeline = memory.get("timeline") or []
    if not timeline:
        return 0.0
    start = max(timeline[0][0], timeline[-1][0] / 4)
    base = next(b for t, b in timeline if t >= start)
    return (memory["rss_after"] - base) / 2**20


def chat_request(args, content: str, max_tokens: int, stream: bool = False) -> dict:
    body = {"model": args.model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    return body


def metric(url: str, name: str) -> float:
    """One sample of /metrics by its full name (labels included); 0 when absent."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if not line.startswith("#") and line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_idle(url: str, timeout: float) -> float | None:
    """Seconds until /health says the worker is idle with an empty queue; None if never."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        h = httpx.get(url + "/health", timeout=10).json()
        if not h.get("busy") and not h.get("queue_depth"):
            return round(time.monotonic() - t0, 2)
        time.sleep(0.1)
    return None


def describe_error(exc: BaseException) -> str:
    return type(exc).__name__


# -- phases -------------------------------------------------------------------------


def run_load(url: str, args, proc: subprocess.Popen) -> dict:
    """N clients x M requests; the original load test."""
    httpx.post(url + "/v1/chat/completions", timeout=args.request_timeout, json=chat_request(args, "Hi", 4))
    rss_before = rss(proc.pid)
    sampler = RssSampler(proc.pid).start()
    results: list[RequestResult] = []
    t0 = time.monotonic()
    deadline = t0 + args.time_limit
    threads = [threading.Thread(target=run_client, args=(url, args, c, deadline, results)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + args.request_timeout + 60))
    wall = time.monotonic() - t0
    time.sleep(1.0)  # let the worker settle before the last memory reading
    rss_after = rss(proc.pid)
    sampler.stop()
    peak = max([rss_after, rss_before] + [b for _, b in sampler.samples])
    memory = {"rss_before": rss_before, "rss_after": rss_after, "rss_peak": peak,
              "rss_growth_mib": round((rss_after - rss_before) / 2**20, 2),
              "timeline": sampler.samples[:: max(1, len(sampler.samples) // 200)]}
    memory["rss_growth_after_first_quarter_mib"] = round(steady_growth_mib(memory), 2)
    return {
        "summary": summarize(results, wall),
        "memory": memory,
        "stopped_by": "all requests done" if time.monotonic() <= deadline else f"time limit ({args.time_limit:.0f} s)",
        "server_metrics": scrape_metrics(url),
        "requests": [{k: v for k, v in asdict(r).items() if k != "text"} | {"text_chars": len(r.text)} for r in
                     sorted(results, key=lambda r: (r.client, r.index))],
    }


def run_burst(url: str, args) -> dict:
    """B requests released at once, no retries: who gets served, who gets 429 and when to retry."""
    barrier = threading.Barrier(args.burst)
    out: list[dict] = []

    def one(i: int) -> None:
        body = chat_request(args, PROMPTS[i % len(PROMPTS)], args.burst_max_tokens)
        barrier.wait()
        t0 = time.monotonic()
        try:
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=args.request_timeout + 30)
            out.append({"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                        "json": r.headers.get("content-type", "").startswith("application/json"),
                        "seconds": round(time.monotonic() - t0, 2)})
        except httpx.HTTPError as exc:
            out.append({"status": describe_error(exc), "seconds": round(time.monotonic() - t0, 2)})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.burst)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.request_timeout + 60)
    retry = sorted(int(o["retry_after"]) for o in out if o.get("retry_after"))
    return {"statuses": dict(Counter(str(o["status"]) for o in out)), "retry_after_values": retry,
            "all_json": all(o.get("json", False) for o in out), "responses": out}


def run_disconnects(url: str, args, log_path: Path) -> dict:
    """D streams, each closed by the client after its first chunk."""
    cancelled_before = metric(url, 'ltd_generations_total{outcome="cancelled"}')
    idle_after: list[float | None] = []
    for i in range(args.disconnects):
        body = chat_request(args, PROMPTS[i % len(PROMPTS)], args.disconnect_max_tokens, stream=True)
        with httpx.Client(base_url=url, timeout=args.request_timeout) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break
        idle_after.append(wait_idle(url, 120))
    time.sleep(0.5)
    log_lines = sum("disconnect" in line for line in log_path.read_text(errors="replace").splitlines())
    cancelled = metric(url, 'ltd_generations_total{outcome="cancelled"}') - cancelled_before
    return {"disconnects": args.disconnects, "generations_cancelled": int(cancelled),
            "seconds_to_idle_max": max((x for x in idle_after if x is not None), default=None),
            "never_idle": sum(x is None for x in idle_after), "disconnect_log_lines": log_lines}


def run_huge(url: str, args, proc: subprocess.Popen) -> dict:
    """H parallel requests with a ~20 MB valid JSON body each; peak RSS against idle."""
    time.sleep(1.0)
    idle = rss(proc.pid)
    words = args.huge_mb * 2**20 // 5
    body = json.dumps(chat_request(args, "word " * words, 8)).encode()
    sampler = RssSampler(proc.pid, interval=0.2).start()
    ceiling = args.rss_ceiling_gib * 2**30
    killed = threading.Event()
    done = threading.Event()

    def guard() -> None:
        while not done.is_set():
            try:
                if rss(proc.pid) > ceiling:
                    proc.kill()
                    killed.set()
                    return
            except psutil.Error:
                return
            done.wait(0.2)

    out: list[dict] = []

    def one() -> None:
        t0 = time.monotonic()
        try:
            r = httpx.post(url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                           timeout=args.huge_timeout)
            out.append({"status": r.status_code, "json": r.headers.get("content-type", "").startswith("application/json"),
                        "seconds": round(time.monotonic() - t0, 2)})
        except httpx.HTTPError as exc:
            out.append({"status": describe_error(exc), "seconds": round(time.monotonic() - t0, 2)})

    g = threading.Thread(target=guard, daemon=True)
    g.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(args.huge)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.huge_timeout + 30)
    wall = time.monotonic() - t0
    time.sleep(2.0)  # what stays resident afterwards
    try:
        settled = None if killed.is_set() else rss(proc.pid)
    except psutil.Error:
        settled = None
    done.set()
    sampler.stop()
    peak = max([idle] + [b for _, b in sampler.samples])
    return {"requests": args.huge, "body_bytes": len(body), "statuses": dict(Counter(str(o["status"]) for o in out)),
            "all_json": all(o.get("json", False) for o in out), "rss_idle": idle, "rss_peak": peak,
            "rss_after": settled, "peak_over_idle_pct": round(100.0 * (peak - idle) / idle, 1),
            "wall_seconds": round(wall, 1), "killed_at_ceiling": killed.is_set(),
            "client_timeout": args.huge_timeout}


def run_sigterm(args, out: Path) -> dict:
    """A fresh server with online memory; a long stream, a queued request, then SIGTERM."""
    state = out / "sigterm-state"
    shutil.rmtree(state, ignore_errors=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ["--online", "memory", "--online-state", str(state)]
    if server_knows(args, "--drain-timeout"):
        extra += ["--drain-timeout", str(args.drain_timeout)]
    proc = start_server(args, port, out / "server-sigterm.log", drafter="suffix", extra=tuple(extra))
    res: dict = {"drain_timeout": args.drain_timeout if "--drain-timeout" in extra else None}
    try:
        wait_healthy(url, proc, args.startup_timeout)
        queued: dict = {}

        def queue_one() -> None:
            try:
                r = httpx.post(url + "/v1/chat/completions", json=chat_request(args, PROMPTS[1], 8), timeout=120)
                queued.update(status=r.status_code, json=r.headers.get("content-type", "").startswith("application/json"),
                              retry_after=r.headers.get("retry-after"), body=r.text[:200])
            except httpx.HTTPError as exc:
                queued.update(status=describe_error(exc))

        lines: list[str] = []
        with httpx.Client(base_url=url, timeout=120) as c:
            with c.stream("POST", "/v1/chat/completions",
                          json=chat_request(args, PROMPTS[0], args.sigterm_max_tokens, stream=True)) as r:
                it = r.iter_lines()
                lines += [next(line for line in it if line.startswith("data: "))]
                t = threading.Thread(target=queue_one)
                t.start()
                end = time.monotonic() + 60
                while httpx.get(url + "/health", timeout=10).json().get("queue_depth") != 1 and time.monotonic() < end:
                    time.sleep(0.05)
                t_sig = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                try:
                    lines += [line for line in it if line.startswith("data: ")]
                    ended = "error event" if lines and '"error"' in lines[-1] else ("[DONE]" if lines[-1] == "data: [DONE]" else "cut")
                except httpx.HTTPError as exc:
                    ended = f"cut ({describe_error(exc)})"
        t.join(120)
        code = proc.wait(120)
        res.update(stream_ended_with=ended, stream_chunks=len(lines), queued=queued, exit_code=code,
                   seconds_to_exit=round(time.monotonic() - t_sig, 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    res["state_on_disk"] = state.is_dir()
    try:
        from ltd.drafting.suffix import SuffixDrafter
        from ltd.online import OnlineAdapter

        adapter = OnlineAdapter(SuffixDrafter(), "memory")
        adapter.load_state(state)
        res["state_reloads"] = True
        res["state_memory_tokens"] = len(adapter.store)
    except Exception as exc:  # reported, not raised: this is the figure being measured
        res["state_reloads"] = False
        res["state_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return res


# -- report ------------------------------------------------------------------------


def mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def figures(res: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the report, in order; a missing phase gives no rows."""
    rows: list[tuple[str, str]] = []
    ph = res.get("phases", {})
    if "load" in ph:
        s, m = ph["load"]["summary"], ph["load"]["memory"]
        rows += [
            ("load: succeeded / total", f"{s['succeeded']} / {s['requests']}"),
            ("load: failed (anything but a 429)", str(s["failed"])),
            ("load: 429s (retried after Retry-After)", str(s["rejected_429"])),
            ("load: latency p50 / p95 (s) *", f"{s['latency_p50']} / {s['latency_p95']}"),
            ("load: latency incl. retries p50 / p95 (s) *", f"{s['latency_with_retries_p50']} / {s['latency_with_retries_p95']}"),
            ("load: time to first token p50 / p95 (s) *", f"{s['ttft_p50']} / {s['ttft_p95']}"),
            ("load: throughput (tokens/s) *", str(s["tokens_per_second"])),
            ("load: RSS before / after / peak", f"{mib(m['rss_before'])} / {mib(m['rss_after'])} / {mib(m['rss_peak'])}"),
            ("load: greedy outputs identical", "yes" if not s["prompts_with_differing_outputs"] else "NO"),
        ]
    if "burst" in ph:
        b = ph["burst"]
        rows += [("burst: statuses", ", ".join(f"{k}: {v}" for k, v in sorted(b["statuses"].items()))),
                 ("burst: Retry-After values (s)", f"{min(b['retry_after_values'])}..{max(b['retry_after_values'])}"
                  if b["retry_after_values"] else "none"),
                 ("burst: every answer JSON", "yes" if b["all_json"] else "no")]
    if "disconnects" in ph:
        d = ph["disconnects"]
        rows += [("disconnects: generations cancelled", f"{d['generations_cancelled']} / {d['disconnects']}"),
                 ("disconnects: worker idle again within (s, max) *", str(d["seconds_to_idle_max"])),
                 ("disconnects: lines in the server log", str(d["disconnect_log_lines"]))]
    if "huge" in ph:
        h = ph["huge"]
        rows += [(f"huge: statuses ({h['requests']} x {h['body_bytes'] / 2**20:.0f} MB, client timeout {h['client_timeout']:.0f} s)",
                  ", ".join(f"{k}: {v}" for k, v in sorted(h["statuses"].items()))),
                 ("huge: RSS idle / peak / 2 s after", f"{mib(h['rss_idle'])} / {mib(h['rss_peak'])} / {mib(h['rss_after'])}"),
                 ("huge: peak over idle", f"{h['peak_over_idle_pct']:+.1f}%" + (" (killed at the RSS ceiling)" if h["killed_at_ceiling"] else "")),
                 ("huge: wall time (s) *", str(h["wall_seconds"]))]
    if "sigterm" in ph:
        t = ph["sigterm"]
        q = t.get("queued", {})
        rows += [("sigterm: stream ended with", str(t.get("stream_ended_with"))),
                 ("sigterm: queued request got", f"{q.get('status')}" + (" JSON" if q.get("json") else "")
                  + (f", Retry-After {q['retry_after']}" if q.get("retry_after") else "")),
                 ("sigterm: exit code / seconds to exit", f"{t.get('exit_code')} / {t.get('seconds_to_exit')}"),
                 ("sigterm: online state on disk reloads", sigterm_state(t))]
    return rows


def sigterm_state(t: dict) -> str:
    if t.get("state_reloads"):
        return f"yes, {t.get('state_memory_tokens')} memory tokens"
    if not t.get("state_on_disk"):
        return "no: nothing was saved"
    return f"no ({t.get('state_error', '')[:80]})"


def write_report(path: Path, res: dict, before: dict | None) -> None:
    cfg, mach = res["config"], res["machine"]
    lines = [
        "# `ltd serve` load and fault test",
        "",
        f"Date {mach['date']}; CPU {mach['cpu_model']} ({mach['usable_cpus']} usable CPUs), {res.get('avx512', 'avx512 unknown')}; "
        f"torch {mach['torch']}, transformers {mach['transformers']}. **The machine is shared with other jobs (not quiet): "
        "figures marked * are timings and only indicative; status counts and RSS are what this report is about.**",
        "",
        f"Model `{cfg['model']}`, drafter `{cfg['drafter']}` (the SIGTERM phase: `suffix` with `--online memory`), method "
        f"`{cfg['method']}`, server `--threads {cfg['threads']}`, queue size {cfg['queue_size']}. Load: {cfg['clients']} clients x "
        f"{cfg['requests']} requests, max_tokens {cfg['max_tokens']}. Burst: {cfg['burst']} at once, max_tokens "
        f"{cfg['burst_max_tokens']}, no retries. Disconnects: {cfg['disconnects']} streams closed after the first chunk. Huge: "
        f"{cfg['huge']} parallel bodies of ~{cfg['huge_mb']} MB. SIGTERM: a stream of max_tokens {cfg['sigterm_max_tokens']} "
        "plus one queued request.",
        "",
    ]
    rows = figures(res)
    if before is not None:
        old = dict(figures(before))
        lines += [f"| figure | before ({before.get('label', 'before')}) | after ({res.get('label', 'after')}) |", "|---|---|---|"]
        lines += [f"| {k} | {old.get(k, 'n/a')} | {v} |" for k, v in rows]
    else:
        lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "Raw numbers in `results.json`" + (" (and the earlier run's in its own)." if before else "."), ""]
    path.write_text("\n".join(lines))


def avx512() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx512 unknown"
    return "with avx512" if "avx512" in flags else "no avx512"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--drafter", default="self")
    p.add_argument("--method", default="static", choices=["hf", "ar", "static"])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--phases", default="load,burst,disconnects,huge,sigterm", help="comma-separated, in this order")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=5, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--burst", type=int, default=30, help="requests released at once")
    p.add_argument("--burst-max-tokens", type=int, default=8)
    p.add_argument("--disconnects", type=int, default=10)
    p.add_argument("--disconnect-max-tokens", type=int, default=64)
    p.add_argument("--huge", type=int, default=20, help="parallel huge requests")
    p.add_argument("--huge-mb", type=int, default=20, help="size of each huge body (MB)")
    p.add_argument("--huge-timeout", type=float, default=120.0, help="client timeout of a huge request (s)")
    p.add_argument("--rss-ceiling-gib", type=float, default=8.0, help="kill the server above this RSS (protects the machine)")
    p.add_argument("--sigterm-max-tokens", type=int, default=400)
    p.add_argument("--drain-timeout", type=float, default=2.0, help="the SIGTERM server's --drain-timeout (if it has the flag)")
    p.add_argument("--queue-size", type=int, default=4, help="server queue; below --clients - 1 some requests get 429")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=300.0, help="server --timeout")
    p.add_argument("--time-limit", type=float, default=900.0, help="stop issuing load requests after this many seconds")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--label", default="this run", help="what this run measures (e.g. the commit), shown in the report")
    p.add_argument("--before", default=None, help="results.json of an earlier run to put beside this one")
    p.add_argument("--out", default="benchmarks/serve_load")
    p.add_argument("--render-only", action="store_true", help="rewrite OUT/report.md from OUT/results.json and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    out = Path(args.out)
    before = json.loads(Path(args.before).read_text()) if args.before else None
    if args.render_only:
        write_report(out / "report.md", json.loads((out / "results.json").read_text()), before)
        return 0
    if min(args.clients, args.requests, args.max_tokens, args.threads) < 1:
        p.error("--clients, --requests, --max-tokens and --threads must be at least 1")
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = set(phases) - {"load", "burst", "disconnects", "huge", "sigterm"}
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}")

    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    shared = [x for x in phases if x != "sigterm"]
    if shared:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = out / "server.log"
        proc = start_server(args, port, log_path)
        try:
            wait_healthy(url, proc, args.startup_timeout)
            for phase in shared:
                log.info("phase %s", phase)
                if proc.poll() is not None:
                    results[phase] = {"error": f"the server had exited with code {proc.returncode}"}
                elif phase == "load":
                    results[phase] = run_load(url, args, proc)
                elif phase == "burst":
                    results[phase] = run_burst(url, args)
                elif phase == "disconnects":
                    results[phase] = run_disconnects(url, args, log_path)
                else:
                    results[phase] = run_huge(url, args, proc)
                log.info("%s: %s", phase, json.dumps({k: v for k, v in results[phase].items()
                                                      if k not in ("requests", "responses", "memory")})[:600])
        finally:
            proc.kill()  # after the huge bodies an old server may be busy for minutes
            proc.wait(30)
    if "sigterm" in phases:
        log.info("phase sigterm")
        results["sigterm"] = run_sigterm(args, out)
        log.info("sigterm: %s", json.dumps(results["sigterm"])[:600])
    from ltd.bench.machine import machine_info

    machine = machine_info("float32", "cpu")
    machine["torch_threads"] = args.threads  # the server's setting, not this process's
    result = {"label": args.label, "config": vars(args), "machine": machine, "avx512": avx512(), "phases": results}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(out / "report.md", result, before)
    log.info("wrote %s and %s", out / "results.json", out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
