"""Prompt encoding and incremental detokenization for the server.

Why decode the whole generated list after every cycle instead of each new token on its
own: byte-level BPE tokens can end in the middle of a UTF-8 character (SmolLM2 writes an
emoji as two tokens), and decoding such a token alone yields replacement characters.
Decoding everything and emitting only the complete new suffix keeps every streamed chunk
valid text. Stop strings are applied to the same text, and a suffix that could still
grow into a stop string is held back, so a chunk is only ever sent when it is final.
Streaming and non-streaming responses are both built from :class:`TextStream`'s deltas,
which makes them equal by construction.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

from ltd.errors import LtdError

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"


class TextCodec:
    """The tokenizer, shared by request handlers (encode) and the decode worker (decode).

    Why a lock: Hugging Face fast tokenizers are Rust objects that raise "Already
    borrowed" when one thread changes their padding/truncation state while another
    uses them. Calls take microseconds to a few milliseconds, so one lock costs nothing
    measurable and rules the problem out.
    """

    def __init__(self, tokenizer, tokenize: Callable[[str], list[int]] | None = None) -> None:
        self.tokenizer = tokenizer
        self.tokenize = tokenize  # the backend's own tokenizer (llama.cpp), as Engine.encode uses
        self._lock = threading.Lock()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a whole conversation through the chat template, ready for the reply.

        Called like :func:`ltd.models.encode_prompt`, so one user message gives exactly
        the tokens ``ltd generate --prompt`` uses.
        """
        if not self.has_chat_template:
            raise LtdError("this model has no chat template; use /v1/completions with a raw prompt")
        from jinja2.exceptions import TemplateError

        from ltd.models import encode_messages

        try:
            with self._lock:
                return encode_messages(self.tokenizer, messages, self.tokenize)
        except (TemplateError, ValueError) as exc:
            raise LtdError(f"the model's chat template rejected the messages: {exc}") from None

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a raw prompt (no chat template), as ``ltd generate --raw`` encodes it."""
        from ltd.models import encode_raw

        with self._lock:
            return encode_raw(self.tokenizer, text, self.tokenize)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens dropped (as :class:`ltd.engine.Engine` does)."""
        with self._lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string.

    That suffix may still become a stop string with the next tokens, so it is not final.
    """
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """Generated token ids in, final text deltas out.

    ``feed`` after every cycle, ``finish`` once at the end; the concatenation of all
    returned deltas is the response text. After a stop string is seen, ``stopped`` is
    True, the text is cut before it, and the caller should stop generating.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False
        self._warned = False

    def feed(self, tokens: Sequence[int]) -> str:
        """Add one cycle's tokens; return the newly final text (often "")."""
        if self.stopped:
            return ""
        self.tokens.extend(int(t) for t in tokens)
        text = self._decode(self.tokens)
        cut = find_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            return self._advance(text[:cut])
        # A trailing replacement character is an incomplete multi-byte character.
        stable = text.rstrip(REPLACEMENT_CHAR)
        stable = stable[: len(stable) - partial_stop_length(stable, self.stop)]
        return self._advance(stable)

    def finish(self) -> str:
        """Generation ended: release what was held back (a cut-off character stays a
        replacement character, exactly as the non-streamed decode shows it)."""
        if self.stopped:
            return ""
        return self._advance(self._decode(self.tokens))

    def _advance(self, final: str) -> str:
        if final.startswith(self.text):
            delta = final[len(self.text):]
            self.text = final
            return delta
        # Only a tokenizer whose decode rewrites earlier text gets here; what was sent
        # cannot be taken back, so keep appending past it.
        if not self._warned:
            log.warning("tokenizer decode changed already streamed text; streamed output may differ slightly")
            self._warned = True
        if len(final) <= len(self.text):
            return ""
        delta = final[len(self.text):]
        self.text += delta
        return delta
