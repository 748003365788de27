"""``python -m ltd.serve`` as a real process: signals, shutdown and online state on disk.

The server runs a tiny random Llama saved to a directory (with a word-level tokenizer),
the suffix drafter and ``--online memory``, so start-up takes seconds and the online
state is the real :class:`ltd.online.OnlineAdapter` on disk. The tiny model never
writes EOS, so a stream lasts as long as ``max_tokens`` says.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import TINY_VOCAB, make_tiny_llama  # noqa: E402

import ltd  # noqa: E402
from ltd.drafting.suffix import SuffixDrafter  # noqa: E402
from ltd.online import OnlineAdapter  # noqa: E402

SRC = Path(ltd.__file__).resolve().parents[1]  # the server runs the code this test imports
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
PROMPT = "t1 t2 t3 t4 t1 t2 t3"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-serve-model")
    make_tiny_llama(seed=5, max_position_embeddings=4096).save_pretrained(d)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TINY_VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(d)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m ltd.serve`` on a loopback port, its log in a file."""

    def __init__(self, model_dir: Path, state_dir: Path, log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ltd.serve", "--model", str(model_dir), "--drafter", "suffix", "--method", "static",
               "--online", "memory", "--online-state", str(state_dir), "--port", str(self.port), "--threads", "1",
               "--queue-size", "2", "--max-tokens-limit", "4000", "--no-access-log", *flags]
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log_path = log_path
        self.proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"the server exited during start-up:\n{self.log()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not healthy within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def memory_of(state_dir: Path) -> int:
    """Tokens in a saved stream memory, loaded the way a restart loads it."""
    adapter = OnlineAdapter(SuffixDrafter(), "memory")
    adapter.load_state(state_dir)
    return len(adapter.store)


def test_sigterm_drains_answers_everyone_and_saves_state_that_reloads(model_dir, tmp_path):
    state = tmp_path / "state"
    srv = ServerProcess(model_dir, state, tmp_path / "server.log", "--drain-timeout", "0.5", "--save-every", "0")
    try:
        srv.wait_healthy()
        body = {"model": str(model_dir), "prompt": PROMPT, "max_tokens": 3500, "temperature": 0}
        queued: dict = {}
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            resp = c.send(c.build_request("POST", "/v1/completions", json={**body, "stream": True}), stream=True)
            assert resp.status_code == 200
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            t = threading.Thread(target=lambda: queued.setdefault(
                "r", httpx.post(srv.url + "/v1/completions", json={**body, "max_tokens": 5}, timeout=60)))
            t.start()
            end = time.monotonic() + 30
            while httpx.get(srv.url + "/health").json()["queue_depth"] != 1:
                assert time.monotonic() < end, "the second request was never queued"
                time.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            events = [first] + [line for line in lines if line.startswith("data: ")]
            t.join(30)
        code = srv.proc.wait(60)
        payloads = [e[len("data: "):] for e in events]
        assert "[DONE]" not in payloads
        assert json.loads(payloads[-1])["error"]["code"] == "unavailable", payloads[-3:]
        assert len(payloads) > 2, "nothing was streamed before the drain cut the stream"
        r = queued["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert code == 0, srv.log()
        assert memory_of(state) > 20, "the cut stream's tokens should be in the saved stream memory"
    finally:
        srv.kill()


@pytest.fixture
def running(model_dir, tmp_path, request):
    """A healthy server with the flags of ``@pytest.mark.parametrize("running", [...], indirect=True)``."""
    srv = ServerProcess(model_dir, tmp_path / "state", tmp_path / "server.log", *request.param)
    srv.state = tmp_path / "state"
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.kill()


@pytest.mark.parametrize("running", [("--save-every", "0")], indirect=True)
def test_sigint_saves_too_and_the_warmup_learns_nothing(running):
    running.proc.send_signal(signal.SIGINT)
    running.proc.wait(60)
    assert running.state.is_dir(), running.log()
    assert memory_of(running.state) == 0, "the start-up warm-up was learned"


@pytest.mark.parametrize("running", [("--save-every", "0.5")], indirect=True)
def test_periodic_save_lands_on_disk_while_serving(running, model_dir):
    r = httpx.post(running.url + "/v1/completions", timeout=60,
                   json={"model": str(model_dir), "prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    end = time.monotonic() + 20
    while not (running.state.is_dir() and memory_of(running.state) >= 20):  # the prompt and the reply
        assert time.monotonic() < end, f"no periodic save with the request in it:\n{running.log()}"
        time.sleep(0.2)
    assert running.proc.poll() is None  # saved while still serving
