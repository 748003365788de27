"""``ltd bench-load``: statistics on hand-made records, configuration parsing, the streaming
client against a scripted transport, the server subprocess' lifecycle on a stand-in
server, and one end-to-end run against ``ltd serve`` on the embedded model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from ltd import cli
from ltd.bench import load_server
from ltd.bench.load import RequestRecord, run_level, run_load, send_chat
from ltd.bench.load_cli import _sigterm_interrupts, config_from_args
from ltd.bench.load_config import LoadConfig, ServerConfig, builtin_configs, load_workload, parse_configs, parse_shape
from ltd.bench.load_report import level_summary, percentile, render_load_markdown, results_document, with_ratios
from ltd.bench.load_server import ServerProcess, free_port
from ltd.errors import LtdError
from ltd.machine import cpu_model


def record(latency: float, ttft: float | None = None, tokens: int = 10, error: str | None = None) -> dict:
    return {"key": "q", "start": 0.0, "latency": latency, "ttft": ttft, "completion_tokens": tokens, "error": error}


# -- statistics --------------------------------------------------------------------------


def test_percentiles_interpolate_linearly():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_level_summary_counts_only_successful_requests():
    records = [record(1.0, 0.1, 10), record(2.0, 0.3, 20), record(3.0, None, 0), record(4.0, 0.5, 30),
               record(9.0, None, 0, error="HTTP 429: queue full")]
    s = level_summary(records, wall=5.0, concurrency=4, peak_rss_bytes=300 * 1024 * 1024)
    assert (s["requests"], s["ok"], s["errors"]) == (5, 4, 1)
    assert s["completion_tokens"] == 60
    assert s["tokens_per_second"] == 12.0
    assert s["requests_per_second"] == 0.8
    assert s["latency_p50"] == 2.5  # the failed request's 9 s is not a latency
    assert s["latency_p95"] == pytest.approx(3.85)
    assert s["ttft_p50"] == pytest.approx(0.3)  # the request without text has no TTFT
    assert s["ttft_p95"] == pytest.approx(0.48)
    assert s["peak_rss_mib"] == 300.0
    assert s["error_kinds"] == ["HTTP 429: queue full"]
    assert s["concurrency"] == 4 and len(s["records"]) == 5


def test_level_summary_of_only_failures_has_no_latency():
    s = level_summary([record(1.0, error="boom")], wall=2.0, concurrency=1, peak_rss_bytes=0)
    assert s["ok"] == 0 and s["tokens_per_second"] == 0.0 and s["latency_p50"] is None and s["ttft_p95"] is None


def _config(name: str, levels: list[tuple[int, float, float]]) -> dict:
    """A measured configuration with (concurrency, tokens/s, p95 latency) levels."""
    return {"name": name, "args": [], "command": f"ltd serve {name}", "levels": [
        {"concurrency": c, "tokens_per_second": tps, "latency_p95": p95} for c, tps, p95 in levels]}


def test_ratios_are_against_serial_at_the_same_concurrency():
    serial = _config("serial", [(1, 10.0, 2.0), (4, 12.0, 8.0)])
    batched = _config("batched-ar", [(1, 9.0, 2.5), (4, 36.0, 3.0), (8, 40.0, 5.0)])
    out = with_ratios([batched, serial])
    b = {lv["concurrency"]: lv for lv in out[0]["levels"]}
    assert b[1]["throughput_ratio"] == pytest.approx(0.9) and b[1]["p95_latency_ratio"] == pytest.approx(1.25)
    assert b[4]["throughput_ratio"] == pytest.approx(3.0) and b[4]["p95_latency_ratio"] == pytest.approx(0.375)
    assert b[8]["throughput_ratio"] is None and b[8]["p95_latency_ratio"] is None  # serial did not run 8
    assert [lv["throughput_ratio"] for lv in out[1]["levels"]] == [1.0, 1.0]
    assert "throughput_ratio" not in batched["levels"][0]  # the input is left alone


def test_ratios_without_serial_are_none():
    out = with_ratios([_config("fast", [(1, 10.0, 2.0)])])
    assert out[0]["levels"][0]["throughput_ratio"] is None


def test_report_names_the_cpu_and_every_level(tmp_path):
    cfg = LoadConfig(configs=[ServerConfig("serial"), ServerConfig("fast", ("--method", "ar"))], concurrency=(1, 2),
                     threads=1, limit=1)
    serial = {"name": "serial", "args": [], "command": "ltd serve", "levels": [
        level_summary([record(2.0, 0.5, 16)], 2.0, 1, 500 * 1024 * 1024)]}
    fast = {"name": "fast", "args": ["--method", "ar"], "command": "ltd serve --method ar",
            "levels": [level_summary([record(1.0, 0.2, 16)], 1.0, 1, 400 * 1024 * 1024)]}
    broken = {"name": "broken", "args": [], "command": "ltd serve --x", "levels": [], "error": "exited with status 2"}
    doc = results_document(cfg, 9, [serial, fast, broken], "2026-01-01T00:00:00+00:00")
    md = render_load_markdown(doc)
    assert cpu_model() in md and "server threads: 1" in md and "2026-01-01" in md
    assert "| fast | 1 | 1 / 1 | 16.0 | 1.00 | 1.00 | 1.00 | 0.20 | 0.20 | 400 | 2.00x | 0.50x |" in md
    assert "| serial | 1 | 1 / 1 | 8.0 | 0.50 | 2.00 | 2.00 | 0.50 | 0.50 | 500 | 1.00x | 1.00x |" in md
    assert "broken: `ltd serve --x` (**failed**: exited with status 2)" in md
    assert doc["machine"]["cpu_model"] == cpu_model() and doc["baseline"] == "serial"
    json.dumps(doc, allow_nan=False)


# -- configurations ----------------------------------------------------------------------


def test_builtin_configs_name_the_four_servers():
    b = builtin_configs((3, 8, 16), max_batch=4)
    assert list(b) == ["serial", "batched-ar", "batched-static", "batched-ltd"]
    assert b["serial"].args == ()
    assert b["batched-ar"].args == ("--max-batch", "4", "--method", "ar")
    assert b["batched-static"].args == ("--max-batch", "4", "--method", "static", "--depth", "3", "--topk", "8", "--size", "16")
    assert b["batched-ltd"].args == ("--max-batch", "4", "--method", "ltd")


def test_parse_configs_takes_builtins_and_named_arguments():
    got = parse_configs(["serial", "spec=--method static --depth 3", "plain=", "q=--model-name 'a b'"], builtin_configs())
    assert got == [ServerConfig("serial"), ServerConfig("spec", ("--method", "static", "--depth", "3")),
                   ServerConfig("plain", ()), ServerConfig("q", ("--model-name", "a b"))]
    assert got[1].command == "ltd serve --method static --depth 3"


@pytest.mark.parametrize("items, message", [
    (["nope"], "not a built-in configuration"),
    (["bad name=--method ar"], "a name is letters"),
    (["=--method ar"], "a name is letters"),
    (["a=--method ar", "a=--method static"], "names a more than once"),
    (["serial", "serial"], "names serial more than once"),
    (["a=--port 9"], "sets --port on every server itself; drop it"),
    (["a=--threads=2"], "use ltd bench-load --threads instead"),
    (["a=--method 'ar"], "check its quotes"),
    ([], "--configs is empty"),
])
def test_parse_configs_rejects_bad_input(items, message):
    with pytest.raises(LtdError, match=message):
        parse_configs(items, builtin_configs())


def test_parse_shape():
    assert parse_shape("3x8x16") == (3, 8, 16)
    for bad in ("3x8", "0x8x1", "axbxc", ""):
        with pytest.raises(LtdError, match="DxKxV"):
            parse_shape(bad)


@pytest.mark.parametrize("flags, message", [
    (["--concurrency", "1,0"], "--concurrency needs positive integers"),
    (["--concurrency", "2,2"], "lists a level twice"),
    (["--concurrency", "a"], "comma-separated integers"),
    (["--requests", "0"], "--requests must be at least 1"),
    (["--time-limit", "0"], "--time-limit must be a positive number"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--server-args", "--host 0.0.0.0"], "--server-args: ltd bench-load sets --host"),
    (["--suites", "nope"], "unknown suite"),
])
def test_cli_flags_are_checked_before_any_server(flags, message):
    args = cli.build_parser().parse_args(["bench-load", "--out", "x", *flags])
    with pytest.raises(LtdError, match=message):
        config_from_args(args)


def test_cli_defaults_run_the_four_servers_on_mixed():
    cfg = config_from_args(cli.build_parser().parse_args(["bench-load", "--out", "x", "--static-shape", "2x4x6"]))
    assert [c.name for c in cfg.configs] == ["serial", "batched-ar", "batched-static", "batched-ltd"]
    assert cfg.configs[2].args[-6:] == ("--depth", "2", "--topk", "4", "--size", "6")
    assert cfg.concurrency == (1, 2, 4, 8) and cfg.suites == ("mixed",)


def test_workload_keeps_every_turn_of_multiturn_only():
    work = load_workload(["mixed"], limit=1, seed=0)
    assert len(work) == 9
    turns = {key.split("/")[0]: t for key, t in work}
    assert len(turns["multiturn"]) >= 2 and all(len(t) == 1 for s, t in turns.items() if s != "multiturn")
    assert load_workload(["mixed"], 1, 0) == work and load_workload(["mixed"], 1, 1) != work


# -- the streaming client, against a scripted transport ------------------------------------


def _chunk(content: str | None = None, usage: dict | None = None) -> bytes:
    body: dict = {"choices": [] if usage else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


class FakeServer:
    """Answers chat completions like ltd serve's stream; records what it was sent."""

    def __init__(self, delay: float = 0.0, fail: dict[int, str] | None = None) -> None:
        self.delay = delay
        self.fail = fail or {}  # request number -> "http" | "stream" | "truncated"
        self.bodies: list[dict] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        mode = self.fail.get(len(self.bodies))
        if mode == "http":
            return httpx.Response(429, json={"error": {"message": "the queue is full"}})

        async def events():
            yield _chunk("")  # the role chunk carries no text
            await asyncio.sleep(self.delay)
            yield _chunk("Hello")
            if mode == "stream":
                yield b'data: {"error": {"message": "timed out"}}\n\n'
                return
            yield _chunk(" world")
            if mode == "truncated":
                return
            yield _chunk(usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle), base_url="http://test")


