"""Run the server inside the current process, on a background thread.

For tests and notebooks: the caller keeps its loaded engine and talks to the server
over real HTTP on a loopback port. The socket is bound here (port 0 = any free port)
and handed to uvicorn, so there is no window in which another process can take the
port between choosing and binding it.
"""

from __future__ import annotations

import socket
import threading
import time

DEFAULT_START_TIMEOUT = 30.0


class BackgroundServer:
    """``with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> "BackgroundServer":
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        from ltd.serve.server import GracefulServer

        config = uvicorn.Config(self.app, log_level=self.log_level, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2)
        self._server = GracefulServer(config, getattr(self.app.state, "shutdown", None))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="ltd-uvicorn", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during startup; see the log")
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"the server did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def drain(self, timeout: float = 30.0) -> None:
        """What SIGTERM does to ``ltd serve``: drain, shut down, save; waits for the end."""
        self._server.request_drain()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the server did not shut down within {timeout:.0f} s")
            self._thread = None

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
