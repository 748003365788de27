"""The server against an adversarial client, on the fake engine of ``test_serve.py``.

Every test here failed on the server before its hardening: request bodies that gave
500s (seeds out of range, lone surrogates, anything hypothesis finds), no body limit,
tokenizing before the queue, metrics filing a 500 under 499, a constant Retry-After,
any Host header served, no API key, docs always on, no log of a disconnect, echoed
values sent back whole, and a shutdown that cut streams and lost queued requests.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

pytest.importorskip("fastapi")

from test_serve import CHAT, MODEL, REPLY, FakeEngine, ByteTokenizer, sse_events, start_server, wait_until, worker_of  # noqa: E402

from ltd.serve.settings import ServeSettings  # noqa: E402

COMPLETIONS = "/v1/completions"


def post_raw(url: str, path: str, body: dict, **kwargs) -> httpx.Response:
    """POST ``body`` as ASCII JSON (lone surrogates become ``\\ud800`` escapes, as a
    hostile client can send them)."""
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(url + path, content=json.dumps(body).encode(), headers=headers, timeout=30, **kwargs)


def chat_body(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, **kw}


@pytest.fixture(scope="module")
def server():
    srv = start_server(FakeEngine(max_context=256), max_tokens_limit=1000)
    yield srv
    srv.stop()


def assert_400(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


# -- client input that used to give 500 ----------------------------------------------


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_seed_out_of_int64_range_is_400_naming_seed(server, seed):
    assert_400(post_raw(server.url, CHAT, chat_body(seed=seed)), "seed")


def test_seed_at_the_edges_of_the_range_is_served(server):
    for seed in (2**64 - 1, -(2**63)):
        r = post_raw(server.url, CHAT, chat_body(seed=seed, temperature=0.5))
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,body,param", [
    (CHAT, chat_body(messages=[{"role": "user", "content": "a\ud800b"}]), "messages[0].content"),
    (CHAT, chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]), "messages[0].content"),
    (CHAT, chat_body(messages=[{"role": "user", "content": "x", "name": "\ud800"}]), "messages[0].name"),
    (CHAT, chat_body(stop=["ok", "\ud83d"]), "stop"),
    (CHAT, chat_body(model="m\ud800"), "model"),
    (COMPLETIONS, {"model": MODEL, "prompt": "a\ud800b", "max_tokens": 3}, "prompt"),
])
def test_lone_surrogates_are_400_naming_the_field(server, path, body, param):
    assert_400(post_raw(server.url, path, body), param)


def test_invalid_speculation_is_400_naming_it(server):
    assert_400(post_raw(server.url, CHAT, chat_body(speculation="fast")), "speculation")
    assert_400(post_raw(server.url, COMPLETIONS, {"model": MODEL, "prompt": "x", "speculation": True}), "speculation")


def test_speculation_off_decodes_plainly_with_the_same_output(server):
    engine = server.app.state.worker.engine
    engine.methods.clear()
    auto = post_raw(server.url, CHAT, chat_body(max_tokens=30)).json()
    off = post_raw(server.url, CHAT, chat_body(max_tokens=30, speculation="off")).json()
    comp = post_raw(server.url, COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 4, "speculation": "off"})
    assert comp.status_code == 200
    assert engine.methods == ["static", "ar", "ar"]
    assert off["choices"][0]["message"]["content"] == auto["choices"][0]["message"]["content"] == REPLY.encode()[:30].decode()


# hypothesis: whatever the client sends, the answer is never a 5xx ----------------------

TEXT = st.text(max_size=40) | st.sampled_from(["a\ud800b", "\udfff", "", " ", "x" * 300, "😀\u0000é"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80), st.floats(allow_nan=False), TEXT,
    st.sampled_from(["auto", "off", MODEL, "user"]),
)
ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                   max_leaves=8)
# Near-valid values: the right type, at and past the edges of its range.
NEAR = {
    "max_tokens": st.integers(min_value=-1, max_value=300),
    "temperature": st.floats(min_value=0, max_value=2.5, allow_nan=False) | st.integers(min_value=-1, max_value=3),
    "top_p": st.floats(min_value=-0.1, max_value=1.1, allow_nan=False),
    # hypothesis draws small integers far more often than huge ones: the int64 edges are listed
    "seed": st.sampled_from([2**64, 2**64 - 1, -(2**63), -(2**63) - 1, 2**70, -(2**80), 0, 7]),
    "stop": TEXT | st.lists(TEXT, max_size=5),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "speculation": st.sampled_from(["auto", "off", "on"]),
    "n": st.sampled_from([1, 1, 2, None]),
    "presence_penalty": st.sampled_from([0, 0.0, 1.5, None]),
}
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]),
     "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2)},
    optional={"name": TEXT},
)


def bodies(required: dict, extra: dict, extra_near: dict):
    """(valid bodies with one or two fields pushed to and past the edges of their range,
    bodies of anything); fuzzed apart, so that neither starves the other."""
    fields = {**NEAR, **extra_near}

    def mutate(base: dict):
        return st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2, unique=True).flatmap(
            lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys}).map(lambda change: {**base, **change}))

    near = st.fixed_dictionaries({"model": st.just(MODEL), **required}).flatmap(mutate)
    anything = st.fixed_dictionaries({"model": ANY, **{k: ANY for k in required}}, optional={k: ANY for k in (*fields, *extra)})
    return near, anything


CHAT_BODIES = bodies({"messages": st.lists(MESSAGE, min_size=1, max_size=3)},
                     {"tools": ANY, "response_format": ANY, "logprobs": ANY}, {"max_completion_tokens": NEAR["max_tokens"]})
COMPLETION_BODIES = bodies({"prompt": TEXT | st.lists(st.integers(min_value=-3, max_value=300), max_size=8)},
                           {"echo": ANY, "suffix": ANY, "best_of": ANY}, {})


def _never_5xx(server, path: str, body) -> None:
    r = post_raw(server.url, path, body)
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code != 200:
        assert "error" in r.json(), r.text[:300]


FUZZED = [(CHAT, CHAT_BODIES[0]), (CHAT, CHAT_BODIES[1]), (COMPLETIONS, COMPLETION_BODIES[0]), (COMPLETIONS, COMPLETION_BODIES[1])]


@pytest.mark.parametrize("path,bodies_", FUZZED, ids=["chat-near-valid", "chat-anything", "completions-near-valid",
                                                      "completions-anything"])
@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_bodies_never_get_a_5xx(server, path, bodies_, data):
    _never_5xx(server, path, data.draw(bodies_, label="body"))


# -- size: body limit, character limit, tokenizing inside the bounded work -------------


def test_default_body_limit_follows_the_context():
    s = ServeSettings(model_name="m")
    assert s.body_limit(8192) > 8192 * 7  # a full context of token ids fits
    assert s.body_limit(8192) < 1_000_000  # ... and a 20 MB body does not
    assert ServeSettings(model_name="m", max_body_bytes=5000).body_limit(8192) == 5000


def test_body_over_the_limit_is_413_json():
    srv = start_server(FakeEngine(max_context=256), max_body_bytes=4096)
    try:
        big = chat_body(messages=[{"role": "user", "content": "x" * 5000}])
        r = post_raw(srv.url, CHAT, big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        # without Content-Length (chunked), the limit holds while the body arrives
        data = json.dumps(big).encode()
        r = httpx.post(srv.url + CHAT, content=iter([data[:3000], data[3000:]]), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert post_raw(srv.url, CHAT, chat_body()).status_code == 200  # under the limit: served
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'ltd_requests_total{endpoint="/v1/chat/completions",status="413"} 2' in metrics
    finally:
        srv.stop()


class CountingTokenizer(ByteTokenizer):
    """Records which thread tokenized how many characters."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, text: str) -> dict:
        self.calls.append((threading.current_thread().name, len(text)))
        return super().__call__(text)

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append((threading.current_thread().name, sum(len(m["content"]) for m in messages)))
        return super().apply_chat_template(messages, **kwargs)


