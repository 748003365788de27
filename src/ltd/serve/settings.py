"""Server settings: what ``ltd serve`` flags become, validated before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ltd.defaults import DEFAULT_DEPTH, DEFAULT_SCHEDULE, DEFAULT_SIZE, DEFAULT_TOPK
from ltd.errors import LtdError

if TYPE_CHECKING:  # ltd.engine imports torch; `ltd --help` should not wait for it
    from ltd.engine import GenerateConfig


# OpenAI's default temperature; greedy (0) must be asked for. Documented in the README.
DEFAULT_TEMPERATURE = 1.0

# Request-body budget per context token: English text is ~4 bytes a token, a token-id
# list ("12345, ") ~7, an emoji sent as JSON escapes ~6; 8 covers them all.
BODY_BYTES_PER_TOKEN = 8
BODY_SLACK_BYTES = 64 * 1024  # the JSON around the prompt: other fields, several messages
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")

MAX_BATCH = 64  # requests decoded together at most: each holds its own cache entries and drafter state


@dataclass
class ServeSettings:
    """How the server decodes and how much it accepts.

    ``max_batch`` requests are decoded at once (continuous batching, :mod:`ltd.batching`);
    ``queue_size`` counts requests *waiting* behind those; one more gets 429. ``timeout`` bounds a request from arrival (queue wait included) to its
    last token. ``default_max_tokens`` applies when a request gives no ``max_tokens``.

    Hardening: ``max_body_bytes`` (None = sized from the model's context, see
    :meth:`body_limit`) caps what a client may send; ``allowed_hosts`` extends the
    loopback names and ``bind_host`` that the ``Host`` header may carry (``*`` = any),
    which stops DNS-rebinding pages from reaching a local server; ``api_key`` (None =
    open) is the Bearer token every route but ``/health`` needs; ``docs`` serves
    ``/docs``, ``/redoc`` and ``/openapi.json``. On shutdown the running generation
    gets ``drain_timeout`` seconds to finish; ``online_state`` is saved every
    ``save_every`` seconds (0 = only at shutdown) and at shutdown.
    """

    model_name: str
    method: str = "static"
    depth: int = DEFAULT_DEPTH
    topk: int = DEFAULT_TOPK
    size: int = DEFAULT_SIZE
    queue_size: int = 8
    max_batch: int = 1
    policy: str | None = None  # --method ltd's policy directory (None: the shipped one)
    schedule: str = DEFAULT_SCHEDULE  # --method schedule's draft length by batch size
    timeout: float = 300.0
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    max_body_bytes: int | None = None
    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    api_key: str | None = None
    docs: bool = False
    drain_timeout: float = 30.0
    online_state: str | None = None
    save_every: float = 300.0

    def validate(self) -> None:
        from ltd.engine import METHODS, method_of

        if self.method not in METHODS:
            raise LtdError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.queue_size < 0:
            raise LtdError(f"--queue-size must be >= 0, got {self.queue_size}")
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise LtdError(f"--max-batch must be between 1 and {MAX_BATCH}, got {self.max_batch}")
        if self.max_batch > 1 and method_of(self.method).run is not None:  # as BatchedEngine.check
            raise LtdError(f"--method {self.method} runs its own decoding loop and cannot batch; use --max-batch 1 or another method")
        if self.timeout <= 0:
            raise LtdError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.max_tokens_limit < 1:
            raise LtdError(f"--max-tokens-limit must be >= 1, got {self.max_tokens_limit}")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise LtdError(
                f"--default-max-tokens must be between 1 and --max-tokens-limit ({self.max_tokens_limit}), "
                f"got {self.default_max_tokens}"
            )
        if self.max_body_bytes is not None and self.max_body_bytes < 1024:
            raise LtdError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")
        if self.drain_timeout < 0:
            raise LtdError(f"--drain-timeout must be >= 0 seconds, got {self.drain_timeout}")
        if self.save_every < 0:
            raise LtdError(f"--save-every must be >= 0 seconds (0 = only at shutdown), got {self.save_every}")
        if self.api_key is not None and not self.api_key.strip():
            raise LtdError("--api-key is empty; give a secret or leave the flag out")
        self.generate_config(1, 0.0, 1.0, None).validate()

    def body_limit(self, max_context: int) -> int:
        """The largest request body accepted: the flag, else enough for a full context."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return BODY_BYTES_PER_TOKEN * max_context + BODY_SLACK_BYTES

    def host_allowed(self, host: str) -> bool:
        """Whether a ``Host`` header value (port included or not) names this server."""
        if "*" in self.allowed_hosts:
            return True
        name = host.strip().lower()
        if name.startswith("["):  # [::1]:8000
            name = name[: name.find("]") + 1] if "]" in name else name
        elif name.count(":") == 1:  # localhost:8000 (a bare IPv6 address has several colons)
            name = name.split(":", 1)[0]
        allowed = {h.lower() for h in (*LOOPBACK_HOSTS, *self.allowed_hosts)}
        bind = self.bind_host.lower()
        allowed |= {bind, f"[{bind}]"}
        return bool(name) and name in allowed

    def generate_config(
        self, max_tokens: int, temperature: float | None, top_p: float | None, seed: int | None, speculation: str = "auto"
    ) -> "GenerateConfig":
        """The engine's per-request config. ``top_p == 0`` keeps only the top token, i.e. greedy.
        ``speculation="off"`` decodes plainly (method ``ar``): the same output, no drafting."""
        from ltd.engine import GenerateConfig

        temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
        top_p = 1.0 if top_p is None else top_p
        if top_p == 0.0:
            temperature, top_p = 0.0, 1.0
        return GenerateConfig(
            method="ar" if speculation == "off" else self.method,
            max_new_tokens=max_tokens,
            depth=self.depth,
            topk=self.topk,
            size=self.size,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            policy=self.policy,
            schedule=self.schedule,
        )
