"""Turning a request's prompt into token ids, inside the decode worker's bounded work.

Why in the worker and not in the request handler: tokenizing is the one step whose
cost grows with what the client sends. Done in the handler, every request in flight
tokenizes at once, outside the queue limit, and a few large prompts exhaust memory
before any 429 can protect the server. Done by the worker, at most one prompt is
tokenized at a time, and only for a request that won a queue slot. What the handler
still checks, cheaply and before queueing, is the character count
(:func:`check_chars`): no tokenizer makes fewer tokens than characters divided by its
longest token, so a longer text cannot fit the context and is refused untokenized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ltd.errors import LtdError

FALLBACK_CHARS_PER_TOKEN = 32  # for a tokenizer that cannot list its vocabulary


class InvalidPrompt(Exception):
    """The prompt cannot be served; becomes a 400 naming ``param``."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def longest_token_chars(tokenizer) -> int:
    """Characters of the longest vocabulary entry (a byte-level entry is at least as
    long as the text it decodes to), the bound :func:`check_chars` needs."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return FALLBACK_CHARS_PER_TOKEN
    try:
        return max((len(t) for t in get_vocab()), default=FALLBACK_CHARS_PER_TOKEN)
    except Exception:  # a tokenizer whose vocabulary cannot be listed: the safe fallback
        return FALLBACK_CHARS_PER_TOKEN


def check_chars(chars: int, limit: int, param: str) -> None:
    """Refuse text that cannot fit the context, before tokenizing it."""
    if chars > limit:
        raise InvalidPrompt(
            f"the prompt has {chars} characters, more than the model's context can hold (at most {limit}); shorten it",
            param, "context_length_exceeded",
        )


@dataclass
class PromptPlan:
    """What the worker needs to make a request's prompt: text (or ids) and the checks.

    ``encode`` is None when the client sent token ids (``source`` is then the ids).
    """

    encode: Callable[[Any], list[int]] | None
    source: Any
    prompt_param: str
    max_tokens: int | None
    tokens_param: str
    max_context: int
    default_max_tokens: int

    def resolve(self) -> tuple[list[int], int]:
        """(prompt ids, max_tokens), or :class:`InvalidPrompt`."""
        if self.encode is None:
            ids = list(self.source)
        else:
            try:
                ids = self.encode(self.source)
            except LtdError as exc:
                raise InvalidPrompt(str(exc), self.prompt_param) from None
        if not ids:
            raise InvalidPrompt("the prompt encodes to no tokens", self.prompt_param)
        return ids, fit_context(len(ids), self.max_tokens, self.max_context, self.default_max_tokens,
                                self.prompt_param, self.tokens_param)


def fit_context(prompt_len: int, max_tokens: int | None, max_context: int, default_max_tokens: int,
                prompt_param: str, tokens_param: str) -> int:
    """The request's max_tokens, checked against the context; an absent one is the
    server default, shortened to the room the prompt leaves (as OpenAI does)."""
    if prompt_len + 1 > max_context:
        raise InvalidPrompt(f"the prompt has {prompt_len} tokens but the model's context is {max_context}", prompt_param,
                            "context_length_exceeded")
    if max_tokens is None:
        return min(default_max_tokens, max_context - prompt_len)
    if prompt_len + max_tokens > max_context:
        raise InvalidPrompt(
            f"the prompt ({prompt_len} tokens) plus {tokens_param} ({max_tokens}) exceeds the model's context of "
            f"{max_context} tokens; shorten the prompt or lower {tokens_param}",
            tokens_param, "context_length_exceeded",
        )
    return max_tokens
