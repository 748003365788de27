"""The decode worker: the threads that own the engine and serve a bounded queue.

By default one thread: the engine holds one KV cache and one drafter state, so it
decodes one sequence at a time. With ``max_batch`` N > 1 (``ltd serve --max-batch N``)
N threads each decode one request on a lane of a :class:`ltd.batching.BatchedEngine`,
whose forwards they share. Request handlers never touch the engine: they put a
:class:`Job` on the queue and read the events the worker sends back. A full queue is
refused at once (the caller answers 429), so waiting work and memory stay bounded.

The worker consumes :meth:`ltd.engine.Engine.stream` (the one generator that drives the
cycle) and checks between cycles whether the job was cancelled (client gone, deadline
passed) or hit a stop string; it then closes the generator, which is the only way a
generation ends early.

The worker also tokenizes each prompt (:mod:`ltd.serve.prompt` says why) and, between
jobs, gives the online-state saver its chance (:mod:`ltd.serve.state`).
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

from ltd.cycle import CycleResult
from ltd.engine import GenerateConfig
from ltd.errors import LtdError
from ltd.runtime import on_compute_thread
from ltd.serve.metrics import ServerMetrics
from ltd.serve.prompt import InvalidPrompt
from ltd.serve.state import StateSaver
from ltd.serve.text import TextCodec, TextStream

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.25  # how often an idle worker checks for shutdown
DURATION_EMA = 0.2  # weight of the newest job in the mean job duration (for Retry-After)
MAX_RETRY_AFTER = 60


class EngineLike(Protocol):
    """What the worker needs from :class:`ltd.engine.Engine` (tests pass a fake)."""

    def stream(self, prompt: list[int], cfg: GenerateConfig) -> Iterator[CycleResult]: ...

    def generate(self, prompt: list[int], cfg: GenerateConfig): ...


class BatchLike(Protocol):
    """What the worker needs from :class:`ltd.batching.BatchedEngine`."""

    max_batch: int

    def stream(self, prompt: list[int], cfg: GenerateConfig) -> Iterator[CycleResult]: ...


# -- events sent back to the request handler ------------------------------------------


@dataclass
class TextDelta:
    """Newly final text."""

    text: str


@dataclass
class Finished:
    """The generation ended normally; no more events follow."""

    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """The generation did not finish; ``kind`` decides the HTTP status."""

    kind: str  # "invalid_request" | "timeout" | "cancelled" | "unavailable" | "server_error"
    message: str
    param: str | None = None  # the request field at fault (invalid_request)
    code: str | None = None


Event = TextDelta | Finished | Failed


class QueueFull(Exception):
    """The queue has no room; retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"the server is busy ({depth} requests waiting); retry in {retry_after} s")
        self.depth = depth
        self.retry_after = retry_after


class WorkerStopped(Exception):
    """The server is shutting down."""


_job_ids = itertools.count(1)