async def _one(server: FakeServer) -> tuple[RequestRecord, str]:
    async with server.client() as client:
        return await send_chat(client, "m", [{"role": "user", "content": "hi"}], 8, "k", time.perf_counter())


def test_send_chat_measures_ttft_tokens_and_text():
    server = FakeServer(delay=0.05)
    rec, text = asyncio.run(_one(server))
    assert rec.ok and text == "Hello world" and rec.completion_tokens == 3
    assert 0.05 <= rec.ttft <= rec.latency
    sent = server.bodies[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["temperature"] == 0 and sent["max_tokens"] == 8 and sent["model"] == "m"


@pytest.mark.parametrize("mode, error", [
    ("http", "HTTP 429: the queue is full"),
    ("stream", "stream error: timed out"),
    ("truncated", "the stream ended without [DONE]"),
])
def test_send_chat_records_failures(mode, error):
    rec, _ = asyncio.run(_one(FakeServer(fail={1: mode})))
    assert rec.error == error and not rec.ok and rec.completion_tokens == 0


def test_send_chat_records_a_refused_connection():
    async def go():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}") as client:
            return await send_chat(client, "m", [{"role": "user", "content": "hi"}], 8, "k", time.perf_counter())

    rec, _ = asyncio.run(go())
    assert rec.error.startswith("ConnectError")


