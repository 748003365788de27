#!/usr/bin/env python
"""Bounded load test of ``ltd serve`` on loopback.

Starts the server as a subprocess on a free loopback port, runs N concurrent clients x M
requests each (chat completions, greedy, alternating streamed and non-streamed), and
writes ``results.json`` and ``results.md``: p50/p95 latency, time to first token,
tokens/s, the number of 429s (clients honour Retry-After and retry, so with a queue
smaller than the client count some are expected) and of failures (anything else), and
the server's RSS before and after (psutil) with the peak in between. It stops by
itself: after the requests, or at --time-limit, whichever comes first; the server is
always terminated.

Greedy requests for the same prompt must return the same text whether streamed or not
and whichever client sent them; the report counts prompts that did not.

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
import threading
import time
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
            self._stop.wait(RSS_SAMPLE_SECONDS)

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


def start_server(args, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "ltd.serve",
        "--model", args.model, "--drafter", args.drafter, "--method", args.method,
        "--depth", str(args.depth), "--topk", str(args.topk), "--size", str(args.size),
        "--host", "127.0.0.1", "--port", str(port),
        "--queue-size", str(args.queue_size), "--timeout", str(args.request_timeout),
        "--threads", str(args.threads), "--no-access-log",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
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


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


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


def write_markdown(path: Path, res: dict) -> None:
    s, m, cfg, mach = res["summary"], res["memory"], res["config"], res["machine"]
    mb = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines = [
        "# `ltd serve` load test",
        "",
        f"Date {mach['date']}; CPU {mach['cpu_model']} ({mach['usable_cpus']} usable CPUs, shared with other jobs); "
        f"torch {mach['torch']}, transformers {mach['transformers']}.",
        "",
        f"Model `{cfg['model']}`, drafter `{cfg['drafter']}`, method `{cfg['method']}` "
        f"(depth {cfg['depth']}, topk {cfg['topk']}, size {cfg['size']}), {cfg['threads']} torch thread(s); "
        f"{cfg['clients']} concurrent clients x {cfg['requests']} requests, max_tokens {cfg['max_tokens']}, greedy, "
        f"every other request streamed; server queue size {cfg['queue_size']} (clients retry 429s after Retry-After).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests succeeded / total | {s['succeeded']} / {s['requests']} |",
        f"| failed (anything but a 429) | {s['failed']} |",
        f"| 429 responses (retried) | {s['rejected_429']} |",
        f"| latency p50 / p95 (s, queue wait + generation) | {s['latency_p50']} / {s['latency_p95']} |",
        f"| latency incl. 429 retries p50 / p95 (s) | {s['latency_with_retries_p50']} / {s['latency_with_retries_p95']} |",
        f"| time to first token p50 / p95 (s, streamed) | {s['ttft_p50']} / {s['ttft_p95']} |",
        f"| throughput (completion tokens / wall s) | {s['tokens_per_second']} tokens/s over {s['wall_seconds']} s |",
        f"| server decode speed (metrics) | {res['server_metrics'].get('ltd_tokens_per_second')} tokens/s |",
        f"| mean accepted length (metrics) | {res['server_metrics'].get('ltd_mean_accepted_length')} tokens/cycle |",
        f"| server RSS before / after / peak | {mb(m['rss_before'])} / {mb(m['rss_after'])} / {mb(m['rss_peak'])} |",
        f"| RSS growth: whole run / after the first quarter | {m['rss_growth_mib']:+.1f} MiB / "
        f"{steady_growth_mib(m):+.1f} MiB |",
        f"| greedy outputs identical across clients and stream modes | "
        f"{'yes' if not s['prompts_with_differing_outputs'] else 'NO: prompts ' + str(s['prompts_with_differing_outputs'])} |",
        "",
        f"Stopped by: {res['stopped_by']}. Raw numbers in `results.json`.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--drafter", default="self")
    p.add_argument("--method", default="static", choices=["hf", "ar", "static"])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=5, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--queue-size", type=int, default=4, help="server queue; below --clients - 1 some requests get 429")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=300.0, help="server --timeout")
    p.add_argument("--time-limit", type=float, default=900.0, help="stop issuing requests after this many seconds")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", default="benchmarks/serve_load")
    p.add_argument("--render-only", action="store_true", help="rewrite OUT/results.md from OUT/results.json and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.render_only:
        write_markdown(Path(args.out) / "results.md", json.loads((Path(args.out) / "results.json").read_text()))
        return 0
    if min(args.clients, args.requests, args.max_tokens, args.threads) < 1:
        p.error("--clients, --requests, --max-tokens and --threads must be at least 1")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port, out / "server.log")
    stopped_by = "all requests done"
    try:
        wait_healthy(url, proc, args.startup_timeout)
        # One request first, so that "before" is the memory of a server that has served.
        httpx.post(url + "/v1/chat/completions", timeout=args.request_timeout,
                   json={"model": args.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
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
        if time.monotonic() > deadline:
            stopped_by = f"time limit ({args.time_limit:.0f} s)"
        time.sleep(1.0)  # let the worker settle before the last memory reading
        rss_after = rss(proc.pid)
        sampler.stop()
        server_metrics = scrape_metrics(url)
    finally:
        code = stop_server(proc)
    from ltd.bench.machine import machine_info

    machine = machine_info("float32", "cpu")
    machine["torch_threads"] = args.threads  # the server's setting, not this process's
    summary = summarize(results, wall)
    peak = max([rss_after, rss_before] + [b for _, b in sampler.samples])
    result = {
        "config": vars(args),
        "machine": machine,
        "summary": summary,
        "memory": {
            "rss_before": rss_before,
            "rss_after": rss_after,
            "rss_peak": peak,
            "rss_growth_mib": round((rss_after - rss_before) / 2**20, 2),
            "timeline": sampler.samples[:: max(1, len(sampler.samples) // 200)],
        },
        "server_metrics": server_metrics,
        "server_exit_code": code,
        "stopped_by": stopped_by,
        "requests": [{k: v for k, v in asdict(r).items() if k != "text"} | {"text_chars": len(r.text)} for r in
                     sorted(results, key=lambda r: (r.client, r.index))],
    }
    result["memory"]["rss_growth_after_first_quarter_mib"] = round(steady_growth_mib(result["memory"]), 2)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out / "results.md", result)
    log.info("summary: %s", json.dumps(summary))
    log.info("RSS before %.1f MiB, after %.1f MiB, peak %.1f MiB", rss_before / 2**20, rss_after / 2**20, peak / 2**20)
    log.info("wrote %s and %s", out / "results.json", out / "results.md")
    return 0 if summary["failed"] == 0 and not summary["prompts_with_differing_outputs"] else 1


if __name__ == "__main__":
    sys.exit(main())
