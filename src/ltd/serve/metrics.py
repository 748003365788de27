"""Server counters and gauges, rendered in the Prometheus text exposition format (0.0.4).

Written by hand rather than with ``prometheus_client``: the format is a few lines of
text, the server needs a dozen series, and one dependency fewer keeps ``ltd serve``
installable anywhere FastAPI is. All updates take one lock because the decode worker
thread and the event loop both write.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ACCEPTED_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)
OUTCOMES = ("completed", "stopped", "cancelled", "timeout", "error")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics)."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.n += 1
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out = [f"{name}_bucket{_labels({**labels, 'le': _num(b)})} {c}" for b, c in zip(self.buckets, self.counts)]
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.n}")
        out.append(f"{name}_sum{_labels(labels)} {_num(round(self.total, 6))}")
        out.append(f"{name}_count{_labels(labels)} {self.n}")
        return out


class ServerMetrics:
    """Everything ``GET /metrics`` reports.

    Gauges that belong to the worker (queue depth, busy) are read through callables at
    render time, so they can never drift from the real queue.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, str], int] = {}
        self.request_latency: dict[str, Histogram] = {}
        self.generations: dict[str, int] = {o: 0 for o in OUTCOMES}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cycles = 0
        self.cycle_tokens = 0  # tokens added by speculative cycles (accepted drafts + bonus)
        self.decode_seconds = 0.0
        self.ttft = Histogram()
        self.accepted = Histogram(ACCEPTED_BUCKETS)  # per request: tokens per cycle
        self.rejected = 0
        self.queue_depth: Callable[[], int] = lambda: 0
        self.queue_capacity: Callable[[], int] = lambda: 0
        self.busy: Callable[[], int] = lambda: 0
        self.max_batch: Callable[[], int] = lambda: 1
        # (forwards, rows) the batch ran so far; (0, 0) without batching
        self.batch_forwards: Callable[[], tuple[int, int]] = lambda: (0, 0)

    # -- updates ---------------------------------------------------------------------
    def record_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.request_latency.setdefault(endpoint, Histogram()).observe(seconds)
            if status == 429:
                self.rejected += 1

    def record_generation(
        self,
        outcome: str,
        prompt_tokens: int,
        generated_tokens: int,
        cycles: int,
        cycle_tokens: int,
        decode_seconds: float,
        ttft_seconds: float | None,
    ) -> None:
        with self._lock:
            self.generations[outcome] = self.generations.get(outcome, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated_tokens
            self.cycles += cycles
            self.cycle_tokens += cycle_tokens
            self.decode_seconds += decode_seconds
            if ttft_seconds is not None:
                self.ttft.observe(ttft_seconds)
            if cycles:
                self.accepted.observe(cycle_tokens / cycles)

    # -- reads -----------------------------------------------------------------------
    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding (queue waits excluded)."""
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens added per speculative cycle (accepted drafts + the bonus token)."""
        return self.cycle_tokens / self.cycles if self.cycles else 0.0

    def render(self) -> str:
        """The Prometheus text exposition of every series."""
        with self._lock:
            lines: list[str] = []

            def family(name: str, kind: str, help_: str, samples: list[str]) -> None:
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} {kind}")
                lines.extend(samples)

            family(
                "ltd_requests_total", "counter", "HTTP requests by endpoint and status code.",
                [f"ltd_requests_total{_labels({'endpoint': e, 'status': s})} {n}" for (e, s), n in sorted(self.requests.items())],
            )
            family("ltd_requests_rejected_total", "counter", "Requests refused with 429 because the queue was full.",
                   [f"ltd_requests_rejected_total {self.rejected}"])
            hist: list[str] = []
            for endpoint, h in sorted(self.request_latency.items()):
                hist += h.lines("ltd_request_duration_seconds", {"endpoint": endpoint})
            family("ltd_request_duration_seconds", "histogram", "Time from request to the last byte of the response.", hist)
            family(
                "ltd_generations_total", "counter",
                "Generations by outcome (completed: EOS or max_tokens; stopped: stop string; cancelled: client gone).",
                [f"ltd_generations_total{_labels({'outcome': o})} {n}" for o, n in sorted(self.generations.items())],
            )
            family("ltd_prompt_tokens_total", "counter", "Prompt tokens processed.", [f"ltd_prompt_tokens_total {self.prompt_tokens}"])
            family("ltd_generated_tokens_total", "counter", "Tokens generated.", [f"ltd_generated_tokens_total {self.generated_tokens}"])
            family("ltd_cycles_total", "counter", "Speculative draft-verify cycles (prefill excluded).", [f"ltd_cycles_total {self.cycles}"])
            family("ltd_cycle_tokens_total", "counter", "Tokens added by cycles (accepted drafts plus bonus).",
                   [f"ltd_cycle_tokens_total {self.cycle_tokens}"])
            family("ltd_decode_seconds_total", "counter", "Seconds the worker spent generating.",
                   [f"ltd_decode_seconds_total {_num(round(self.decode_seconds, 6))}"])
            family("ltd_tokens_per_second", "gauge", "Generated tokens per second of decoding since start.",
                   [f"ltd_tokens_per_second {_num(round(self.tokens_per_second, 4))}"])
            family("ltd_mean_accepted_length", "gauge", "Mean tokens added per speculative cycle since start.",
                   [f"ltd_mean_accepted_length {_num(round(self.mean_accepted_length, 4))}"])
            family("ltd_time_to_first_token_seconds", "histogram", "Time from request arrival to the first generated text.",
                   self.ttft.lines("ltd_time_to_first_token_seconds", {}))
            family("ltd_queue_depth", "gauge", "Requests waiting for the decode worker.", [f"ltd_queue_depth {self.queue_depth()}"])
            family("ltd_queue_capacity", "gauge", "Queue size beyond which requests get 429.", [f"ltd_queue_capacity {self.queue_capacity()}"])
            family("ltd_busy", "gauge", "Requests being decoded now (the batch size).", [f"ltd_busy {self.busy()}"])
            family("ltd_batch_size", "gauge", "Requests being decoded together now.", [f"ltd_batch_size {self.busy()}"])
            family("ltd_max_batch", "gauge", "Requests the server decodes together at most (--max-batch).",
                   [f"ltd_max_batch {self.max_batch()}"])
            forwards, rows = self.batch_forwards()
            family("ltd_batch_forwards_total", "counter", "Target forwards shared by a batch.", [f"ltd_batch_forwards_total {forwards}"])
            family("ltd_batch_rows_total", "counter", "Rows (tokens of every request) scored by those forwards.",
                   [f"ltd_batch_rows_total {rows}"])
            family("ltd_request_accepted_length", "histogram", "Per finished request: tokens added per speculative cycle.",
                   self.accepted.lines("ltd_request_accepted_length", {}))
            family("ltd_start_time_seconds", "gauge", "Unix time the server started.", [f"ltd_start_time_seconds {_num(round(self.started, 3))}"])
            return "\n".join(lines) + "\n"
