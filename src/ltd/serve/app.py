"""The FastAPI application: OpenAI-compatible routes over one decode worker.

Handlers validate, hand a :class:`~ltd.serve.worker.Job` to the worker (which
tokenizes the prompt inside its bounded work, :mod:`ltd.serve.prompt`) and turn its
events into a JSON response or server-sent events. :func:`create_app` only wires the
pieces: middleware (metrics, then the guard of :mod:`ltd.serve.guard`), error
handlers, routes and the lifespan that starts the worker and saves online state. A streamed
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
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ltd.errors import LtdError
from ltd.serve import schemas
from ltd.serve.metrics import CONTENT_TYPE, ServerMetrics
from ltd.serve.guard import Draining, GuardMiddleware
from ltd.serve.lifecycle import Shutdown
from ltd.serve.prompt import InvalidPrompt, PromptPlan, check_chars, longest_token_chars
from ltd.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest, bad_request, clip
from ltd.serve.settings import ServeSettings
from ltd.serve.state import StateSaver
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


def _failure(event: Failed, retry_after: int = 1) -> ApiError:
    status, type_ = FAILURE_STATUS.get(event.kind, (500, "server_error"))
    headers = {"Retry-After": str(retry_after)} if status == 503 else None
    return ApiError(status, event.message, type_, event.param, event.code or event.kind, headers)


def sse(data: dict | str) -> str:
    """One server-sent event in the OpenAI format."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


