"""Checks every request passes before BentoML parses it: health, API key, readiness, content type, size.

An ASGI middleware, so that the answers are cheap and uniform across routes: an oversized body is
refused before it is read in full, a wrong content type before anything is parsed, and the API key is
checked once for every route (health and metrics excepted, so probes and scrapers need no secret).
Errors have the route's shape: OpenAI's under /v1, textgen's elsewhere (see textgen/http.py).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textgen import http
from textgen.config import Settings
from textgen.metrics import count_rejection
from textgen.health import INFO_PATH, LIVENESS_PATHS, READINESS_PATH, ServerState

UNGUARDED_PATHS = frozenset({*LIVENESS_PATHS, READINESS_PATH, "/metrics"})
# The Swagger page and the OpenAPI document work while the model loads; the APIs wait for it.
AVAILABLE_WHILE_LOADING = frozenset({"/", "/docs", "/docs.json", "/schema.json", INFO_PATH})
RETRY_LOADING_SECONDS = 5
GENERATION_PATHS = frozenset({"/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"})


def authorized(api_key: str | None, authorization: str | None) -> bool:
    """True when no key is configured, or `authorization` is `Bearer <key>`."""
    if api_key is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    # compare_digest: the time taken does not reveal how much of the key was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def is_json(content_type: str | None) -> bool:
    media_type = (content_type or "").split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


class Guards:
    def __init__(self, app: ASGIApp, settings: Settings, state: ServerState) -> None:
        self.app = app
        self.settings = settings
        self.state = state
        self.in_flight = 0  # generation requests let through and not yet answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        if path in LIVENESS_PATHS:
            return await self._reply(scope, receive, send, *self.state.liveness())
        if path == READINESS_PATH:
            return await self._reply(scope, receive, send, *self.state.readiness())
        if path in UNGUARDED_PATHS:
            return await self.app(scope, receive, send)

        headers = Headers(scope=scope)
        if not authorized(self.settings.api_key, headers.get("authorization")):
            message = (
                "missing or wrong API key: send the server's TEXTGEN_API_KEY as 'Authorization: Bearer <key>'"
            )
            return await self._refuse(
                scope, receive, send, 401, "unauthorized", message, ("header", "authorization")
            )
        if path == INFO_PATH and scope["method"] == "GET":
            return await self._reply(scope, receive, send, 200, self.state.info())
        if not self.state.ready and path not in AVAILABLE_WHILE_LOADING:
            message = f"the model is {self.state.status}; retry when GET /readyz answers 200"
            return await self._refuse(scope, receive, send, 503, "not_ready", message, ())
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)

        if not is_json(headers.get("content-type")):
            message = f"send the body as JSON with 'Content-Type: application/json' (got {headers.get('content-type')!r})"
            return await self._refuse(
                scope, receive, send, 415, "unsupported_media_type", message, ("header", "content-type")
            )
        limit = self.settings.max_body_bytes
        too_large = f"the body is larger than {limit} bytes (TEXTGEN_MAX_BODY_BYTES)"
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(scope, receive, send, 413, "body_too_large", too_large, ("body",))
        generation = path in GENERATION_PATHS
        # Admission at the door, before the body is even read: counting here, ahead of BentoML's dispatcher,
        # keeps refusals fast under a burst (the engine's own queue bound only sees admitted requests).
        if generation and self.in_flight >= self.settings.max_batch_size + self.settings.max_queue:
            return await self._refuse_overloaded(scope, receive, send)
        body = await _read_body(receive, limit)
        if body is None:  # the client left while sending
            return
        if len(body) > limit:
            return await self._refuse(scope, receive, send, 413, "body_too_large", too_large, ("body",))
        try:
            json.loads(body)
        except ValueError as exc:
            message = f"the body is not valid JSON: {exc}"
            return await self._refuse(scope, receive, send, 400, "malformed_json", message, ("body",))
        if not generation:
            return await self.app(scope, _replay(body, receive), send)
        self.in_flight += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1

    async def _reply(
        self, scope: Scope, receive: Receive, send: Send, status: int, body: dict[str, Any]
    ) -> None:
        await JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})(
            scope, receive, send
        )

    async def _refuse_overloaded(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = http.overloaded_body(scope["path"].startswith("/v1/"))
        await http.overloaded(body)(scope, receive, send)

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        reason: str,
        message: str,
        loc: tuple[str, ...],
    ) -> None:
        count_rejection(reason)
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        elif status == 503:
            headers["Retry-After"] = str(RETRY_LOADING_SECONDS)
        if scope["path"].startswith("/v1/"):
            kind = "authentication_error" if status == 401 else "invalid_request_error"
            if status >= 500:
                kind = "server_error"
            code = "invalid_api_key" if status == 401 else reason  # OpenAI's code for a bad key
            body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        else:
            body = {"error": message, "detail": [{"loc": list(loc), "msg": message, "type": reason}]}
        await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, read until it ends or passes `limit` (then the rest is never read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit or not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then the real channel (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
