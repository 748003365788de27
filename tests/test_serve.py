"""The OpenAI-compatible server on a fake engine: fast and deterministic.

A byte-level fake tokenizer and an engine that replays a fixed reply a few bytes per
"cycle" (optionally sleeping between cycles) exercise everything that does not depend on
the model: OpenAI shapes, SSE, multi-byte characters split across cycles, stop strings,
400s that name the field, 429 with Retry-After, cancellation on disconnect, timeouts
and metrics. The real model is in ``test_serve_e2e.py``.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import argparse

import httpx
import openai
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ltd.cycle import CycleResult  # noqa: E402
from ltd.errors import LtdError  # noqa: E402
from ltd.serve import cli as serve_cli  # noqa: E402
from ltd.serve.app import create_app  # noqa: E402
from ltd.serve.background import BackgroundServer  # noqa: E402
from ltd.serve.metrics import ServerMetrics  # noqa: E402
from ltd.serve.schemas import param_from_loc  # noqa: E402
from ltd.serve.settings import ServeSettings  # noqa: E402
from ltd.serve.text import TextStream, partial_stop_length  # noqa: E402

MODEL = "fake-model"
EOS = 256
REPLY = "Héllo wörld 😀! Then STOP here, and more text after it."


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is EOS. Decoding a cut multi-byte character gives
    U+FFFD, as byte-level BPE tokenizers do."""

    chat_template = "fake"
    eos_token_id = EOS

    def __call__(self, text: str) -> dict:
        return {"input_ids": list(text.encode())}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class FakeEngine:
    """Replays ``reply`` (then EOS), ``per_cycle`` bytes per cycle, ``delay`` s per cycle."""

    def __init__(self, reply: str = REPLY, per_cycle: int = 1, delay: float = 0.0, max_context: int = 512) -> None:
        self.reply = list(reply.encode()) + [EOS]
        self.per_cycle = per_cycle
        self.delay = delay
        self.target = SimpleNamespace(tokenizer=ByteTokenizer(), eos_token_ids=[EOS])
        self.backend = SimpleNamespace(max_context=max_context, vocab_size=EOS + 1)
        self.prompt_tokenizer = None  # HF's tokenizer encodes, as on the hf backend
        self.cycles_run = 0
        self.methods: list[str] = []  # the method of every request, in order

    def stream(self, prompt, cfg):
        cfg.validate()
        self.methods.append(cfg.method)
        if cfg.seed is not None:  # as ltd.cycle seeds its sampler: out-of-range seeds raise here
            torch.Generator().manual_seed(cfg.seed)
        tokens = self.reply[: cfg.max_new_tokens]
        yield CycleResult(new_tokens=tokens[:1], cycle=0)
        i, cycle = 1, 1
        while i < len(tokens):
            time.sleep(self.delay)
            chunk = tokens[i : i + self.per_cycle]
            self.cycles_run += 1
            yield CycleResult(new_tokens=chunk, cycle=cycle, num_accepted=len(chunk) - 1)
            i += len(chunk)
            cycle += 1

    def generate(self, prompt, cfg):
        tokens = [t for r in self.stream(prompt, cfg) for t in r.new_tokens]
        return SimpleNamespace(tokens=tokens, seconds=0.0)


MAX_BATCH = 1  # decode threads of the servers this module starts (set by the max_batch fixture)


@pytest.fixture(autouse=True, scope="module", params=[1, 4], ids=["one-at-a-time", "max-batch-4"])
def max_batch(request):
    """Every test of this module runs twice: with one decode thread, and with four that
    decode concurrent requests together (``--max-batch 4``; the fake engine's stream
    stands in for the batched engine's, which tests/test_batching.py checks)."""
    global MAX_BATCH
    MAX_BATCH = request.param
    yield request.param
    MAX_BATCH = 1


def start_server(engine: FakeEngine, **settings) -> BackgroundServer:
    cfg = ServeSettings(model_name=MODEL, **{"method": "static", "timeout": 30.0, "queue_size": 4, "max_batch": MAX_BATCH, **settings})
    batch = SimpleNamespace(max_batch=MAX_BATCH, stream=engine.stream) if cfg.max_batch > 1 else None
    return BackgroundServer(create_app(engine, cfg, batch=batch)).start()