def test_over_long_content_is_refused_before_tokenizing_and_tokenizing_runs_in_the_worker():
    engine = FakeEngine(max_context=256)
    tok = engine.target.tokenizer = CountingTokenizer()
    srv = start_server(engine)
    try:
        limit = srv.app.state.worker.engine.backend.max_context * 32  # the fake has no vocabulary: 32 chars a token
        r = post_raw(srv.url, CHAT, chat_body(messages=[{"role": "user", "content": "y" * (limit + 1)}]))
        assert_400(r, "messages")
        assert r.json()["error"]["code"] == "context_length_exceeded"
        r = post_raw(srv.url, COMPLETIONS, {"model": MODEL, "prompt": "y" * (limit + 1)})
        assert_400(r, "prompt")
        assert tok.calls == [], "an over-long prompt was tokenized"
        # a prompt that passes the character check but not the token check: 400 from the worker
        r = post_raw(srv.url, CHAT, chat_body(messages=[{"role": "user", "content": "z" * 300}]))
        assert_400(r, "messages")
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert post_raw(srv.url, CHAT, chat_body()).status_code == 200
        assert {name for name, _ in tok.calls} == {"ltd-decode-worker"}, tok.calls
    finally:
        srv.stop()


def test_a_request_refused_with_429_is_never_tokenized():
    engine = FakeEngine(reply="a" * 400, delay=0.02)
    tok = engine.target.tokenizer = CountingTokenizer()
    srv = start_server(engine, queue_size=0)
    worker = worker_of(srv)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            resp = c.send(c.build_request("POST", CHAT, json={**chat_body(max_tokens=300), "stream": True}), stream=True)
            wait_until(lambda: worker.busy, what="decoding")
            for _ in range(3):
                assert post_raw(srv.url, CHAT, chat_body(messages=[{"role": "user", "content": "q" * 50}])).status_code == 429
            resp.close()
        assert [n for _, n in tok.calls] == [2], tok.calls  # only the running request's "hi"
    finally:
        srv.stop()


