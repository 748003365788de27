"""uvicorn's server with the drain of :mod:`ltd.serve.lifecycle` on SIGTERM and SIGINT.

The first signal starts :meth:`ltd.serve.lifecycle.Shutdown.drain`; uvicorn shuts down
when it is done. A second signal exits at once, as uvicorn's does. The signal is not
re-raised afterwards (uvicorn's default), so the process ends with status 0 after the
app's lifespan has saved its state: the signal was handled, not fatal.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

import uvicorn

from ltd.serve.lifecycle import Shutdown

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """uvicorn's server with :class:`Shutdown` on the first SIGTERM/SIGINT (see the module doc)."""

    def __init__(self, config: uvicorn.Config, shutdown: Shutdown | None) -> None:
        super().__init__(config)
        self.shutdown_sequence = shutdown
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = threading.Event()
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame) -> None:
        """The signal handler. Not recorded for re-raising: the signal is handled here."""
        if self._drain_requested.is_set() or self.shutdown_sequence is None or self._loop is None:
            if self._drain_requested.is_set():
                log.warning("second %s: exiting without waiting", signal.Signals(sig).name)
                self.force_exit = True
            self.should_exit = True
            return
        log.info("%s received: draining before exit", signal.Signals(sig).name)
        self.request_drain()

    def request_drain(self) -> None:
        """Start the drain from any thread (the signal handler, or a test)."""
        if self._drain_requested.is_set() or self._loop is None:
            return
        self._drain_requested.set()
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.shutdown_sequence.drain()
        except Exception:  # a bug must not keep the server from exiting
            log.exception("draining failed; exiting")
        finally:
            self.should_exit = True
