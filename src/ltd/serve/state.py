"""Saving the online state while serving: every few minutes, and once at shutdown.

Why the decode worker calls :meth:`StateSaver.tick` between jobs instead of a timer
thread saving on its own: the online state (head weights, kNN memory, stream memory)
changes during every generation, and only the worker knows when none is running. A
save between jobs sees a consistent state without a lock on the decoding path. Each
save is atomic (:meth:`ltd.online.OnlineAdapter.save_state` writes a temporary
directory and renames it), so a crash at any moment leaves the previous save whole
and loses at most ``every`` seconds of learning.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class StateSaver:
    """Saves ``online`` (an :class:`ltd.online.OnlineAdapter`) to ``directory``."""

    def __init__(self, online, directory: str, every: float = 0.0) -> None:
        self.online = online
        self.directory = directory
        self.every = every
        self.saves = 0
        self.last_reason: str | None = None  # why the last successful save ran
        self._lock = threading.Lock()
        self._last = time.monotonic()

    def tick(self) -> None:
        """Save when ``every`` seconds have passed since the last save (0 = never here)."""
        if self.every > 0 and time.monotonic() - self._last >= self.every:
            self.save("periodic")

    def save(self, why: str = "shutdown") -> bool:
        """Save now; a failure is logged, not raised (serving goes on, the old save stays)."""
        with self._lock:
            self._last = time.monotonic()
            try:
                self.online.save_state(self.directory)
            except Exception:
                log.exception("could not save the online state to %s (%s save); the previous save is kept",
                              self.directory, why)
                return False
            self.saves += 1
            self.last_reason = why
            log.info("online state saved to %s (%s)", self.directory, why)
            return True
