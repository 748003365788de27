"""Several requests decoded together on one engine: continuous batching.

Each request runs the ordinary cycle on its own thread, with its own drafter (a fork of
the engine's: same weights and shared memory, its own state), its own controller and
its own sampling seed, on one *lane* of a :class:`ltd.backends.packed.PackedHF`: all
lanes' verifications of a cycle go through one target forward. Requests join and leave
between forwards; a request's output is what it would be decoded alone.

The server runs one thread per batch slot (``ltd serve --max-batch N``); a test or a
script can call :meth:`BatchedEngine.stream` from its own threads the same way.
"""

from __future__ import annotations

import logging
from typing import Iterator

from ltd.backends.packed import BatchLoad, PackedHF
from ltd.cycle import CycleResult
from ltd.drafting.base import fork_drafter
from ltd.engine import Engine, GenerateConfig, method_of
from ltd.errors import LtdError
from ltd.runtime import lane_threads

log = logging.getLogger(__name__)


class BatchedEngine:
    """An :class:`Engine` whose generations, run from several threads, share forwards."""

    def __init__(self, engine: Engine, max_batch: int) -> None:
        if engine.backend_name != "hf":
            raise LtdError("decoding several requests at once needs the hf backend; on llama.cpp use --max-batch 1")
        self.engine = engine
        self.max_batch = max_batch
        self.pool = PackedHF(engine.backend, max_batch)

    def load(self) -> BatchLoad:
        return self.pool.load()

    def check(self, cfg: GenerateConfig) -> None:
        """Refuse a method that cannot join a batch, before anything runs."""
        if method_of(cfg.method).run is not None:
            raise LtdError(f"method {cfg.method} runs its own decoding loop and cannot join a batch; use a speculative method or ar")

    def stream(self, prompt: list[int], cfg: GenerateConfig) -> Iterator[CycleResult]:
        """Cycle results of one request decoded in the batch (the engine's method, drafter
        and controller, as :meth:`Engine.stream`). Closing the generator (or finishing it)
        leaves the batch and frees the request's cache entries."""
        self.check(cfg)
        lane_threads()  # beside a compute thread, this thread's own torch work stays on one core
        drafter = fork_drafter(self.engine.drafter)
        lane = self.pool.lane()
        try:
            yield from self.engine.stream(prompt, cfg, drafter=drafter, target=lane)
        finally:
            lane.close()
            drafter.reset()  # frees its state; a suffix drafter gives its output to the shared store