def _level(server: FakeServer, workload, concurrency: int, requests: int, time_limit: float = 60.0) -> dict:
    async def go():
        async with server.client() as client:
            return await run_level(client, "m", workload, concurrency, requests, time_limit, 8, lambda: 1024 * 1024)

    return asyncio.run(go())


def test_level_sends_the_bounded_count_and_follows_conversations():
    server = FakeServer(delay=0.01)
    workload = [("a/1", ("first?",)), ("multiturn/2", ("write it", "now shorter"))]
    lv = _level(server, workload, concurrency=2, requests=5)
    assert lv["requests"] == 5 and lv["ok"] == 5 and lv["completion_tokens"] == 15
    assert lv["peak_rss_mib"] == 1.0
    second_turns = [b["messages"] for b in server.bodies if len(b["messages"]) == 3]
    assert second_turns and second_turns[0] == [{"role": "user", "content": "write it"},
                                                {"role": "assistant", "content": "Hello world"},
                                                {"role": "user", "content": "now shorter"}]
    keys = sorted(r["key"] for r in lv["records"])
    assert "multiturn/2/turn2" in keys and keys.count("a/1") >= 1


def test_level_stops_sending_at_the_time_limit():
    lv = _level(FakeServer(delay=0.1), [("a/1", ("q",))], concurrency=1, requests=1000, time_limit=0.25)
    assert 2 <= lv["requests"] <= 4 and lv["ok"] == lv["requests"]


