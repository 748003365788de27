"""The FastAPI application: OpenAI-compatible routes over one decode worker.

Handlers validate, encode the prompt, hand a :class:`~ltd.serve.worker.Job` to the
worker and turn its events into a JSON response or server-sent events. A streamed
response starts only when the first event arrives, so a request that fails before
producing text (timeout in the queue, prompt the model rejects) still gets a proper
HTTP status instead of a 200 with an error inside the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ltd.errors import LtdError
from ltd.serve import schemas
from ltd.serve.metrics import CONTENT_TYPE, ServerMetrics
from ltd.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest, bad_request
from ltd.serve.settings import ServeSettings
from ltd.serve.text import TextCodec
from ltd.serve.worker import Event, Failed, Finished, Job, QueueFull, TextDelta, Worker, WorkerStopped

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
CLIENT_CLOSED = 499  # nginx's code for "client closed the connection"; only ever seen in metrics
FAILURE_STATUS = {
    "invalid_request": (400, "invalid_request_error"),
    "timeout": (504, "timeout_error"),
    "cancelled": (CLIENT_CLOSED, "cancelled"),
    "unavailable": (503, "server_error"),
    "server_error": (500, "server_error"),
}


def _failure(event: Failed) -> ApiError:
    status, type_ = FAILURE_STATUS.get(event.kind, (500, "server_error"))
    return ApiError(status, event.message, type_, None, event.kind)


def sse(data: dict | str) -> str:
    """One server-sent event in the OpenAI format."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


