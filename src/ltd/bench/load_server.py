"""One ``ltd serve`` subprocess on a free loopback port, for the load benchmark.

The server runs in its own session, so a Ctrl-C at the terminal reaches the bench only,
which then stops the server itself: SIGTERM (the server drains and exits), a wait, and
SIGKILL when it does not go. :class:`ServerProcess` is a context manager, so a server
never outlives the block that started it, whatever ends the block.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import httpx
import psutil

from ltd.errors import LtdError

log = logging.getLogger(__name__)

HEALTH_PATH = "/health"
POLL_SECONDS = 0.25
STOP_SECONDS = 15.0  # SIGTERM to SIGKILL; the server's own drain is capped below it
DRAIN_SECONDS = 5.0
HIDDEN_ENV = ("LTD_API_KEY",)  # the bench's clients send no key: the server must not require one


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_argv(model: str, port: int, threads: int | None, queue_size: int, extra: Sequence[str]) -> list[str]:
    """The command line of one server: ``ltd serve`` with the bench's flags, then ``extra``
    (later flags win, so a configuration may change the queue or the drain)."""
    argv = [sys.executable, "-m", "ltd.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log", "--queue-size", str(queue_size), "--drain-timeout", str(DRAIN_SECONDS)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv + list(extra)


class ServerProcess:
    """A server subprocess: started and made ready on enter, stopped on exit.

    ``argv`` is any command serving ``HEALTH_PATH`` on ``port``, run with the bench's
    environment updated by ``env``; its output goes to ``log_path``, which the errors name.
    """

    def __init__(self, name: str, argv: Sequence[str], port: int, log_path: Path, startup_timeout: float,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.env = dict(env or {})
        self.argv = list(argv)
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __enter__(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**{k: v for k, v in os.environ.items() if k not in HIDDEN_ENV}, **self.env}
        with self.log_path.open("wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        log.info("server %s: pid %d, %s", self.name, self.proc.pid, " ".join(self.argv[3:]))
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self) -> None:
        """Poll the health route until it answers 200; a clear error if the server exits or never does."""
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise LtdError(f"server {self.name!r} exited with status {code} before it was ready "
                                   f"({self.last_log_line()}); see {self.log_path} and fix its arguments")
                try:
                    if client.get(self.base_url + HEALTH_PATH).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise LtdError(f"server {self.name!r} did not answer {HEALTH_PATH} within {self.startup_timeout:g} s; "
                                   f"see {self.log_path}, or raise --startup-timeout")
                time.sleep(POLL_SECONDS)

    def last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no output"
        return lines[-1].strip() if lines else "no output"

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL: the server and anything it started are gone on return."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("server %s did not stop within %.0f s of SIGTERM; killing it", self.name, STOP_SECONDS)
            proc.kill()
            proc.wait()
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass  # already gone
        log.info("server %s stopped (status %s)", self.name, proc.returncode)

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children now (0 once it is gone)."""
        if self.proc is None:
            return 0
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass  # exited between the listing and the reading
        return total
