"""/generate and /generate_stream: parse, go through the one door, answer in textgen's shape."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from textgen.api.bentoml_io import json_body, response_spec
from textgen.api.errors import TEXTGEN, Problem, error_response, invalid_body, overloaded
from textgen.api.responses import DeferredJSONResponse, event_stream, failure, sse
from textgen.engine.params import ParamError
from textgen.engine.outputs import GenerationResult, QueueFull
from textgen.frontend import generate_protocol as protocol
from textgen.frontend.generate_protocol import GenerateRequest, GenerateResponse, StreamEvent
from textgen.frontend.prepare import Frontend, Prepared

log = logging.getLogger(__name__)


def body_spec(max_new_tokens: int) -> type:
    """The /generate and /generate_stream body spec, with this server's max_new_tokens limit."""
    return json_body(
        GenerateRequest,
        "A flat JSON object (GenerateRequest); BentoML's clients send it as keyword arguments.",
        maximums={"max_new_tokens": max_new_tokens},
    )


GenerateReply = response_spec(GenerateResponse, "application/json", "The generated text.", batched=True)
StreamReply = response_spec(StreamEvent, "text/event-stream", "Documents one event of the SSE stream.")


def _parse(raw: Any) -> GenerateRequest | Problem:
    if not isinstance(raw, dict):
        return invalid_body()
    try:
        return GenerateRequest.model_validate(raw)
    except ValidationError as exc:
        return invalid_body(exc)


def _refusal(problem: Problem) -> JSONResponse:
    return error_response(TEXTGEN, problem)


def _prepare(frontend: Frontend, bodies: list[Any]) -> list[tuple[GenerateRequest, Prepared] | Problem]:
    """Parse and prepare the bodies that arrived together, in one pass through the door."""
    parsed = [_parse(b) for b in bodies]
    requests: list[Any] = []
    for p in parsed:
        if isinstance(p, Problem):
            requests.append(p)
            continue
        try:
            requests.append(p.to_prompt_request(frontend.tokenizer, frontend.sampling_defaults))
        except ParamError as exc:
            requests.append(Problem.of(exc))
    prepared = iter(frontend.prepare([r for r in requests if not isinstance(r, Problem)]))
    out: list[tuple[GenerateRequest, Prepared] | Problem] = []
    for p, r in zip(parsed, requests):
        if isinstance(r, Problem):
            out.append(r)
            continue
        item = next(prepared)
        out.append(Problem.of(item) if isinstance(item, ParamError) else (p, item))  # type: ignore[arg-type]
    return out


def admit(frontend: Frontend, bodies: list[Any]) -> list[Response]:
    """Admit a batch of /generate bodies into the engine; one response object per body."""
    responses: list[Response] = []
    for item in _prepare(frontend, bodies):
        if isinstance(item, Problem):
            responses.append(_refusal(item))
            continue
        try:
            responses.append(GenerationResponse(frontend, *item))
        except QueueFull as exc:
            log.info("refused a request: %s", exc)
            responses.append(_refusal(overloaded()))
    return responses


class GenerationResponse(DeferredJSONResponse):
    """/generate's answer: the generated text, post-processed, or what went wrong."""

    def __init__(self, frontend: Frontend, request: GenerateRequest, prepared: Prepared) -> None:
        super().__init__(frontend.submit(prepared), frontend.settings.request_timeout, TEXTGEN)
        self.request = request
        self.prepared = prepared
        self.model = frontend.model_id
        self.tokenizer = frontend.tokenizer
        self.post = request.postprocessing(frontend.settings.max_words)

    def answer(self, results: list[GenerationResult]) -> dict[str, Any]:
        (result,) = results
        answer = protocol.response(self.request, self.prepared, result, self.model, self.post, self.tokenizer)
        # No null members: BentoML's client decodes by the schema, where `logprobs` is an array.
        return answer.model_dump(mode="json", exclude_none=True)


def stream(frontend: Frontend, body: Any) -> Response:
    """Validate and start a streamed generation; an invalid body is a plain JSON 4xx, not a stream."""
    (item,) = _prepare(frontend, [body])
    if isinstance(item, Problem):
        return _refusal(item)
    _, prepared = item
    try:
        (handle,) = frontend.submit(prepared)
    except QueueFull as exc:
        log.info("refused a request: %s", exc)
        return _refusal(overloaded())
    model = frontend.model_id

    async def events() -> AsyncIterator[str]:
        # Leaving this generator early (client disconnect) cancels the request: see RequestHandle.stream.
        async for event in handle.stream():
            if event.result is None:
                yield sse(StreamEvent(text=event.text).model_dump(mode="json", exclude_none=True))
                continue
            problem = failure([event.result])
            if problem is not None:  # the stream has started: the error can only be an event now
                yield sse({"error": event.result.error or event.result.finish_reason})
            else:
                final = protocol.final_event(prepared, event.result, event.text, model)
                yield sse(final.model_dump(mode="json", exclude_none=True))

    return event_stream(events(), [handle], frontend.settings.request_timeout)
