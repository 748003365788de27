"""Request and response shapes of the OpenAI API subset we serve, and its error bodies.

Requests are validated strictly (``"16"`` is not a valid ``max_tokens``) because the
OpenAI API is strict and a silently coerced value hides a client bug. Fields that would
change the output but that the decoder does not implement (``n > 1``, penalties,
logprobs, tools) are refused with a 400 naming the field rather than ignored: ignoring
them would return a plausible answer to a different question. Fields that do not change
the output (``user``, ``metadata``, ...) are accepted and ignored, since the official
clients send some of them.

Every client mistake becomes :class:`ApiError` with status 400 and the OpenAI error
body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Sequence

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

MAX_STOP_STRINGS = 4
ECHO_CHARS = 100  # a client's value quoted in an error message is cut to this length


def _no_lone_surrogates(value: str) -> str:
    """JSON may carry ``"\ud800"`` alone, which is no character: tokenizers and the
    UTF-8 response encoder fail on it, so it is refused here, naming the field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text holds an unpaired UTF-16 surrogate at position {exc.start}; send valid Unicode") from None
    return value


Text = Annotated[str, Field(strict=True), AfterValidator(_no_lone_surrogates)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
Temperature = Annotated[float, Field(strict=True, ge=0.0, le=2.0)]
TopP = Annotated[float, Field(strict=True, ge=0.0, le=1.0)]
# torch.manual_seed takes [-2**63, 2**64 - 1]; outside it raises deep in the decoder.
Seed = Annotated[int, Field(strict=True, ge=-(2**63), le=2**64 - 1)]


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """A client's value for an error message, cut so a huge one is not sent back whole."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# -- errors --------------------------------------------------------------------------


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body; raised anywhere, rendered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


# pydantic adds the union member or validator kind to an error location ("str",
# "list[str]", "function-after[...]"); those are not field names.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


def param_from_loc(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            if not out:  # a position in the raw JSON text, not a field
                break
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
        else:
            break
    return out or None


def api_error_from_validation(errors: Sequence[dict]) -> ApiError:
    """The first validation error as a 400 that names the offending field."""
    if not errors:
        return bad_request("invalid request body", None)
    err = errors[0]
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON ({detail})" if detail else "the request body is not valid JSON",
                           None, "invalid_json")
    param = param_from_loc(err.get("loc", ()))
    if param is None:
        return bad_request("the request body must be a JSON object (send it with Content-Type: application/json)",
                           None, "invalid_body")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    return bad_request(f"Invalid value for '{param}': {msg}", param, code)


# -- requests ------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


def _text_of_content(value: Any) -> str:
    """Message content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return _no_lone_surrogates(value)
    if isinstance(value, list):
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError('content parts must be {"type": "text", "text": "..."}; only text is supported')
            texts.append(_no_lone_surrogates(part["text"]))
        return "\n".join(texts)
    raise ValueError("content must be a string or a list of text parts")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: Text | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> str:
        return _text_of_content(value)

    def for_template(self) -> dict[str, str]:
        """The dict a chat template expects (``developer`` is OpenAI's new name for ``system``)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class _SamplingRequest(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: Text
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: StrictBool = False
    # "off" decodes this request plainly (no drafting); the output is the same.
    speculation: Literal["auto", "off"] = "auto"
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, str):
            return _no_lone_surrogates(value)
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            if len(value) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(value)}")
            return [_no_lone_surrogates(s) for s in value]
        raise ValueError(f"stop must be a string or a list of up to {MAX_STOP_STRINGS} strings")

    @field_validator("n")
    @classmethod
    def _n(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported (one completion per request)")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0, 0.0):
            raise ValueError("penalties are not supported (they would change the target's distribution); use 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list | None = None
    response_format: dict | None = None

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list | None) -> list | None:
        if value:
            raise ValueError("tools are not supported")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict | None) -> dict | None:
        if value and value.get("type") != "text":
            raise ValueError('only {"type": "text"} is supported')
        return value

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(value, parameter name): ``max_completion_tokens`` is OpenAI's newer name."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``: a raw prompt, no chat template."""

    prompt: str | list[int]
    echo: StrictBool | None = None
    suffix: Text | None = None
    best_of: StrictInt | None = None
    logprobs: StrictInt | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        # OpenAI accepts a string, token ids, or a batch of either; we serve one prompt.
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        if isinstance(value, str):
            if not value:
                raise ValueError("the prompt is empty")
            return _no_lone_surrogates(value)
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        raise ValueError("prompt must be a non-empty string or a list of token ids (one prompt per request)")

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    def requested_max_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"


# -- responses -----------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """Also the shape of each streamed chunk (``usage`` only on the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ltd"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict:
    """JSON-ready dict; ``usage`` is left out when absent, other nulls are kept (OpenAI does)."""
    data = model.model_dump()
    if data.get("usage", 0) is None:
        del data["usage"]
    for choice in data.get("choices", []):
        delta = choice.get("delta")
        if isinstance(delta, dict):
            choice["delta"] = {k: v for k, v in delta.items() if v is not None}
    return data
