"""Graceful shutdown: SIGTERM and SIGINT drain the server, then it exits and saves.

Why not uvicorn's own handling: on a signal uvicorn closes the listening socket,
waits a few seconds, cancels whatever still runs (a queued request then gets a
plain-text 500, a stream is cut with no error event) and finally re-raises the signal
with the default handler, which kills the process before the caller's ``finally``
could save anything. Here the first signal starts :meth:`Shutdown.drain` instead:

1. new generation requests get 503 (JSON, with ``Retry-After``) and waiting ones are
   failed with the same 503 at once;
2. the running generation gets ``drain_timeout`` seconds to finish; after that it is
   cancelled, so a stream ends with an error event and a non-streamed request gets 503;
3. once those answers are sent, uvicorn shuts down normally; the app's lifespan then
   stops the worker and saves the online state (:mod:`ltd.serve.state`).

The signal handling itself is :class:`ltd.serve.server.GracefulServer`; this module
needs no uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ltd.serve.guard import Draining

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
ANSWER_GRACE_SECONDS = 5.0  # after cancelling, how long the handlers get to send their last bytes


class Shutdown:
    """The drain sequence of one app (its worker and its :class:`Draining` flags)."""

    def __init__(self, worker, draining: Draining, drain_timeout: float) -> None:
        self.worker = worker
        self.draining = draining
        self.drain_timeout = drain_timeout

    def begin(self) -> None:
        """Refuse new work and fail the waiting jobs (503); idempotent."""
        if self.draining.active:
            return
        self.draining.active = True
        failed = self.worker.close()
        log.info("shutting down: new requests get 503, %d waiting request(s) failed, the running one has %.0f s",
                 failed, self.drain_timeout)

    async def drain(self) -> None:
        """Let the running generation finish up to ``drain_timeout``, then cancel it, and
        wait (briefly) until every generation request has been answered."""
        self.begin()
        end = time.monotonic() + self.drain_timeout
        while self.worker.busy and time.monotonic() < end:
            await asyncio.sleep(POLL_SECONDS)
        if self.worker.cancel_active("unavailable"):
            log.warning("the running generation did not finish within --drain-timeout %.0f s; cancelled", self.drain_timeout)
        end = time.monotonic() + ANSWER_GRACE_SECONDS
        while self.draining.in_flight and time.monotonic() < end:
            await asyncio.sleep(POLL_SECONDS)