# -- metrics, Retry-After -----------------------------------------------------------


def test_an_unhandled_error_is_a_json_500_counted_as_500():
    srv = start_server(FakeEngine())
    settings = srv.app.state.settings

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    settings.generate_config = broken  # the route calls it for every request
    try:
        r = post_raw(srv.url, CHAT, chat_body())
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'ltd_requests_total{endpoint="/v1/chat/completions",status="500"} 1' in metrics
        assert 'status="499"' not in metrics
    finally:
        srv.stop()


def test_retry_after_grows_with_the_queue_and_the_time_per_request():
    srv = start_server(FakeEngine(reply="a" * 400, delay=0.02), queue_size=2)
    worker = worker_of(srv)
    worker._mean_seconds = 3.0  # recent requests took 3 s each
    threads = [threading.Thread(target=post_raw, args=(srv.url, CHAT, chat_body(max_tokens=300))) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    try:
        wait_until(lambda: worker.busy and worker.queue_depth() == 2, what="one running, two waiting")
        r = post_raw(srv.url, CHAT, chat_body())
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) == math.ceil(3.0 * 3), r.headers  # three requests ahead, 3 s each
    finally:
        srv.stop()
        for t in threads:
            t.join(10)


# -- Host, API key, docs --------------------------------------------------------------


