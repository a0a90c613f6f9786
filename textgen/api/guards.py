"""Checks every request passes before BentoML parses it: API key, readiness, content type, size, admission.

An ASGI middleware, so that the answers are cheap and uniform across routes: an oversized body is
refused before it is read in full, a wrong content type before anything is parsed, and the API key is
checked once for every route (health and metrics excepted, so probes and scrapers need no secret).
Errors have the route family's shape (api/errors.py).
"""

from __future__ import annotations

import hmac
import json
import re

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textgen.api.errors import Problem, draining, error_response, overloaded, shape_for
from textgen.api.health import INFO_PATH, LIVENESS_PATHS, READINESS_PATH, ServerState
from textgen.api.metrics import count_rejection
from textgen.config import Settings
from textgen.engine.handle import REQUEST_ID

UNGUARDED_PATHS = frozenset({*LIVENESS_PATHS, READINESS_PATH, "/metrics"})
# The Swagger page and the OpenAPI document work while the model loads; the APIs wait for it.
AVAILABLE_WHILE_LOADING = frozenset({"/", "/docs", "/docs.json", "/schema.json", INFO_PATH})
RETRY_LOADING_SECONDS = 5
GENERATION_PATHS = frozenset(
    {
        "/generate",
        "/generate_stream",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/messages",
    }
)
# A client's X-Request-ID names its request in the engine's logs; anything else is ignored (no log injection).
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def authorized(api_key: str | None, authorization: str | None, x_api_key: str | None = None) -> bool:
    """True when no key is configured, or `authorization` is `Bearer <key>`, or `x_api_key` (the X-Api-Key
    header, where Anthropic's clients send it) is the key."""
    if api_key is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    # compare_digest: the time taken does not reveal how much of the key was right.
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return True
    return x_api_key is not None and hmac.compare_digest(x_api_key.strip().encode(), api_key.encode())


def is_json(content_type: str | None) -> bool:
    media_type = (content_type or "").split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


class Guards:
    def __init__(self, app: ASGIApp, settings: Settings, state: ServerState) -> None:
        self.app = app
        self.settings = settings
        self.state = state  # its in_flight counts the generation requests let through and not yet answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or path in UNGUARDED_PATHS:
            return await self.app(scope, receive, send)

        async def refuse(problem: Problem) -> None:
            if problem.reason != "overloaded":  # overloaded() counts itself
                count_rejection(problem.reason)
            await error_response(shape_for(path), problem)(scope, receive, send)

        headers = Headers(scope=scope)
        if not authorized(self.settings.api_key, headers.get("authorization"), headers.get("x-api-key")):
            message = (
                "missing or wrong API key: send the server's TEXTGEN_API_KEY as "
                "'Authorization: Bearer <key>' (or 'X-Api-Key: <key>')"
            )
            auth = (("WWW-Authenticate", "Bearer"),)
            return await refuse(
                Problem(401, message, "unauthorized", loc=("header", "authorization"), headers=auth)
            )
        if not self.state.ready and path not in AVAILABLE_WHILE_LOADING:
            message = f"the model is {self.state.status}; retry when GET /readyz answers 200"
            retry = (("Retry-After", str(RETRY_LOADING_SECONDS)),)
            return await refuse(Problem(503, message, "not_ready", loc=(), headers=retry))
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        generation = path in GENERATION_PATHS
        if generation and self.state.draining:  # after SIGTERM: the requests in flight finish, no new ones
            return await refuse(draining())

        if not is_json(headers.get("content-type")):
            message = f"send the body as JSON with 'Content-Type: application/json' (got {headers.get('content-type')!r})"
            return await refuse(
                Problem(415, message, "unsupported_media_type", loc=("header", "content-type"))
            )
        limit = self.settings.max_body_bytes
        too_large = Problem(
            413,
            f"the body is larger than {limit} bytes (TEXTGEN_MAX_BODY_BYTES)",
            "body_too_large",
            loc=("body",),
        )
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await refuse(too_large)
        # Admission at the door, before the body is even read: counting here, ahead of BentoML's dispatcher,
        # keeps refusals fast under a burst (the engine's own queue bound only sees admitted requests).
        if generation and self.state.in_flight >= self.settings.max_batch_size + self.settings.max_queue:
            return await refuse(overloaded())
        body = await _read_body(receive, limit)
        if body is None:  # the client left while sending
            return
        if len(body) > limit:
            return await refuse(too_large)
        try:
            json.loads(body)
        except ValueError as exc:
            return await refuse(
                Problem(400, f"the body is not valid JSON: {exc}", "malformed_json", loc=("body",))
            )
        if not generation:
            return await self.app(scope, _replay(body, receive), send)
        request_id = headers.get("x-request-id")
        token = REQUEST_ID.set(
            request_id if request_id and REQUEST_ID_PATTERN.fullmatch(request_id) else None
        )
        self.state.in_flight += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.state.in_flight -= 1
            REQUEST_ID.reset(token)


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
