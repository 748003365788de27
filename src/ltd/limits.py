"""The prompt and context-length check every entry point shares.

One function, so the engine's methods, the transformers peers and the cycle refuse an
empty prompt or an over-long request with the same one-line message naming the fix.
"""

from __future__ import annotations

from typing import Sized

from ltd.errors import LtdError


def check_prompt_fits(prompt: Sized, max_new_tokens: int, max_context: int, fix: str = "lower --max-new-tokens") -> None:
    """Refuse an empty prompt, or one that leaves no room for ``max_new_tokens`` tokens.

    ``fix`` names the knob the caller's user turns (a flag, a request field).
    """
    if len(prompt) == 0:
        raise LtdError("the prompt is empty; give some text with --prompt")
    if max_new_tokens < 1:
        raise LtdError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > max_context:
        raise LtdError(
            f"prompt ({len(prompt)} tokens) + max-new-tokens ({max_new_tokens}) exceeds the model's context "
            f"of {max_context}; shorten the prompt or {fix}"
        )
