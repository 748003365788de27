"""The checks every request passes before any route sees it: Host, API key, draining,
body size. A plain ASGI middleware, for the reasons :class:`ltd.serve.app.MetricsMiddleware`
gives, and because the body limit must hold while the body is still arriving.

Why each check:

- ``Host``: a page on any website can make the browser send requests to
  ``127.0.0.1`` under a name it controls (DNS rebinding); the browser then sends that
  name as ``Host``. Only the loopback names, the bound address and ``--allowed-hosts``
  are served.
- API key: optional; compared with :func:`hmac.compare_digest` so its length and
  content do not leak through response times. ``/health`` stays open for probes.
- Draining: after SIGTERM, new generations get 503 with ``Retry-After`` while the
  running one finishes (:mod:`ltd.serve.lifecycle`).
- Body size: a request larger than the model's context could ever use is refused with
  413 before it is held in memory; the body is read in chunks and at most the limit
  is kept.
"""

from __future__ import annotations

import hmac
import logging
from typing import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from ltd.serve.schemas import clip, error_body
from ltd.serve.settings import ServeSettings

log = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
OPEN_PATHS = ("/health",)  # no API key needed: load balancers and probes
DISCARD_LIMIT = 256 * 2**20  # past the limit, up to this much is read and dropped so the client sees the 413


class Draining:
    """Shared by the guard and the shutdown sequence: whether new work is refused, and
    how many generation requests are still being answered."""

    def __init__(self) -> None:
        self.active = False
        self.in_flight = 0


async def respond(scope, receive, send, status: int, message: str, type_: str, code: str,
                  headers: dict[str, str] | None = None, param: str | None = None) -> None:
    """Send an OpenAI-style JSON error from inside a middleware."""
    await JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)(scope, receive, send)


class GuardMiddleware:
    """Host allow-list, API key, draining and body-size checks (see the module doc)."""

    def __init__(self, app, settings: ServeSettings, body_limit: int, draining: Draining,
                 retry_after: Callable[[], int]) -> None:
        self.app = app
        self.settings = settings
        self.body_limit = body_limit
        self.draining = draining
        self.retry_after = retry_after
        self._key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope.get("path", "")
        host = headers.get("host", "")
        if not self.settings.host_allowed(host):
            log.warning("refused a request for Host %r (allow it with --allowed-hosts)", clip(host))
            await respond(scope, receive, send, 400, f"the Host header {clip(host)!r} is not served here; "
                          "start the server with --allowed-hosts to allow it", "invalid_request_error", "invalid_host")
            return
        if self._key is not None and path not in OPEN_PATHS and not self._authorized(headers):
            await respond(scope, receive, send, 401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                          "invalid_request_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return
        generating = scope.get("method") == "POST" and path in GENERATION_PATHS
        if generating and self.draining.active:
            await respond(scope, receive, send, 503, "the server is shutting down; retry on another instance or after "
                          "the restart", "server_error", "unavailable", {"Retry-After": str(self.retry_after())})
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            receive = await self._bounded_body(scope, receive, send, headers)
            if receive is None:
                return
        if not generating:
            await self.app(scope, receive, send)
            return
        self.draining.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.draining.in_flight -= 1

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), self._key)

    async def _bounded_body(self, scope, receive, send, headers: Headers):
        """The body read up to the limit, replayed to the app; None when a 413 was sent."""
        length = headers.get("content-length", "")
        too_big = length.isdigit() and int(length) > self.body_limit
        chunks: list[bytes] = []
        size = 0
        more = not too_big or int(length) <= DISCARD_LIMIT
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nobody to answer
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > self.body_limit:
                too_big = True
                chunks = []
                if size > DISCARD_LIMIT:
                    break
            elif not too_big:
                chunks.append(body)
            more = message.get("more_body", False)
        if too_big:
            await respond(scope, receive, send, 413,
                          f"the request body is larger than this server accepts ({self.body_limit} bytes, sized from the "
                          "model's context; raise it with --max-body-bytes)", "invalid_request_error", "request_too_large",
                          {"Connection": "close"})
            return None
        data = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return replay