def worker_of(srv: BackgroundServer):
    return srv.app.state.worker


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def sse_events(lines) -> list:
    """The JSON payloads (and the literal "[DONE]") of an SSE stream's data lines."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def server(max_batch):
    srv = start_server(FakeEngine(max_context=256), max_tokens_limit=1000)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def chat(client, stream=False, **kwargs):
    body = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=200)
    body.update(kwargs)
    return client.chat.completions.create(stream=stream, **body)


# -- text: incremental detokenization and stop strings ------------------------------------


def byte_decode(ids) -> str:
    return ByteTokenizer().decode(ids)


def test_text_stream_never_emits_half_characters():
    data = list("é😀 a€b".encode())
    ts = TextStream(byte_decode)
    deltas = [ts.feed([b]) for b in data] + [ts.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "é😀 a€b"
    assert sum(1 for d in deltas if d) == 6  # one delta per complete character


def test_text_stream_cut_character_matches_plain_decode():
    data = list("ab😀".encode())[:-1]  # generation ended inside the emoji
    ts = TextStream(byte_decode)
    text = "".join(ts.feed([b]) for b in data) + ts.finish()
    assert text == byte_decode(data) and text.endswith("\ufffd")


def test_text_stream_stop_string_across_cycles_is_held_back_and_cut():
    ts = TextStream(byte_decode, stop=["STOP"])
    deltas = []
    for b in "abc STOP def".encode():
        deltas.append(ts.feed([b]))
        if ts.stopped:
            break
    assert ts.stopped and ts.text == "abc " and "".join(deltas) == "abc "
    assert not any("S" in d for d in deltas), "a possible stop prefix was streamed"


def test_text_stream_unfinished_stop_prefix_is_released_at_the_end():
    ts = TextStream(byte_decode, stop=["STOP"])
    text = "".join(ts.feed([b]) for b in "abc ST".encode())
    assert text == "abc "
    assert ts.finish() == "ST" and not ts.stopped


def test_partial_stop_length():
    assert partial_stop_length("hello wo", ["world"]) == 2
    assert partial_stop_length("hello", ["world", "lo!"]) == 2
    assert partial_stop_length("hello", ["xyz"]) == 0


def test_param_from_loc():
    assert param_from_loc(("body", "messages", 0, "content")) == "messages[0].content"
    assert param_from_loc(("body", "stop", "list[str]", 0)) == "stop"
    assert param_from_loc(("body", 12)) is None
    assert param_from_loc(("body",)) is None


def test_metrics_render_is_prometheus_text():
    m = ServerMetrics()
    m.record_request('/v1/"x"', 200, 0.3)
    m.record_generation("completed", 10, 20, 4, 20, 2.0, 0.1)
    text = m.render()
    assert 'ltd_requests_total{endpoint="/v1/\\"x\\"",status="200"} 1' in text
    assert "ltd_tokens_per_second 10" in text and "ltd_mean_accepted_length 5" in text
    assert 'ltd_request_duration_seconds_bucket{endpoint="/v1/\\"x\\"",le="+Inf"} 1' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.split(" ")) == 2, line


# -- ltd serve: flags are checked before any model loads ---------------------------------


def test_method_defaults_to_static_with_a_drafter_else_ar():
    assert serve_cli.resolve_method("some/model", "self", None) == ("static", "self")
    assert serve_cli.resolve_method("some/model", "none", None) == ("ar", "none")
    assert serve_cli.resolve_method("some/model", None, None) == ("ar", "none")  # no registry drafter
    assert serve_cli.resolve_method("some/model", "self", "hf") == ("hf", "none")  # drafter not loaded
    with pytest.raises(LtdError, match="needs a drafter"):
        serve_cli.resolve_method("some/model", "none", "static")


@pytest.mark.parametrize("flags,match", [
    (["--queue-size", "-1"], "--queue-size"),
    (["--timeout", "0"], "--timeout"),
    (["--max-tokens-limit", "0"], "--max-tokens-limit"),
    (["--default-max-tokens", "5000"], "--default-max-tokens"),
    (["--size", "0"], "size"),
    (["--drain-timeout", "-1"], "--drain-timeout"),
    (["--save-every", "-5"], "--save-every"),
    (["--max-body-bytes", "10"], "--max-body-bytes"),
    (["--api-key", " "], "--api-key"),
])
def test_bad_serve_flags_are_one_line_errors(flags, match):
    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--drafter", "self", *flags])
    assert args.func is serve_cli.run
    with pytest.raises(LtdError, match=match):
        serve_cli.settings_from_args(args, "static")


# -- the HTTP API on the fake engine ---------------------------------------------------


def test_chat_stream_equals_non_stream_with_multibyte_and_stop(client):
    full = chat(client)
    assert full.choices[0].message.content == REPLY and full.choices[0].finish_reason == "stop"
    assert full.usage.completion_tokens == len(REPLY.encode()) + 1  # EOS counts, as in `ltd generate`

    stopped = chat(client, stop=["STOP", "zzz"])
    assert stopped.choices[0].message.content == REPLY[: REPLY.index("STOP")]
    assert stopped.choices[0].finish_reason == "stop"

    chunks = list(chat(client, stream=True, stop=["STOP", "zzz"], stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == stopped.choices[0].message.content
    assert all("\ufffd" not in d for d in deltas)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == stopped.usage.completion_tokens


def test_completions_stream_and_not(client):
    res = client.completions.create(model=MODEL, prompt="x", max_tokens=5, temperature=0)
    assert res.choices[0].text == REPLY.encode()[:5].decode() and res.choices[0].finish_reason == "length"
    assert res.usage.prompt_tokens == 1 and res.usage.completion_tokens == 5
    parts = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt=[120], max_tokens=5, stream=True)]
    assert "".join(parts) == res.choices[0].text


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    chat(client, max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in ("ltd_requests_total", "ltd_generated_tokens_total", "ltd_tokens_per_second", "ltd_mean_accepted_length",
                 "ltd_cycles_total", "ltd_queue_depth", "ltd_time_to_first_token_seconds_count"):
        assert f"\n{name}" in text, name
    assert 'ltd_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


CHAT = "/v1/chat/completions"
BAD_REQUESTS = [
    # (path, raw body or JSON, expected param, expected code or None)
    (CHAT, b"{not json", None, "invalid_json"),
    (CHAT, b"[1, 2]", None, "invalid_body"),
    (CHAT, {"model": MODEL}, "messages", "missing_required_parameter"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}]}, "model", "missing_required_parameter"),
    (CHAT, {"model": MODEL, "messages": "hi"}, "messages", None),
    (CHAT, {"model": MODEL, "messages": []}, "messages", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "16"}, "max_tokens", "invalid_type"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}, "max_tokens", "invalid_type"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, "max_tokens", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 100000},
     "max_completion_tokens", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 600}, "max_tokens",
     "context_length_exceeded"),
    (CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, "model", "model_not_found"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": "high"}, "top_p", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, "n", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "seed": "1"}, "seed", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "presence_penalty": 1.0}, "presence_penalty", None),
    ("/v1/completions", {"model": MODEL}, "prompt", "missing_required_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": [100000]}, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, "echo", None),
]


@pytest.mark.parametrize("path,body,param,code", BAD_REQUESTS, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_REQUESTS)])
def test_bad_requests_are_400_naming_the_field(server, path, body, param, code):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = httpx.post(server.url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def test_wrong_content_type_and_unknown_route(server):
    r = httpx.post(server.url + CHAT, content=b'{"model": "x"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + CHAT)
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["param"] == "model"


# -- concurrency: queue, 429, disconnects, timeouts --------------------------------------


def test_queue_full_gives_429_with_retry_after_and_disconnect_cancels():
    engine = FakeEngine(reply="a" * 400, delay=0.02)
    srv = start_server(engine, queue_size=1)
    worker = worker_of(srv)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "temperature": 0}
    try:
        with httpx.Client(base_url=srv.url, timeout=30, limits=httpx.Limits(max_connections=MAX_BATCH + 1)) as c1:
            # A: long streams, one per decode thread; headers arrive with the first text, so they are decoding now.
            streams_a = [c1.send(c1.build_request("POST", CHAT, json={**body, "stream": True}), stream=True) for _ in range(MAX_BATCH)]
            assert all(resp.status_code == 200 for resp in streams_a)
            wait_until(lambda: len(worker._active) == MAX_BATCH, what="A decoding")
            # B: waits in the queue (the only slot).
            result_b = {}
            t_b = threading.Thread(
                target=lambda: result_b.setdefault("r", httpx.post(srv.url + CHAT, json={**body, "max_tokens": 3}, timeout=30))
            )
            t_b.start()
            wait_until(lambda: worker.queue_depth() == 1, what="B queued")
            # C: no room.
            r_c = httpx.post(srv.url + CHAT, json=body)
            assert r_c.status_code == 429
            assert int(r_c.headers["Retry-After"]) >= 1
            assert r_c.json()["error"]["code"] == "queue_full"
            oc = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                oc.chat.completions.create(**body)
            # A's clients go away: their generations are cancelled between cycles, B runs.
            cycles_before = engine.cycles_run
            for resp in streams_a:
                resp.close()
        wait_until(lambda: worker.cancelled == MAX_BATCH, what="A cancelled")
        t_b.join(30)
        assert result_b["r"].status_code == 200 and result_b["r"].json()["choices"][0]["message"]["content"] == "aaa"
        assert engine.cycles_run - cycles_before < 250 * MAX_BATCH, "the disconnected streams kept decoding"
        metrics = httpx.get(srv.url + "/metrics").text
        assert "ltd_requests_rejected_total 2" in metrics
        assert f'ltd_generations_total{{outcome="cancelled"}} {MAX_BATCH}' in metrics
        assert f"ltd_max_batch {MAX_BATCH}" in metrics
    finally:
        srv.stop()


def test_non_streaming_disconnect_cancels():
    engine = FakeEngine(reply="b" * 400, delay=0.02)
    srv = start_server(engine)
    worker = worker_of(srv)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 300}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + CHAT, json=body, timeout=0.5)
        wait_until(lambda: worker.cancelled == 1 and not worker.busy, timeout=5, what="cancellation")
        assert engine.cycles_run < 250
    finally:
        srv.stop()


def test_request_timeout_non_stream_and_stream():
    engine = FakeEngine(reply="c" * 400, delay=0.02)
    srv = start_server(engine, timeout=0.4)
    worker = worker_of(srv)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 300}
        r = httpx.post(srv.url + CHAT, json=body, timeout=10)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", srv.url + CHAT, json={**body, "stream": True}, timeout=10) as resp:
            assert resp.status_code == 200
            events = sse_events(resp.iter_lines())
        assert events[-1]["error"]["code"] == "timeout" and "[DONE]" not in events
        assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events[:-1])
        wait_until(lambda: worker.timeouts == 2 and not worker.busy, timeout=5, what="both timeouts counted")
        oc = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError):
            for _ in oc.chat.completions.create(**body, stream=True):
                pass
    finally:
        srv.stop()


def test_hf_method_answers_in_one_piece():
    if MAX_BATCH > 1:  # transformers' generate runs its own loop: it cannot share forwards
        with pytest.raises(LtdError, match="--method hf runs its own decoding loop and cannot batch"):
            start_server(FakeEngine(), method="hf")
        return
    srv = start_server(FakeEngine(), method="hf")
    try:
        oc = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        chunks = list(chat(oc, stream=True, stop="STOP"))
        texts = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
        assert texts == [REPLY[: REPLY.index("STOP")]]
        assert chat(oc, stop="STOP").choices[0].message.content == texts[0]
    finally:
        srv.stop()
