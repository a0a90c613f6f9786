"""The OpenAPI document as textgen answers: its error shapes, every status it can return, SSE events.

BentoML documents each API with its own generic errors (400/404/500, `detail` a string). textgen's
routes answer more (401, 413, 415, 429, 503, 504) and in their own shapes, so /docs.json is rewritten
on the way out to say what clients will really get; schema-driven clients and fuzzers rely on it.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

DOCUMENT_PATH = "/docs.json"

TEXTGEN_ERROR = {
    "type": "object",
    "title": "TextgenError",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What went wrong and what to do."},
        "detail": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"type": "string"}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}
OPENAI_ERROR = {
    "type": "object",
    "title": "OpenAIError",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}
STATUSES = {
    400: "Invalid request: the body, a parameter, or a prompt too long for the context",
    401: "Missing or wrong API key (when TEXTGEN_API_KEY is set)",
    404: "Unknown model (OpenAI routes)",
    413: "Body larger than TEXTGEN_MAX_BODY_BYTES",
    415: "Body not sent as application/json",
    429: "Queue full (TEXTGEN_MAX_QUEUE); retry after Retry-After seconds",
    500: "Generation failed",
    503: "Model still loading, or the server is shutting down; retry after Retry-After seconds",
    504: "Not finished within TEXTGEN_TIMEOUT; the generation was stopped",
}


# The routes whose `stream: true` answers Server-Sent Events (not /v1/messages/count_tokens's). Chat and
# completions send chunks of their JSON answer's shape; the Responses and Messages APIs send typed events that
# hold the answer's object as it grows (schemathesis checks every event against the schema): their title, what
# types they are, and the field that holds the answer.
STREAMING = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages")
TYPED_EVENTS = {
    "/v1/responses": (
        "ResponseStreamEvent",
        "response.created, response.in_progress, response.output_item.added, response.content_part.added, "
        "response.output_text.delta, response.reasoning_text.delta, response.function_call_arguments.delta, "
        "their .done events, response.completed or response.incomplete (each with a sequence_number)",
        "response",
    ),
    "/v1/messages": (
        "MessageStreamEvent",
        "message_start, ping, content_block_start, content_block_delta, content_block_stop, message_delta, "
        "message_stop, or error",
        "message",
    ),
}


def _typed_event(title: str, kinds: str, holder: str, answer: dict[str, Any]) -> dict[str, Any]:
    """A stream event with a `type` (one of `kinds`), holding the answer object under `holder` in some."""
    return {
        "type": "object",
        "title": title,
        "required": ["type"],
        "properties": {"type": {"type": "string", "description": kinds}, holder: answer},
    }


def rewrite(document: dict[str, Any]) -> dict[str, Any]:
    document = _openapi30(document)
    for path, item in document.get("paths", {}).items():
        operation = item.get("post")
        if operation is None or "requestBody" not in operation:
            continue
        schema = OPENAI_ERROR if path.startswith("/v1/") else TEXTGEN_ERROR
        responses = operation["responses"]
        for status, description in STATUSES.items():
            responses[str(status)] = {
                "description": description,
                "content": {"application/json": {"schema": schema}},
            }
        for status in (200, 400, 404, 500):  # BentoML's keys are ints: one key per status in the JSON
            if status in responses:
                responses[str(status)] = responses.pop(status) if status == 200 else responses[str(status)]
                responses.pop(status, None)
        ok = responses.get("200", {})
        content = ok.get("content", {})
        if "text/event-stream" in content:  # the events' `data` carries the documented JSON
            stream = content["text/event-stream"]
            stream["schema"] = _sse_event(stream["schema"], schema)
        elif path in STREAMING and "application/json" in content:  # `stream: true` answers SSE
            answer = content["application/json"]["schema"]
            event = _typed_event(*TYPED_EVENTS[path], answer) if path in TYPED_EVENTS else answer
            content["text/event-stream"] = {"schema": _sse_event(event, schema)}
    return document


def _openapi30(node: Any) -> Any:
    """pydantic writes JSON Schema 2020-12; the document says OpenAPI 3.0, whose bounds and nulls differ."""
    if isinstance(node, list):
        return [_openapi30(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _openapi30(v) for k, v in node.items()}
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        value = node.get(flag)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            node[bound], node[flag] = value, True
    options = node.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        del node["anyOf"]
        node.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
        node["nullable"] = True
    return node


def _sse_event(data_schema: dict[str, Any], error_schema: dict[str, Any]) -> dict[str, Any]:
    """An SSE event whose data is the documented JSON, or an error (a failure after the stream began)."""
    return {
        "type": "object",
        "title": "ServerSentEvent",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "description": "JSON (see contentSchema), or [DONE] at the end of an OpenAI stream.",
                "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [data_schema, error_schema]},
            }
        },
    }


class DocumentRewriter:
    """ASGI middleware: rewrites BentoML's GET /docs.json answer with `rewrite`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != DOCUMENT_PATH:
            return await self.app(scope, receive, send)
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        assert start is not None
        body = b"".join(chunks)
        if start["status"] == 200:
            body = json.dumps(rewrite(json.loads(body))).encode()
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})
