"""HTTP glue between BentoML and the generator: bodies, errors, deferred responses and SSE.

BentoML's dispatcher runs one batch at a time per worker. If the batch function waited for its
generations, every new arrival would wait for the slowest of them. So the batchable /generate API only
*admits*: it validates, templates and tokenizes the requests that arrived together, hands them to the
engine, and returns at once a response object per request that waits for that request's result while
it is being sent. The dispatcher is free again within milliseconds; the engine batches per step.

Error bodies everywhere have one shape, the one BentoML uses for its own validation errors:
    {"error": "<summary>", "detail": [{"loc": ["<field>"], "msg": "<what is allowed>", "type": "..."}]}
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from _bentoml_sdk.io_models import IORootModel
from pydantic import BaseModel, ValidationError, field_validator
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from textgen.engine import QueueFull, RequestHandle
from textgen.generator import PreparedRequest, TextGenerator
from textgen.metrics import count_rejection
from textgen.params import RANGES, ParamError, fmt_number
from textgen.schemas import GenerateRequest, GenerateResponse, StreamEvent
from textgen.sequence import GenerationResult

log = logging.getLogger(__name__)

# -- request and response specs for BentoML ------------------------------------------------------


def json_body(schema: type[BaseModel], doc: str, maximums: dict[str, int] | None = None) -> type[IORootModel]:
    """A BentoML input spec that hands the raw JSON body to the API as a one-item list.

    `schema` only documents the body (OpenAPI); validation happens in the API itself, so that every
    error has the route's own shape and names the bare field. `maximums` publishes this server's
    configured limits (e.g. TEXTGEN_MAX_NEW_TOKENS) in place of the schema's absolute bounds.
    """

    class Body(IORootModel[list[Any]]):  # any JSON: our own parse says what is wrong
        @field_validator("root", mode="before")
        @classmethod
        def _one_item(cls, value: Any) -> Any:
            return [value]

        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
            body_schema = schema.model_json_schema(*args, **kwargs)
            for name, maximum in (maximums or {}).items():
                field = body_schema["properties"][name]
                field["description"] = field["description"].replace(
                    f", {fmt_number(field['maximum'])}]", f", {maximum}]"
                )
                field["maximum"] = maximum
            body_schema["root_input"] = True
            return body_schema

    Body.__root_input__ = True  # BentoML: the whole body is the one argument
    Body.__name__ = Body.__qualname__ = f"{schema.__name__}Body"
    Body.__doc__ = doc
    return Body


def generate_body(max_new_tokens: int) -> type[IORootModel]:
    """The /generate and /generate_stream body spec, with this server's max_new_tokens limit."""
    return json_body(
        GenerateRequest,
        "A flat JSON object (GenerateRequest), presented to the batchable API as a one-item list.",
        maximums={"max_new_tokens": max_new_tokens},
    )


class GenerateReply(IORootModel[GenerateResponse]):
    """Documents the 200 body; the response itself comes from `admit` (one per request)."""

    @classmethod
    async def to_http_response(cls, obj: Any, serde: Any) -> Response:
        (response,) = obj
        return response


def response_spec(schema: type[BaseModel], media_type: str, doc: str) -> type[IORootModel]:
    """A BentoML output spec for an API that returns a ready starlette Response; `schema` documents it."""

    class Reply(IORootModel[schema]):  # type: ignore[valid-type]
        @classmethod
        async def to_http_response(cls, obj: Any, serde: Any) -> Response:
            return obj

    Reply.media_type = media_type
    Reply.__name__ = Reply.__qualname__ = f"{schema.__name__}Reply"
    Reply.__doc__ = doc
    return Reply


StreamReply = response_spec(StreamEvent, "text/event-stream", "Documents one event of the SSE stream.")


# -- errors ----------------------------------------------------------------------------------------


def error_response(status: int, summary: str, detail: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"error": summary, "detail": detail}, status_code=status)


def param_error_response(exc: ParamError) -> JSONResponse:
    return error_response(
        400,
        exc.message,
        [{"loc": [exc.field], "msg": exc.message, "type": "value_error"}],
    )


