"""The server on the embedded SmolLM2-135M, called with the official ``openai`` client.

The promise: for the same greedy request, the streamed text, the non-streamed text and
``ltd generate``'s text are identical (the server consumes the same ``Engine.stream``
and decodes the same token list). References are computed before the server starts,
because the engine serves one caller at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading

import httpx
import openai
import pytest
import torch

from ltd.engine import Engine, GenerateConfig
from ltd.serve.app import create_app
from ltd.serve.background import BackgroundServer
from ltd.serve.settings import ServeSettings

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
TREE = dict(depth=4, topk=2, size=8)
MAX_TOKENS = 12
# The second prompt makes SmolLM2 write emoji, each split over two tokens: a multi-byte
# character across cycle boundaries, and a cut one at the end.
CHAT_PROMPTS = ["What is the capital of France?", "Say hello in three languages."]
RAW_PROMPT = "The capital of France is"


def cli_generate(engine: Engine, prompt: str) -> dict:
    """``ltd generate --json`` in-process, on the already loaded engine."""
    from ltd import cli

    argv = ["generate", "--model", MODEL, "--drafter", "self", "--method", "static", "--prompt", prompt,
            "--max-new-tokens", str(MAX_TOKENS), "--threads", "1", "--json"]
    argv += [x for k, v in TREE.items() for x in (f"--{k}", str(v))]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(Engine, "load", staticmethod(lambda *a, **k: engine))
        assert cli.main(argv) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.set_num_threads(1)
    return Engine.load(MODEL, drafter="self")


@pytest.fixture(scope="module")
def references(engine) -> dict:
    cfg = GenerateConfig(method="static", max_new_tokens=MAX_TOKENS, temperature=0.0, **TREE)
    refs = {}
    for p in CHAT_PROMPTS:
        res = engine.generate(engine.encode(p), cfg)
        refs[p] = {"text": res.text, "tokens": res.new_tokens, "prompt_tokens": len(engine.encode(p)),
                   "cli": cli_generate(engine, p)["text"]}
    raw = engine.generate(engine.encode(RAW_PROMPT, chat=False), cfg)
    refs[RAW_PROMPT] = {"text": raw.text, "tokens": raw.new_tokens}
    return refs


@pytest.fixture(scope="module", params=[1, 4], ids=["one-at-a-time", "max-batch-4"])
def server(engine, references, request):
    """Every test runs against a server decoding one request at a time and against one
    decoding up to four together (``--max-batch 4``): the same answers either way."""
    settings = ServeSettings(model_name=MODEL, method="static", queue_size=4, timeout=120, max_batch=request.param, **TREE)
    srv = BackgroundServer(create_app(engine, settings)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@pytest.mark.parametrize("prompt", CHAT_PROMPTS)
def test_chat_stream_equals_non_stream_equals_ltd_generate(client, references, prompt):
    ref = references[prompt]
    assert ref["text"] == ref["cli"]
    full = client.chat.completions.create(model=MODEL, messages=messages(prompt), max_tokens=MAX_TOKENS, temperature=0)
    assert full.choices[0].message.content == ref["text"]
    # "stop" when the model ended with EOS before max_tokens, as the first prompt does
    assert full.choices[0].finish_reason == ("length" if ref["tokens"] == MAX_TOKENS else "stop")
    assert full.usage.completion_tokens == ref["tokens"]
    assert full.usage.prompt_tokens == ref["prompt_tokens"]

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages(prompt), max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == ref["text"]
    assert chunks[-1].usage.completion_tokens == ref["tokens"]
    # Only the final flush may carry a replacement character (an emoji cut by max_tokens).
    assert all("\ufffd" not in d for d in deltas[:-2])


def test_completions_stream_equals_non_stream_equals_engine(client, references):
    ref = references[RAW_PROMPT]
    full = client.completions.create(model=MODEL, prompt=RAW_PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert full.choices[0].text == ref["text"]
    parts = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt=RAW_PROMPT,
                                                                   max_tokens=MAX_TOKENS, temperature=0, stream=True)]
    assert "".join(parts) == ref["text"]


def test_stop_string_identical_streamed_and_not(client, references):
    ref = references[CHAT_PROMPTS[0]]["text"]
    words = ref.split()
    assert len(words) >= 3, ref
    stop = " " + words[2]
    expected = ref[: ref.index(stop)]
    kwargs = dict(model=MODEL, messages=messages(CHAT_PROMPTS[0]), max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].message.content == expected and full.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_streamed_and_not(client):
    kwargs = dict(model=MODEL, messages=messages("Name a color."), max_tokens=8, temperature=0.9, seed=7)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True))
    assert a == b


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    client.chat.completions.create(model=MODEL, messages=messages("Hi"), max_tokens=4, temperature=0)
    values = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["ltd_generated_tokens_total"] >= 4
    assert values["ltd_cycles_total"] >= 1
    # The target drafting for itself agrees with itself: whole 4-deep paths are accepted.
    assert values["ltd_mean_accepted_length"] > 2
    assert values["ltd_tokens_per_second"] > 0
    assert values["ltd_queue_depth"] == 0
    assert values['ltd_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1


def _metric_values(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_speculation_off_gives_the_same_text_at_one_token_per_cycle(server, client, references):
    prompt = CHAT_PROMPTS[0]
    before = _metric_values(server.url)
    off = client.chat.completions.create(model=MODEL, messages=messages(prompt), max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"speculation": "off"})
    after = _metric_values(server.url)
    auto = client.chat.completions.create(model=MODEL, messages=messages(prompt), max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"speculation": "auto"})
    assert off.choices[0].message.content == auto.choices[0].message.content == references[prompt]["text"]
    cycles = after["ltd_cycles_total"] - before["ltd_cycles_total"]
    added = after["ltd_cycle_tokens_total"] - before["ltd_cycle_tokens_total"]
    assert cycles >= 1 and added / cycles == 1.0  # plain decoding: one token per cycle, no drafts accepted
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages(prompt), max_tokens=2, extra_body={"speculation": "no"})
    assert info.value.body["param"] == "speculation"


def test_concurrent_requests_each_get_their_own_answer(server, client, references):
    """Four clients at once (decoded together with --max-batch 4): each answer is the
    one the request gets alone, and the batch shows in /metrics."""
    prompts = CHAT_PROMPTS * 2
    answers: list[str | None] = [None] * len(prompts)

    def ask(i: int) -> None:
        reply = client.chat.completions.create(model=MODEL, messages=messages(prompts[i]), max_tokens=MAX_TOKENS, temperature=0)
        answers[i] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == [references[p]["text"] for p in prompts]
    values = _metric_values(server.url)
    assert values["ltd_max_batch"] == server.app.state.settings.max_batch
    if values["ltd_max_batch"] > 1:
        assert values["ltd_batch_forwards_total"] >= 1
        assert values["ltd_batch_rows_total"] > values["ltd_batch_forwards_total"]  # forwards held several rows
    assert values["ltd_request_accepted_length_count"] >= len(prompts)