class MetricsMiddleware:
    """Counts every HTTP response by endpoint and the status it was sent with, timed to
    its last byte.

    A plain ASGI middleware rather than ``@app.middleware``: Starlette's
    BaseHTTPMiddleware wraps ``receive``, which would hide client disconnects from
    the streaming responses, and it times a stream only to its first byte. An
    exception no handler caught is answered here (JSON 500), so the 500 that is sent
    is also the 500 that is counted; a request whose client left before any response
    counts as 499.
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
        state = {"status": CLIENT_CLOSED, "started": False}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if state["started"]:
                raise
            log.exception("unhandled error on %s", path)
            body = schemas.error_body("internal server error; see the server log", "server_error")
            try:
                await JSONResponse(body, status_code=500)(scope, receive, send_wrapper)
            except OSError:  # the client is gone too
                pass
        finally:
            self.metrics.record_request(endpoint, state["status"], time.monotonic() - start)


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away (the body is already read, so the next
    ASGI message can only be the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            log.info("request %s: client disconnected; generation cancelled", job.request_id)
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


@dataclass
class _Server:
    """What the routes of one app share."""

    settings: ServeSettings
    codec: TextCodec
    metrics: ServerMetrics
    worker: Worker
    draining: Draining
    shutdown: Shutdown
    saver: StateSaver | None
    max_context: int
    vocab_size: int
    max_chars: int  # a prompt with more characters cannot fit the context


def create_app(engine, settings: ServeSettings, codec: TextCodec | None = None, batch=None) -> FastAPI:
    """The server for one loaded engine.

    ``engine`` is an :class:`ltd.engine.Engine` (or anything with its ``stream``,
    ``generate``, ``target.tokenizer``, ``target.eos_token_ids``,
    ``backend.max_context``/``vocab_size`` and optionally ``online``). The worker
    thread starts and stops with the app's lifespan; ``app.state.shutdown`` is the
    drain sequence a :class:`ltd.serve.lifecycle.GracefulServer` runs on SIGTERM.
    With ``settings.max_batch`` > 1 the worker decodes that many requests together on a
    :class:`ltd.batching.BatchedEngine` of ``engine`` (or on ``batch``, given by tests).
    """
    srv = _build(engine, settings, codec, batch)
    docs = settings.docs
    app = FastAPI(
        title="ltd", description="OpenAI-compatible server over lossless speculative decoding", lifespan=_lifespan(srv),
        docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None,
    )
    app.state.worker = srv.worker
    app.state.metrics = srv.metrics
    app.state.settings = settings
    app.state.shutdown = srv.shutdown
    app.state.saver = srv.saver
    _add_middleware(app, srv)
    _add_error_handlers(app)
    _add_generation_routes(app, srv)
    _add_info_routes(app, srv)
    return app


def _batch(engine, settings: ServeSettings):
    """The batched engine for ``--max-batch`` N > 1 (None for 1), checked before serving:
    the drafter must fork (a drafter that learns online from one sequence cannot)."""
    if settings.max_batch <= 1:
        return None
    from ltd.batching import BatchedEngine
    from ltd.drafting.base import fork_drafter

    batch = BatchedEngine(engine, settings.max_batch)
    fork_drafter(engine.drafter)
    return batch


def _build(engine, settings: ServeSettings, codec: TextCodec | None, batch=None) -> _Server:
    settings.validate()
    codec = codec or TextCodec(engine.target.tokenizer, engine.prompt_tokenizer)
    metrics = ServerMetrics()
    online = getattr(engine, "online", None)
    saver = StateSaver(online, settings.online_state, settings.save_every) if online is not None and settings.online_state else None
    worker = Worker(engine, codec, engine.target.eos_token_ids, settings.queue_size, metrics, saver, batch or _batch(engine, settings))
    draining = Draining()
    max_context = int(engine.backend.max_context)
    return _Server(
        settings=settings, codec=codec, metrics=metrics, worker=worker, draining=draining,
        shutdown=Shutdown(worker, draining, settings.drain_timeout), saver=saver, max_context=max_context,
        vocab_size=int(engine.backend.vocab_size), max_chars=max_context * longest_token_chars(codec.tokenizer),
    )


def _lifespan(srv: _Server):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.worker.start()
        s = srv.settings
        log.info("serving %s (method %s, queue %d, timeout %.0f s, body limit %d bytes)", s.model_name, s.method,
                 s.queue_size, s.timeout, s.body_limit(srv.max_context))
        try:
            yield
        finally:
            await asyncio.to_thread(srv.worker.stop)
            if srv.saver is not None:  # after the worker stopped: nothing changes the state any more
                await asyncio.to_thread(srv.saver.save, "shutdown")

    return lifespan


def _add_middleware(app: FastAPI, srv: _Server) -> None:
    app.add_middleware(GuardMiddleware, settings=srv.settings, body_limit=srv.settings.body_limit(srv.max_context),
                       draining=srv.draining, retry_after=srv.worker.retry_after)
    # Added last, so outermost: the guard's refusals are counted too.
    app.add_middleware(MetricsMiddleware, metrics=srv.metrics)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(InvalidPrompt)
    async def _invalid_prompt(request: Request, exc: InvalidPrompt) -> JSONResponse:
        err = bad_request(exc.message, exc.param, exc.code)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = schemas.api_error_from_validation(exc.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(schemas.error_body(str(exc.detail), type_), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


def _check_common(srv: _Server, body) -> tuple[int | None, str]:
    """Model and max_tokens checks both endpoints share; returns (max_tokens, its name)."""
    if body.model != srv.settings.model_name:
        raise ApiError(400, f"The model '{clip(body.model)}' does not exist; this server serves '{srv.settings.model_name}'.",
                       "invalid_request_error", "model", "model_not_found")
    value, param = body.requested_max_tokens()
    if value is not None and value > srv.settings.max_tokens_limit:
        raise bad_request(f"{param} is {value}, above this server's limit of {srv.settings.max_tokens_limit}", param)
    return value, param


def _add_generation_routes(app: FastAPI, srv: _Server) -> None:
    s = srv.settings

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        value, param = _check_common(srv, body)
        messages = [m.for_template() for m in body.messages]
        check_chars(sum(len(m["content"]) for m in messages), srv.max_chars, "messages")
        plan = PromptPlan(srv.codec.encode_chat, messages, "messages", value, param, srv.max_context, s.default_max_tokens)
        return await _generate(srv, request, body, plan, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        value, param = _check_common(srv, body)
        if isinstance(body.prompt, str):
            check_chars(len(body.prompt), srv.max_chars, "prompt")
            plan = PromptPlan(srv.codec.encode_text, body.prompt, "prompt", value, param, srv.max_context, s.default_max_tokens)
        else:
            bad = [t for t in body.prompt if not 0 <= t < srv.vocab_size]
            if bad:
                raise bad_request(f"token id {clip(bad[0])} is outside the vocabulary (0..{srv.vocab_size - 1})", "prompt")
            plan = PromptPlan(None, body.prompt, "prompt", value, param, srv.max_context, s.default_max_tokens)
        return await _generate(srv, request, body, plan, chat=False)


def _add_info_routes(app: FastAPI, srv: _Server) -> None:
    s, metrics, worker = srv.settings, srv.metrics, srv.worker

    @app.get("/v1/models")
    async def list_models() -> dict:
        card = schemas.ModelCard(id=s.model_name, created=int(metrics.started))
        return schemas.ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != s.model_name:
            raise ApiError(404, f"The model '{clip(model_id)}' does not exist", "invalid_request_error", "model", "model_not_found")
        return schemas.ModelCard(id=s.model_name, created=int(metrics.started)).model_dump()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive and not srv.draining.active
        body = {
            "status": "ok" if ok else ("draining" if srv.draining.active else "unavailable"),
            "model": s.model_name,
            "method": s.method,
            "busy": worker.busy,
            "queue_depth": worker.queue_depth(),
            "queue_size": s.queue_size,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)


async def _generate(srv: _Server, request: Request, body, plan: PromptPlan, chat: bool) -> Response:
    """Queue the job (the worker tokenizes the prompt) and answer from its events."""
    s = srv.settings
    try:
        cfg = s.generate_config(1, body.temperature, body.top_p, body.seed, body.speculation)  # max_tokens: by the worker
        cfg.validate()
    except LtdError as exc:
        raise bad_request(str(exc)) from None
    fmt = _Formatter(chat, s.model_name)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job([], cfg, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), body.stop_strings, s.timeout,
              prepare=plan.resolve, request_id=fmt.id)
    try:
        srv.worker.submit(job)
    except QueueFull as exc:
        raise ApiError(429, str(exc), "rate_limit_error", None, "queue_full",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    except WorkerStopped as exc:
        raise ApiError(503, str(exc), "server_error", None, "unavailable",
                       headers={"Retry-After": str(srv.worker.retry_after())}) from None
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    headers = {"X-Request-Id": fmt.id}
    try:
        if body.stream:
            first = await _next_event(events, job)
            if isinstance(first, Failed):
                raise _failure(first, srv.worker.retry_after())
            return StreamingResponse(
                _stream(first, events, job, fmt, body.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
            )
        return await _collect(srv, events, job, fmt, headers)
    except asyncio.CancelledError:
        job.cancel("cancelled")
        raise
    finally:
        # From here on Starlette's StreamingResponse watches for the disconnect and
        # cancels _stream, whose finally cancels the job.
        watcher.cancel()


async def _collect(srv: _Server, events: asyncio.Queue, job: Job, fmt: "_Formatter", headers: dict) -> JSONResponse:
    """The non-streamed answer: every text delta, then the finish or the failure."""
    parts: list[str] = []
    while True:
        event = await _next_event(events, job)
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Finished):
            usage = schemas.Usage.of(event.prompt_tokens, event.completion_tokens)
            return JSONResponse(fmt.response("".join(parts), event.finish_reason, usage), headers=headers)
        else:
            raise _failure(event, srv.worker.retry_after())


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
            log.info("request %s: client disconnected during the stream; generation cancelled", job.request_id)
            job.cancel("cancelled")