def validation_error_response(exc: ValidationError) -> JSONResponse:
    detail = []
    for err in exc.errors(include_context=False, include_input=False, include_url=False):
        loc = [str(part) for part in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        field = loc[0] if loc else ""
        if field in RANGES and str(RANGES[field]) not in msg:
            msg = f"{msg}; {field} must be a number in {RANGES[field]}"
        detail.append({"loc": loc, "msg": msg, "type": err["type"]})
    summary = "; ".join(f"{'.'.join(d['loc']) or 'body'}: {d['msg']}" for d in detail)
    return error_response(400, summary, detail)


OVERLOADED = "the server is at capacity (TEXTGEN_MAX_QUEUE requests are waiting); retry after a second"
RETRY_AFTER_SECONDS = 1


def overloaded_body(openai_shape: bool) -> dict[str, Any]:
    if openai_shape:
        return {"error": {"message": OVERLOADED, "type": "server_error", "param": None, "code": "overloaded"}}
    return {"error": OVERLOADED, "detail": []}


def overloaded(body: dict[str, Any]) -> JSONResponse:
    """429: the queue is full (at the door, or in the engine); the client should retry shortly."""
    count_rejection("overloaded")
    return JSONResponse(body, status_code=429, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def overloaded_response(exc: QueueFull) -> JSONResponse:
    log.info("refused a request: %s", exc)
    return overloaded(overloaded_body(openai_shape=False))


def parse_request(raw: Any) -> GenerateRequest | JSONResponse:
    if not isinstance(raw, dict):
        return error_response(
            400,
            'the body must be a JSON object such as {"prompt": "What is AI?"}',
            [{"loc": [], "msg": "expected a JSON object", "type": "model_type"}],
        )
    try:
        return GenerateRequest.model_validate(raw)
    except ValidationError as exc:
        return validation_error_response(exc)


# -- /generate -------------------------------------------------------------------------------------


def admit(generator: TextGenerator, bodies: list[Any]) -> list[Response]:
    """Admit a batch of /generate bodies into the engine; one response object per body."""
    parsed = [parse_request(b) for b in bodies]
    valid = [p for p in parsed if isinstance(p, GenerateRequest)]
    prepared = iter(generator.prepare(valid))
    responses: list[Response] = []
    for p in parsed:
        if isinstance(p, Response):
            responses.append(p)
            continue
        item = next(prepared)
        if isinstance(item, ParamError):
            responses.append(param_error_response(item))
            continue
        try:
            responses.append(GenerationResponse(generator, item))
        except QueueFull as exc:
            responses.append(overloaded_response(exc))
    return responses


CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away before the answer"


class DeferredJSONResponse(Response):
    """A JSON response whose status and body are known only when the engine finishes.

    While waiting it listens for the client going away, and cancels the work if so: its sequences leave
    the batch at the next step instead of generating for nobody. It always sends a response, even to a
    client that is gone: BentoML's timeout middleware waits for a response to start and would otherwise
    hold the request, and its concurrency slot, until the timeout (and stall shutdown meanwhile).
    """

    media_type = "application/json"

    def __init__(self, handles: list[RequestHandle], timeout: float) -> None:
        super().__init__(media_type=self.media_type)
        self.handles = handles
        self.timeout = timeout  # TEXTGEN_TIMEOUT: after it, the work stops and the client gets a 504

    def render_results(self, results: list[GenerationResult]) -> tuple[int, dict[str, Any]]:
        """Status and JSON body for the finished requests."""
        raise NotImplementedError

    def render_timeout(self) -> dict[str, Any]:
        return {"error": timeout_message(self.timeout), "detail": []}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        results_task = asyncio.ensure_future(asyncio.gather(*(h.result() for h in self.handles)))
        gone_task = asyncio.ensure_future(_client_gone(receive))
        try:
            await asyncio.wait(
                {results_task, gone_task}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not results_task.done():
                for handle in self.handles:
                    handle.cancel()  # timed out, client gone, or we were cancelled (shutdown)
                results_task.cancel()
            gone_task.cancel()
        if results_task.done() and not results_task.cancelled():
            self.status_code, body = self.render_results(results_task.result())
            self.body = json.dumps(body, ensure_ascii=False).encode()
        elif gone_task.done():
            self.status_code, self.body = CLIENT_CLOSED_REQUEST, b""
        else:
            count_rejection("timeout")
            self.status_code, self.body = 504, json.dumps(self.render_timeout()).encode()
        self.init_headers()
        await super().__call__(scope, receive, send)


def timeout_message(timeout: float) -> str:
    return (
        f"the request did not finish within {timeout:g} s (TEXTGEN_TIMEOUT) and was stopped; "
        "ask for fewer tokens, retry when the server is less busy, or raise TEXTGEN_TIMEOUT"
    )


class GenerationResponse(DeferredJSONResponse):
    """/generate's answer: the generated text, post-processed, or what went wrong."""

    def __init__(self, generator: TextGenerator, prepared: PreparedRequest) -> None:
        super().__init__([generator.submit(prepared)], generator.settings.request_timeout)
        self.generator = generator
        self.prepared = prepared

    def render_results(self, results: list[GenerationResult]) -> tuple[int, dict[str, Any]]:
        (result,) = results
        if result.finish_reason == "error":
            return 500, {"error": f"generation failed: {result.error}", "detail": []}
        if result.finish_reason == "cancelled":
            return 503, {"error": "the server is shutting down; retry", "detail": []}
        return 200, self.generator.response(self.prepared, result).model_dump(mode="json")


async def _client_gone(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# -- /generate_stream ------------------------------------------------------------------------------


def stream(generator: TextGenerator, body: Any) -> Response:
    """Validate and start a streamed generation; an invalid body is a plain JSON 4xx, not a stream."""
    parsed = parse_request(body)
    if isinstance(parsed, Response):
        return parsed
    (prepared,) = generator.prepare([parsed])
    if isinstance(prepared, ParamError):
        return param_error_response(prepared)
    try:
        handle = generator.submit(prepared)
    except QueueFull as exc:
        return overloaded_response(exc)

    async def events() -> AsyncIterator[str]:
        # Leaving this generator early (client disconnect) cancels the request: see RequestHandle.stream.
        async for event in handle.stream():
            if event.result is None:
                yield sse(StreamEvent(text=event.text).model_dump(mode="json", exclude_none=True))
            elif event.result.finish_reason in ("error", "cancelled"):
                yield sse({"error": event.result.error or event.result.finish_reason})
            else:
                final = generator.final_event(prepared, event.result, event.text)
                yield sse(final.model_dump(mode="json", exclude_none=True))

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