class MetricsMiddleware:
    """Counts every HTTP response by endpoint and status, timed to its last byte.

    A plain ASGI middleware rather than ``@app.middleware``: Starlette's
    BaseHTTPMiddleware wraps ``receive``, which would hide client disconnects from
    the streaming responses, and it times a stream only to its first byte.
    """

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        start = time.monotonic()
        state = {"status": 500, "done": False}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            status = state["status"] if state["done"] else CLIENT_CLOSED
            self.metrics.record_request(endpoint, status, time.monotonic() - start)


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away (the body is already read, so the next
    ASGI message can only be the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            log.info("job %d: client disconnected", job.id)
            job.cancel("cancelled")
            return


async def _next_event(events: asyncio.Queue, job: Job) -> Event:
    """The worker's next event, or a timeout failure when the deadline passes first."""
    remaining = job.deadline - time.monotonic()
    try:
        return await asyncio.wait_for(events.get(), timeout=max(remaining, 0.0))
    except asyncio.TimeoutError:
        job.cancel("timeout")
        return Failed("timeout", "the request timed out before the generation finished")


class _Formatter:
    """Builds the response body and stream chunks of one endpoint."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = schemas.new_id("chatcmpl" if chat else "cmpl")
        self.created = schemas.now()

    def response(self, text: str, finish_reason: str, usage: schemas.Usage) -> dict:
        if self.chat:
            body = schemas.ChatCompletion(
                id=self.id, created=self.created, model=self.model, usage=usage,
                choices=[schemas.ChatChoice(message=schemas.AssistantMessage(content=text), finish_reason=finish_reason)],
            )
        else:
            body = schemas.Completion(
                id=self.id, created=self.created, model=self.model, usage=usage,
                choices=[schemas.CompletionChoice(text=text, finish_reason=finish_reason)],
            )
        return schemas.dump(body)

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = schemas.ChunkDelta(role="assistant" if role else None, content=text)
            body = schemas.ChatCompletionChunk(
                id=self.id, created=self.created, model=self.model,
                choices=[schemas.ChatChunkChoice(delta=delta, finish_reason=finish_reason)],
            )
        else:
            body = schemas.Completion(
                id=self.id, created=self.created, model=self.model,
                choices=[schemas.CompletionChoice(text=text or "", finish_reason=finish_reason)],
            )
        return schemas.dump(body)

    def usage_chunk(self, usage: schemas.Usage) -> dict:
        cls = schemas.ChatCompletionChunk if self.chat else schemas.Completion
        return schemas.dump(cls(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))


def create_app(engine, settings: ServeSettings, codec: TextCodec | None = None) -> FastAPI:
    """The server for one loaded engine.

    ``engine`` is an :class:`ltd.engine.Engine` (or anything with its ``stream``,
    ``generate``, ``target.tokenizer``, ``target.eos_token_ids`` and
    ``backend.max_context``/``vocab_size``). The worker thread starts and stops with
    the app's lifespan.
    """
    settings.validate()
    codec = codec or TextCodec(engine.target.tokenizer, engine.prompt_tokenizer)
    metrics = ServerMetrics()
    worker = Worker(engine, codec, engine.target.eos_token_ids, settings.queue_size, metrics)
    max_context = int(engine.backend.max_context)
    vocab_size = int(engine.backend.vocab_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        log.info("serving %s (method %s, queue %d, timeout %.0f s)", settings.model_name, settings.method,
                 settings.queue_size, settings.timeout)
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="ltd", description="OpenAI-compatible server over lossless speculative decoding", lifespan=lifespan)
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.settings = settings
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # -- errors --------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = schemas.api_error_from_validation(exc.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(schemas.error_body(str(exc.detail), type_), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(schemas.error_body("internal server error; see the server log", "server_error"), status_code=500)

    # -- helpers -------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise ApiError(400, f"The model '{name}' does not exist; this server serves '{settings.model_name}'.",
                           "invalid_request_error", "model", "model_not_found")

    def check_max_tokens(value: int | None, param: str) -> None:
        if value is not None and value > settings.max_tokens_limit:
            raise bad_request(f"{param} is {value}, above this server's limit of {settings.max_tokens_limit}", param)

    async def encode(fn: Callable, arg, param: str) -> list[int]:
        try:
            ids = await asyncio.to_thread(fn, arg)
        except LtdError as exc:
            raise bad_request(str(exc), param) from None
        if not ids:
            raise bad_request("the prompt encodes to no tokens", param)
        return ids

    def fit_context(prompt: list[int], max_tokens: int | None, prompt_param: str, tokens_param: str) -> int:
        """The request's max_tokens, checked against the context; an absent one is the
        server default, shortened to the room the prompt leaves (as OpenAI does)."""
        if len(prompt) + 1 > max_context:
            raise bad_request(f"the prompt has {len(prompt)} tokens but the model's context is {max_context}", prompt_param,
                              "context_length_exceeded")
        if max_tokens is None:
            return min(settings.default_max_tokens, max_context - len(prompt))
        if len(prompt) + max_tokens > max_context:
            raise bad_request(
                f"the prompt ({len(prompt)} tokens) plus {tokens_param} ({max_tokens}) exceeds the model's context of "
                f"{max_context} tokens; shorten the prompt or lower {tokens_param}",
                tokens_param, "context_length_exceeded",
            )
        return max_tokens

    async def generate(request: Request, body, prompt: list[int], max_tokens: int, chat: bool) -> Response:
        try:
            cfg = settings.generate_config(max_tokens, body.temperature, body.top_p, body.seed)
            cfg.validate()
        except LtdError as exc:
            raise bad_request(str(exc)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(prompt, cfg, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), body.stop_strings, settings.timeout)
        try:
            worker.submit(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), "rate_limit_error", None, "queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except WorkerStopped as exc:
            raise ApiError(503, str(exc), "server_error", None, "unavailable") from None
        fmt = _Formatter(chat, settings.model_name)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            if body.stream:
                first = await _next_event(events, job)
                if isinstance(first, Failed):
                    raise _failure(first)
                return StreamingResponse(
                    _stream(first, events, job, fmt, body.include_usage),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            parts: list[str] = []
            while True:
                event = await _next_event(events, job)
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, Finished):
                    usage = schemas.Usage.of(event.prompt_tokens, event.completion_tokens)
                    return JSONResponse(fmt.response("".join(parts), event.finish_reason, usage))
                else:
                    raise _failure(event)
        except asyncio.CancelledError:
            job.cancel("cancelled")
            raise
        finally:
            # From here on Starlette's StreamingResponse watches for the disconnect and
            # cancels _stream, whose finally cancels the job.
            watcher.cancel()

    # -- routes --------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        value, param = body.requested_max_tokens()
        check_max_tokens(value, param)
        prompt = await encode(codec.encode_chat, [m.for_template() for m in body.messages], "messages")
        max_tokens = fit_context(prompt, value, "messages", param)
        return await generate(request, body, prompt, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        value, param = body.requested_max_tokens()
        check_max_tokens(value, param)
        if isinstance(body.prompt, str):
            prompt = await encode(codec.encode_text, body.prompt, "prompt")
        else:
            bad = [t for t in body.prompt if not 0 <= t < vocab_size]
            if bad:
                raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
            prompt = list(body.prompt)
        max_tokens = fit_context(prompt, value, "prompt", param)
        return await generate(request, body, prompt, max_tokens, chat=False)

    @app.get("/v1/models")
    async def list_models() -> dict:
        card = schemas.ModelCard(id=settings.model_name, created=int(metrics.started))
        return schemas.ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != settings.model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist", "invalid_request_error", "model", "model_not_found")
        return schemas.ModelCard(id=settings.model_name, created=int(metrics.started)).model_dump()

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": "ok" if worker.alive else "unavailable",
            "model": settings.model_name,
            "method": settings.method,
            "busy": worker.busy,
            "queue_depth": worker.queue_depth(),
            "queue_size": settings.queue_size,
        }
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    return app


async def _stream(first: Event, events: asyncio.Queue, job: Job, fmt: _Formatter, include_usage: bool) -> AsyncIterator[str]:
    """The SSE body: a role chunk (chat), text chunks, a finish chunk, usage, ``[DONE]``.

    An error after the stream started is sent as ``data: {"error": ...}`` (the OpenAI
    client raises it as an APIError) and the stream ends without ``[DONE]``.
    """
    finished = False
    try:
        if fmt.chat:
            yield sse(fmt.chunk(text="", role=True))
        event = first
        while True:
            if isinstance(event, TextDelta):
                yield sse(fmt.chunk(text=event.text))
            elif isinstance(event, Finished):
                finished = True
                yield sse(fmt.chunk(text=None if fmt.chat else "", finish_reason=event.finish_reason))
                if include_usage:
                    yield sse(fmt.usage_chunk(schemas.Usage.of(event.prompt_tokens, event.completion_tokens)))
                yield sse("[DONE]")
                return
            else:
                finished = True
                yield sse(_failure(event).body())
                return
            event = await _next_event(events, job)
    finally:
        if not finished:
            job.cancel("cancelled")