def test_wrong_host_is_400_and_allowed_hosts_extend_the_list():
    srv = start_server(FakeEngine(), allowed_hosts=("ltd.internal",))
    try:
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
            r = httpx.get(srv.url + "/v1/models", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (host, r.text)
        for host in (f"127.0.0.1:{srv.port}", "localhost", f"localhost:{srv.port}", "[::1]:8000", "ltd.internal:8000"):
            assert httpx.get(srv.url + "/v1/models", headers={"Host": host}).status_code == 200, host
    finally:
        srv.stop()


def test_host_allow_list_parsing():
    s = ServeSettings(model_name="m", bind_host="10.0.0.5")
    assert s.host_allowed("10.0.0.5:8000") and s.host_allowed("[::1]") and s.host_allowed("LOCALHOST")
    assert not s.host_allowed("") and not s.host_allowed("10.0.0.6") and not s.host_allowed("[::2]:80")
    assert ServeSettings(model_name="m", allowed_hosts=("*",)).host_allowed("anything.example")


def test_api_key_is_required_when_set(monkeypatch):
    srv = start_server(FakeEngine(), api_key="s3cret")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            r = post_raw(srv.url, CHAT, chat_body(), headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer"
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
        ok = post_raw(srv.url, CHAT, chat_body(), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
    finally:
        srv.stop()


def test_api_key_from_the_environment(monkeypatch):
    import argparse

    from ltd.serve import cli as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    monkeypatch.setenv("LTD_API_KEY", "from-env")
    assert serve_cli.settings_from_args(parser.parse_args([]), "ar").api_key == "from-env"
    assert serve_cli.settings_from_args(parser.parse_args(["--api-key", "flag"]), "ar").api_key == "flag"
    monkeypatch.delenv("LTD_API_KEY")
    assert serve_cli.settings_from_args(parser.parse_args([]), "ar").api_key is None


def test_docs_are_off_by_default():
    srv = start_server(FakeEngine())
    try:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(srv.url + path).status_code == 404, path
    finally:
        srv.stop()
    srv = start_server(FakeEngine(), docs=True)
    try:
        assert httpx.get(srv.url + "/openapi.json").status_code == 200
        assert httpx.get(srv.url + "/docs").status_code == 200
    finally:
        srv.stop()


# -- logging and echoes ---------------------------------------------------------------


def test_stream_disconnect_is_logged_at_info_with_the_request_id(caplog):
    caplog.set_level(logging.INFO, logger="ltd.serve.app")
    engine = FakeEngine(reply="d" * 400, delay=0.02)
    srv = start_server(engine)
    worker = worker_of(srv)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            resp = c.send(c.build_request("POST", CHAT, json={**chat_body(max_tokens=300), "stream": True}), stream=True)
            request_id = resp.headers["X-Request-Id"]
            first = next(resp.iter_lines())
            assert json.loads(first[len("data: "):])["id"] == request_id
            resp.close()
        wait_until(lambda: worker.cancelled == 1, what="cancellation")
        wait_until(lambda: any(request_id in r.getMessage() and "disconnect" in r.getMessage() for r in caplog.records),
                   timeout=5, what="the disconnect log line")
        assert all(r.levelno == logging.INFO for r in caplog.records if request_id in r.getMessage())
    finally:
        srv.stop()


def test_echoed_values_are_cut(server):
    r = post_raw(server.url, CHAT, chat_body(model="m" * 5000))
    assert_400(r, "model")
    assert len(r.json()["error"]["message"]) < 300
    r = httpx.get(server.url + "/v1/models/" + "q" * 5000)
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 300


# -- shutdown and online state -----------------------------------------------------------


class RecordingOnline:
    """Stands in for an OnlineAdapter: records when it was saved."""

    def __init__(self, worker_busy=lambda: False) -> None:
        self.saves: list[tuple[str, bool]] = []
        self.worker_busy = worker_busy

    def save_state(self, directory) -> None:
        self.saves.append((str(directory), self.worker_busy()))


def test_drain_finishes_the_stream_with_an_error_fails_the_queue_with_503_and_saves(tmp_path):
    engine = FakeEngine(reply="e" * 2000, delay=0.01, max_context=4096)
    engine.online = RecordingOnline()
    srv = start_server(engine, drain_timeout=0.5, online_state=str(tmp_path / "state"), save_every=0)
    worker = worker_of(srv)
    body = {**chat_body(max_tokens=1500), "stream": True}
    queued: dict = {}
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            resp = c.send(c.build_request("POST", CHAT, json=body), stream=True)
            assert resp.status_code == 200
            wait_until(lambda: worker.busy, what="streaming")
            t = threading.Thread(target=lambda: queued.setdefault("r", post_raw(srv.url, CHAT, chat_body(max_tokens=3))))
            t.start()
            wait_until(lambda: worker.queue_depth() == 1, what="one queued")
            drainer = threading.Thread(target=srv.drain)
            drainer.start()
            wait_until(lambda: srv.app.state.shutdown.draining.active, what="draining")
            late = post_raw(srv.url, CHAT, chat_body())
            events = sse_events(resp.iter_lines())
            t.join(10)
            drainer.join(30)
        assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable" and int(late.headers["Retry-After"]) >= 1
        assert queued["r"].status_code == 503 and queued["r"].json()["error"]["code"] == "unavailable"
        assert "Retry-After" in queued["r"].headers
        assert events[-1]["error"]["code"] == "unavailable" and "[DONE]" not in events
        assert len(events) > 2  # text was streamed before the drain timeout cut it
        assert engine.online.saves == [(str(tmp_path / "state"), False)]
    finally:
        srv.stop()


def test_online_state_is_saved_periodically_between_requests(tmp_path):
    engine = FakeEngine(reply="f" * 100, delay=0.01)
    engine.online = RecordingOnline()
    srv = start_server(engine, online_state=str(tmp_path), save_every=0.3)
    worker = worker_of(srv)
    engine.online.worker_busy = lambda: worker.busy
    try:
        for _ in range(3):
            assert post_raw(srv.url, CHAT, chat_body(max_tokens=60)).status_code == 200
        wait_until(lambda: len(engine.online.saves) >= 2, timeout=5, what="two periodic saves")
        assert not any(busy for _, busy in engine.online.saves), "saved while a generation ran"
    finally:
        srv.stop()
