"""Server settings: what ``ltd serve`` flags become, validated before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ltd.defaults import DEFAULT_DEPTH, DEFAULT_SIZE, DEFAULT_TOPK
from ltd.errors import LtdError

if TYPE_CHECKING:  # ltd.engine imports torch; `ltd --help` should not wait for it
    from ltd.engine import GenerateConfig

METHODS = ("hf", "llama.cpp", "ar", "static")  # ltd.engine.METHODS (checked again by GenerateConfig.validate)

# OpenAI's default temperature; greedy (0) must be asked for. Documented in the README.
DEFAULT_TEMPERATURE = 1.0


@dataclass
class ServeSettings:
    """How the server decodes and how much it accepts.

    ``queue_size`` counts requests *waiting* behind the one being decoded; one more
    gets 429. ``timeout`` bounds a request from arrival (queue wait included) to its
    last token. ``default_max_tokens`` applies when a request gives no ``max_tokens``.
    """

    model_name: str
    method: str = "static"
    depth: int = DEFAULT_DEPTH
    topk: int = DEFAULT_TOPK
    size: int = DEFAULT_SIZE
    queue_size: int = 8
    timeout: float = 300.0
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256

    def validate(self) -> None:
        if self.method not in METHODS:
            raise LtdError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.queue_size < 0:
            raise LtdError(f"--queue-size must be >= 0, got {self.queue_size}")
        if self.timeout <= 0:
            raise LtdError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.max_tokens_limit < 1:
            raise LtdError(f"--max-tokens-limit must be >= 1, got {self.max_tokens_limit}")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise LtdError(
                f"--default-max-tokens must be between 1 and --max-tokens-limit ({self.max_tokens_limit}), "
                f"got {self.default_max_tokens}"
            )
        self.generate_config(1, 0.0, 1.0, None).validate()

    def generate_config(self, max_tokens: int, temperature: float | None, top_p: float | None, seed: int | None) -> "GenerateConfig":
        """The engine's per-request config. ``top_p == 0`` keeps only the top token, i.e. greedy."""
        from ltd.engine import GenerateConfig

        temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
        top_p = 1.0 if top_p is None else top_p
        if top_p == 0.0:
            temperature, top_p = 0.0, 1.0
        return GenerateConfig(
            method=self.method,
            max_new_tokens=max_tokens,
            depth=self.depth,
            topk=self.topk,
            size=self.size,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