class Job:
    """One generation request: inputs, a deadline, a cancellation flag and an event sink.

    ``notify`` is called from the worker thread; the app passes a function that hands
    the event to its event loop thread-safely.
    """

    def __init__(
        self,
        prompt: Sequence[int],
        config: GenerateConfig,
        notify: Callable[[Event], None],
        stop: Sequence[str] = (),
        timeout: float = 300.0,
        prepare: Callable[[], tuple[list[int], int]] | None = None,
        request_id: str = "",
    ) -> None:
        self.id = next(_job_ids)
        self.request_id = request_id or f"job-{self.id}"
        self.prompt = list(prompt)
        self.prepare = prepare  # (prompt ids, max_tokens) made by the worker; may raise InvalidPrompt
        self.config = config
        self.stop = tuple(stop)
        self.arrival = time.monotonic()
        self.deadline = self.arrival + timeout
        self._notify = notify
        self._cancel = threading.Event()
        self.cancel_reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the worker to stop this job at the next cycle boundary (first reason wins)."""
        if not self._cancel.is_set():
            self.cancel_reason = reason
            self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def emit(self, event: Event) -> None:
        try:
            self._notify(event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            log.debug("job %d: event dropped, loop closed", self.id)


@dataclass
class _Progress:
    """Counters of one job, for metrics."""

    generated: int = 0
    cycles: int = 0
    cycle_tokens: int = 0
    ttft: float | None = None
    last_token: int | None = None


class Worker:
    """The decode threads (one per batch slot), their bounded queue and their counters."""

    def __init__(
        self,
        engine: EngineLike,
        codec: TextCodec,
        eos_token_ids: Sequence[int],
        queue_size: int,
        metrics: ServerMetrics | None = None,
        saver: StateSaver | None = None,
        batch: BatchLike | None = None,
    ) -> None:
        self.engine = engine
        self.batch = batch
        self.max_batch = batch.max_batch if batch is not None else 1
        self.saver = saver
        self.codec = codec
        self.eos = frozenset(int(e) for e in eos_token_ids)
        # queue.Queue(0) would be unbounded; a zero-size queue means "no waiting".
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max(queue_size, 1))
        self.queue_size = queue_size
        self.metrics = metrics or ServerMetrics()
        self.metrics.queue_depth = self.queue_depth
        self.metrics.queue_capacity = lambda: self.queue_size
        self.metrics.busy = lambda: len(self._active)
        self.metrics.max_batch = lambda: self.max_batch
        pool = getattr(batch, "pool", None)
        if pool is not None:
            self.metrics.batch_forwards = lambda: (pool.forwards, pool.rows)
        self._active: set[Job] = set()
        self._stopping = threading.Event()
        self._closed = threading.Event()  # no new jobs (draining); the running ones go on
        self._threads: list[threading.Thread] = []
        self._submit_lock = threading.Lock()
        self._tick_lock = threading.Lock()  # one thread at a time gives the state saver its turn
        self._mean_seconds = 1.0
        self.completed = 0
        self.cancelled = 0
        self.timeouts = 0
        self.errors = 0

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            return
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._run, name="ltd-decode-worker" + (f"-{i}" if i else ""), daemon=True) for i in range(self.max_batch)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running jobs, fail the waiting ones, and join the threads."""
        self._stopping.set()
        self.close()
        self.cancel_active()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        self._threads = []

    def close(self) -> int:
        """Accept no more jobs and fail the waiting ones (503); the running job goes on.
        Returns how many waiting jobs were failed."""
        self._closed.set()
        failed = 0
        with self._submit_lock:
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                failed += 1
                job.emit(Failed("unavailable", "the server is shutting down; retry on another instance or after the restart"))
        return failed

    def cancel_active(self, reason: str = "unavailable") -> bool:
        """Stop the running jobs at their next cycle boundary; False when none runs."""
        jobs = list(self._active)
        for job in jobs:
            job.cancel(reason)
        return bool(jobs)

    @property
    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    @property
    def busy(self) -> bool:
        return bool(self._active)

    def queue_depth(self) -> int:
        return self._queue.qsize()

    # -- submission --------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job or raise :class:`QueueFull` at once (never blocks)."""
        with self._submit_lock:  # close() drains the queue under this lock: no job slips in after it
            if self._stopping.is_set() or self._closed.is_set() or not self.alive:
                raise WorkerStopped("the server is shutting down")
            # With queue_size 0 a job may only start when a decode slot is idle.
            if self.queue_size == 0 and (len(self._active) >= self.max_batch or self._queue.qsize() > 0):
                raise QueueFull(0, self.retry_after())
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(self._queue.qsize(), self.retry_after()) from None

    def retry_after(self) -> int:
        """Seconds until the work ahead is likely done: the waiting jobs plus the running
        one, each taking the recent mean time per request. A client told "one job's time"
        while eight wait only finds the queue full again."""
        ahead = (self._queue.qsize() + len(self._active)) / self.max_batch
        return max(1, min(MAX_RETRY_AFTER, math.ceil(self._mean_seconds * max(ahead, 1))))

    # -- the thread --------------------------------------------------------------------
    def _run(self) -> None:
        log.info("decode worker started")
        while not self._stopping.is_set():
            if self.saver is not None and self._tick_lock.acquire(blocking=False):
                try:
                    self.saver.tick()
                finally:
                    self._tick_lock.release()
            try:
                job = self._queue.get(timeout=IDLE_POLL_SECONDS)
            except queue.Empty:
                continue
            self._active.add(job)
            try:
                if self.max_batch == 1:  # alone: on the compute thread, where the model was loaded
                    on_compute_thread(self._process, job)
                else:  # a lane: its forwards go to the compute thread (ltd.backends.packed)
                    self._process(job)
            except Exception:  # a bug: keep serving, tell the client, keep the traceback
                log.exception("job %d failed", job.id)
                self.errors += 1
                self.metrics.record_generation("error", len(job.prompt), 0, 0, 0, 0.0, None)
                job.emit(Failed("server_error", "internal error while generating; see the server log"))
            finally:
                self._active.discard(job)
        log.info("decode worker stopped")

    def _process(self, job: Job) -> None:
        if job.cancelled or job.expired:
            # Gave up while waiting in the queue: nothing to decode.
            job.cancel("timeout")
            self._end(job, job.cancel_reason or "timeout", _Progress(), 0.0)
            return
        started = time.monotonic()
        progress = _Progress()
        if job.prepare is not None:
            try:
                job.prompt, job.config.max_new_tokens = job.prepare()
            except InvalidPrompt as exc:  # the client's mistake, found by tokenizing: no generation ran
                job.emit(Failed("invalid_request", exc.message, exc.param, exc.code))
                return
        text = TextStream(self.codec.decode, job.stop)
        finish_reason: str | None = None
        outcome = "completed"
        results = self._results(job)
        try:
            for res in results:
                self._count(progress, res)
                delta = text.feed(res.new_tokens)
                if delta:
                    if progress.ttft is None:
                        progress.ttft = time.monotonic() - job.arrival
                    job.emit(TextDelta(delta))
                if text.stopped:
                    outcome, finish_reason = "stopped", "stop"
                    break
                if job.cancelled:
                    outcome = job.cancel_reason or "cancelled"
                    break
                if job.expired:
                    job.cancel("timeout")
                    outcome = "timeout"
                    break
            else:
                finish_reason = "stop" if progress.last_token in self.eos else "length"
        except LtdError as exc:
            self._end(job, "error", progress, time.monotonic() - started)
            job.emit(Failed("invalid_request", str(exc)))
            return
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()
        seconds = time.monotonic() - started
        if finish_reason is None:
            self._end(job, outcome, progress, seconds)
            return
        tail = text.finish()
        if tail:
            if progress.ttft is None:
                progress.ttft = time.monotonic() - job.arrival
            job.emit(TextDelta(tail))
        self._end(job, outcome, progress, seconds)
        job.emit(Finished(finish_reason, len(job.prompt), progress.generated))

    def _results(self, job: Job) -> Iterator[CycleResult]:
        if job.config.method in ("hf", "llama.cpp"):
            return self._hf_results(job)
        if self.batch is not None:
            return self.batch.stream(job.prompt, job.config)
        return self.engine.stream(job.prompt, job.config)

    def _hf_results(self, job: Job) -> Iterator[CycleResult]:
        """transformers' generate (and the llama.cpp reference loop) do not stream: the whole output is one result."""
        res = self.engine.generate(job.prompt, job.config)
        yield CycleResult(new_tokens=list(res.tokens), cycle=0, total_seconds=res.seconds)

    @staticmethod
    def _count(progress: _Progress, res: CycleResult) -> None:
        progress.generated += len(res.new_tokens)
        if res.new_tokens:
            progress.last_token = res.new_tokens[-1]
        if res.cycle > 0:
            progress.cycles += 1
            progress.cycle_tokens += res.num_accepted + 1

    def _end(self, job: Job, outcome: str, progress: _Progress, seconds: float) -> None:
        """Count the outcome and tell the handler how a job that did not finish ended."""
        if outcome in ("completed", "stopped"):
            self.completed += 1
            self._mean_seconds += DURATION_EMA * (seconds - self._mean_seconds)
        elif outcome == "timeout":
            self.timeouts += 1
            job.emit(Failed("timeout", "the request timed out before the generation finished"))
        elif outcome == "error":
            self.errors += 1
        else:  # cancelled by the client, or by shutdown
            self.cancelled += 1
            why = "the server is shutting down" if outcome == "unavailable" else "the request was cancelled"
            job.emit(Failed(outcome, why))
            outcome = "cancelled"
        self.metrics.record_generation(
            outcome, len(job.prompt), progress.generated, progress.cycles, progress.cycle_tokens, seconds, progress.ttft
        )
        log.debug("job %d %s: %d tokens in %.2f s", job.id, outcome, progress.generated, seconds)