def test_a_failed_turn_ends_its_conversation():
    server = FakeServer(fail={1: "http"})
    lv = _level(server, [("multiturn/1", ("one", "two"))], concurrency=1, requests=3)
    assert [r["error"] is None for r in lv["records"]] == [False, True, True]
    assert [len(b["messages"]) for b in server.bodies] == [1, 1, 3]  # the failed first turn was not followed up


# -- the server subprocess, with a stand-in server -------------------------------------------

STAND_IN = """
import http.server, signal, sys, time
if sys.argv[2] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[2] == "exit":
    print("error: unrecognized arguments: --max-batch 8", flush=True)
    sys.exit(2)
if sys.argv[2] == "slow":
    time.sleep(60)
if sys.argv[2] == "env":
    import os
    print("OMP", os.environ.get("OMP_NUM_THREADS"), "KEY", os.environ.get("LTD_API_KEY"), flush=True)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def _stand_in(tmp_path: Path, mode: str, timeout: float = 20.0, env: dict | None = None) -> ServerProcess:
    port = free_port()
    return ServerProcess("stand-in", [sys.executable, "-c", STAND_IN, str(port), mode], port, tmp_path / "s.log", timeout, env)


def test_server_process_waits_for_health_and_stops(tmp_path):
    server = _stand_in(tmp_path, "serve")
    with server:
        assert httpx.get(server.base_url + "/health").status_code == 200
        assert server.rss_bytes() > 1024 * 1024
        pid = server.pid
    assert server.proc.returncode is not None and not psutil.pid_exists(pid)
    assert server.rss_bytes() == 0


def test_server_process_environment_sets_threads_and_hides_the_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LTD_API_KEY", "secret")  # the bench's clients send no key
    with _stand_in(tmp_path, "env", env={"OMP_NUM_THREADS": "3"}) as server:
        pass
    assert server.last_log_line() == "OMP 3 KEY None"


def test_server_process_kills_a_server_that_ignores_sigterm(tmp_path, monkeypatch):
    monkeypatch.setattr(load_server, "STOP_SECONDS", 0.5)
    server = _stand_in(tmp_path, "ignore-term")
    with server:
        pass
    assert server.proc.returncode == -9


def test_server_process_stops_on_an_exception_in_the_block(tmp_path):
    server = _stand_in(tmp_path, "serve")
    with pytest.raises(RuntimeError), server:
        raise RuntimeError("client crashed")
    assert server.proc.returncode is not None


def test_server_that_exits_early_is_a_clear_error(tmp_path):
    with pytest.raises(LtdError, match=r"exited with status 2 before it was ready \(error: unrecognized arguments: --max-batch 8\)"):
        with _stand_in(tmp_path, "exit"):
            pass


def test_server_that_never_answers_times_out_and_is_stopped(tmp_path):
    server = _stand_in(tmp_path, "slow", timeout=0.5)
    with pytest.raises(LtdError, match="did not answer /health within 0.5 s; .* raise --startup-timeout"):
        with server:
            pass
    assert server.proc.returncode is not None


def test_run_load_records_a_server_that_fails_and_writes_the_report(tmp_path, monkeypatch):
    def argv(model, port, threads, queue, extra):
        return [sys.executable, "-c", STAND_IN, str(port), "exit"]

    monkeypatch.setattr("ltd.bench.load.serve_argv", argv)
    cfg = LoadConfig(configs=[ServerConfig("batched-ar", ("--max-batch", "8"))], concurrency=(1,), requests=1, limit=1)
    doc = run_load(cfg, tmp_path)
    assert "exited with status 2" in doc["configs"][0]["error"] and doc["configs"][0]["levels"] == []
    assert json.loads((tmp_path / "results.json").read_text())["configs"][0]["error"] == doc["configs"][0]["error"]
    assert "**failed**" in (tmp_path / "report.md").read_text()


def test_a_server_that_is_not_ltd_serve_is_a_recorded_error(tmp_path, monkeypatch):
    monkeypatch.setattr("ltd.bench.load.serve_argv", lambda model, port, *a: [sys.executable, "-c", STAND_IN, str(port), "serve"])
    doc = run_load(LoadConfig(configs=[ServerConfig("x")], concurrency=(1,), requests=1, limit=1), tmp_path)
    assert "did not list its model on /v1/models (HTTPStatusError" in doc["configs"][0]["error"]
    assert "server_pid" not in doc["configs"][0]


def test_ctrl_c_stops_the_server_and_keeps_the_results(tmp_path, monkeypatch):
    started: list[ServerProcess] = []

    def argv(model, port, threads, queue, extra):
        return [sys.executable, "-c", STAND_IN, str(port), "serve"]

    async def interrupted(cfg, server, workload, on_level):
        started.append(server)
        on_level(level_summary([record(1.0, 0.5, 8)], 1.0, 1, 0))
        raise KeyboardInterrupt

    monkeypatch.setattr("ltd.bench.load.serve_argv", argv)
    monkeypatch.setattr("ltd.bench.load._run_levels", interrupted)
    cfg = LoadConfig(configs=[ServerConfig("a"), ServerConfig("b")], concurrency=(1, 2), requests=1, limit=1)
    doc = run_load(cfg, tmp_path)
    assert doc["interrupted"] and [c["name"] for c in doc["configs"]] == ["a"]
    assert len(started) == 1 and started[0].proc.returncode is not None
    assert not psutil.pid_exists(started[0].pid)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["interrupted"] and saved["configs"][0]["levels"][0]["ok"] == 1
    assert "Interrupted" in (tmp_path / "report.md").read_text()


def test_sigterm_interrupts_the_bench_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), _sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


# -- end to end ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_bench_load_against_ltd_serve(tmp_path, capsys):
    """The real thing: ltd serve on the embedded model, streamed requests at 1 and 2 clients."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    argv = ["bench-load", "--configs", "ar=--method ar", "--concurrency", "1,2", "--requests", "2", "--max-tokens", "8",
            "--threads", "1", "--limit", "1", "--no-warmup", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    (server,) = doc["configs"]
    assert server["name"] == "ar" and "error" not in server
    assert [lv["concurrency"] for lv in server["levels"]] == [1, 2]
    for lv in server["levels"]:
        assert lv["requests"] == 2 and lv["ok"] == 2 and lv["errors"] == 0
        assert all(0 < r["completion_tokens"] <= 8 and r["ttft"] is not None for r in lv["records"])
        assert lv["tokens_per_second"] > 0 and lv["latency_p95"] >= lv["latency_p50"] > 0
        assert lv["peak_rss_mib"] > 100  # a loaded model
    assert not psutil.pid_exists(server["server_pid"])
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    report = (tmp_path / "report.md").read_text()
    assert cpu_model() in report and "| ar | 2 | 2 / 2 |" in report
    assert "wrote" in capsys.readouterr().out
