"""The OpenAI-compatible routes: parse, go through the one door, answer in OpenAI's shapes (JSON or SSE).

Every choice of a request (n, list prompts) is submitted at once, so they share forward passes; a client
that leaves cancels them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from textgen.api.bentoml_io import json_body, response_spec
from textgen.api.errors import OPENAI, ErrorShape, Problem, error_response, invalid_body, overloaded
from textgen.api.responses import DeferredJSONResponse, event_stream, failure, sse
from textgen.engine.handle import RequestHandle
from textgen.engine.params import ParamError
from textgen.engine.outputs import GenerationResult, QueueFull
from textgen.frontend import openai_protocol as protocol
from textgen.frontend.answer import AnswerParts, AnswerStream, split_answer
from textgen.frontend.openai_protocol import Call, TokenIds
from textgen.frontend.tools import ToolReply, ToolUse
from textgen.frontend.prepare import Frontend, Prepared
from textgen.frontend.usage import TokenCounts

log = logging.getLogger(__name__)

CompletionBody = json_body(protocol.CompletionRequest, "OpenAI's completions body.")
ChatBody = json_body(protocol.ChatCompletionRequest, "OpenAI's chat completions body.")
CompletionReply = response_spec(protocol.CompletionResponse, "application/json", "OpenAI's shape.")
ChatReply = response_spec(protocol.ChatCompletionResponse, "application/json", "OpenAI's shape.")


def completions(frontend: Frontend, raw: Any, ctx: Any) -> Response:
    """POST /v1/completions; `ctx` is the API's bentoml.Context."""
    return with_status(ctx, _handle(frontend, raw, protocol.CompletionRequest))


def chat_completions(frontend: Frontend, raw: Any, ctx: Any) -> Response:
    """POST /v1/chat/completions; `ctx` is the API's bentoml.Context."""
    return with_status(ctx, _handle(frontend, raw, protocol.ChatCompletionRequest))


def with_status(ctx: Any, response: Response) -> Response:
    # BentoML overwrites the status of an API that takes a Context with ctx's (200 unless set here).
    ctx.response.status_code = response.status_code
    return response


@dataclass
class Admitted:
    """An OpenAI request that passed the one door and joined the engine."""

    request: Any  # the route's parsed body
    prepared: Prepared
    handles: list[RequestHandle]


def admit(
    frontend: Frontend,
    raw: Any,
    model: type[BaseModel],
    names: dict[str, str] | None = None,
    shape: ErrorShape = OPENAI,
) -> Admitted | Response:
    """Parse an OpenAI body as `model`, check the model it asks for, prepare it through the one door and
    submit it; or the error answer, in `shape`. `names`: the route's own names for fields its errors may name
    under another dialect's (the Responses and Messages APIs are prepared as chat requests)."""
    req = parse(frontend, raw, model, shape)
    if isinstance(req, Response):
        return req
    try:
        (prepared,) = frontend.prepare(
            [req.to_prompt_request(frontend.tokenizer, frontend.sampling_defaults)]
        )
    except ParamError as exc:
        prepared = exc
    if isinstance(prepared, ParamError):
        return error_response(shape, Problem.of(prepared.renamed(names) if names else prepared))
    try:
        handles = frontend.submit(prepared)
    except QueueFull as exc:
        log.info("refused a request: %s", exc)
        return error_response(shape, overloaded())
    return Admitted(req, prepared, handles)


# A chat-shaped answer's JSON body from its parts: reasoning (or None), text, tool calls (or None), result.
AnswerBody = Callable[[str | None, str, ToolReply | None, GenerationResult], dict[str, Any]]


class SplitAnswer(DeferredJSONResponse):
    """The JSON body of one chat-shaped answer (Responses, Messages), built by `body` from its parts once it
    is done: a thinking model's thought, the text, the tool calls (`split_answer`)."""

    def __init__(
        self,
        handle: RequestHandle,
        timeout: float,
        shape: ErrorShape,
        thinking: bool | None,
        tools: ToolUse | None,
        body: AnswerBody,
    ) -> None:
        super().__init__([handle], timeout, shape)
        self.thinking, self.tools, self.body_of = thinking, tools, body

    def answer(self, results: list[GenerationResult]) -> dict[str, Any]:
        (result,) = results
        return self.body_of(*split_answer(result.text, self.thinking, self.tools), result)


def parse(frontend: Frontend, raw: Any, model: type[BaseModel], shape: ErrorShape = OPENAI) -> Any:
    """`raw` parsed as `model`, for the served model; or the error answer (a Response), in `shape`."""
    if not isinstance(raw, dict):
        return error_response(shape, Problem(400, "the body must be a JSON object", "value_error"))
    try:
        req = model.model_validate(raw)
    except ValidationError as exc:
        return error_response(shape, invalid_body(exc))
    unknown = _unknown_model(req.model, frontend.model_id, shape)
    return unknown if unknown is not None else req


def _unknown_model(requested: str | None, served: str, shape: ErrorShape) -> Response | None:
    """The 404 for a model this server does not serve, or None."""
    try:
        protocol.check_model(requested, served)
    except LookupError as exc:
        return error_response(shape, Problem(404, str(exc), "model_not_found", "model"))
    return None


def _handle(frontend: Frontend, raw: Any, model: type[BaseModel]) -> Response:
    admitted = admit(frontend, raw, model)
    if isinstance(admitted, Response):
        return admitted
    req, prepared, handles = admitted.request, admitted.prepared, admitted.handles
    call = Call.of(req, prepared, frontend.model_id)
    if call.stream:
        return event_stream(
            _events(call, prepared, handles, frontend.tokenizer), handles, frontend.settings.request_timeout
        )
    return CompletionResponse(call, prepared, handles, frontend)


def _usage(prepared: Prepared, results: list[GenerationResult]) -> dict[str, Any]:
    return protocol.usage_body(TokenCounts.of(prepared, results))


def _echo(call: Call, prepared: Prepared, choice: int) -> str:
    return call.echo_texts[prepared.choices[choice].prompt] if call.echo_texts else ""


def _so_far(call: Call, prepared: Prepared, choice: int, tokens: int) -> dict[str, Any]:
    """With continuous usage stats (vLLM's), a chunk's `usage`: its choice's counts so far; else nothing."""
    if not call.continuous_usage:
        return {}
    prompt_tokens = len(prepared.prompt_of(choice))
    return {"usage": protocol.usage_body(TokenCounts.so_far(prompt_tokens, tokens))}


class CompletionResponse(DeferredJSONResponse):
    """The JSON body is known once every choice is done."""

    def __init__(
        self, call: Call, prepared: Prepared, handles: list[RequestHandle], frontend: Frontend
    ) -> None:
        super().__init__(handles, frontend.settings.request_timeout, OPENAI)
        self.call = call
        self.prepared = prepared
        self.tokenizer = frontend.tokenizer

    def answer(self, results: list[GenerationResult]) -> dict[str, Any]:
        call, prepared = self.call, self.prepared
        choices = []
        for i, r in enumerate(results):
            echo = _echo(call, prepared, i)
            scores = protocol.logprobs_body(
                call, self.tokenizer, r.logprobs, r.prompt_logprobs if echo else None
            )
            reason = protocol.finish_reason(r.finish_reason)
            ids = TokenIds(r.token_ids, prepared.prompt_of(i))
            choices.append(protocol.choice_body(call, i, echo + r.text, reason, scores, ids))
        top = TokenIds.of_chat(call, prepared.prompt_of(0))
        return protocol.envelope(call, chunk=False, choices=choices, usage=_usage(prepared, results), **top)


async def _events(
    call: Call, prepared: Prepared, handles: list[RequestHandle], tokenizer: Any = None
) -> AsyncIterator[str]:
    """SSE chunks of all choices as they come; exactly one per choice carries its finish_reason.

    Leaving early (client disconnect: starlette cancels this generator) cancels every choice.
    """
    # Bounded: while the client reads slowly the pumps wait, and the handles' own bounded buffers take the
    # events (textgen/engine/handle.py), so a stalled stream holds bounded memory.
    merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=2 * len(handles))

    async def pump(i: int, handle: RequestHandle) -> None:
        async for event in handle.stream():
            await merged.put((i, event))

    pumps = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    # With return_token_ids, the ids each choice generated that no chunk has named yet, and whether its
    # prompt's still have to go with the next (a completion's choice names them once; a chat names them at
    # the top of its first chunk).
    unnamed: list[list[int]] = [[] for _ in handles]
    prompt_unnamed = [call.kind == "completion" for _ in handles]

    def token_ids(i: int, new: list[int]) -> TokenIds:
        unnamed[i] += new
        named = TokenIds(unnamed[i], prepared.prompt_of(i) if prompt_unnamed[i] else None)
        unnamed[i], prompt_unnamed[i] = [], False
        return named

    try:
        for i in range(len(handles)):
            echo = _echo(call, prepared, i)
            if call.kind == "chat" or echo:
                opening = protocol.chunk_choice(call, i, echo, None, first=True, ids=token_ids(i, []))
                top = TokenIds.of_chat(call, prepared.prompt_of(i)) if i == 0 else {}
                so_far = _so_far(call, prepared, i, 0)
                yield sse(protocol.envelope(call, chunk=True, choices=[opening], **so_far, **top))
        results: list[GenerationResult | None] = [None] * len(handles)
        # Each chat choice's text as reasoning, content and tool calls, as it comes.
        answers = [AnswerStream(call.thinking, call.tools) for _ in handles]
        while any(r is None for r in results):
            i, event = await merged.get()
            reason = None
            parts = answers[i].feed(event.text)
            if event.result is not None:
                results[i] = event.result
                problem = failure([event.result])
                if problem is not None:  # the stream has started: the error can only be an event now
                    yield sse(OPENAI.body(problem))
                    return
                parts = parts + answers[i].finish()
                reason = answers[i].finish_reason(protocol.finish_reason(event.result.finish_reason))
            elif not event.text or (parts == AnswerParts() and event.logprobs is None):
                unnamed[i] += event.token_ids  # named with the next chunk
                continue  # nothing yet, or text held back until it is known (its logprobs still go out)
            scores = protocol.logprobs_body(call, tokenizer, event.logprobs)
            ids = token_ids(i, event.token_ids)
            chunk = protocol.chunk_choice(
                call, i, parts.content, reason, False, scores, parts.calls, parts.reasoning, ids
            )
            yield sse(
                protocol.envelope(
                    call, chunk=True, choices=[chunk], **_so_far(call, prepared, i, event.tokens)
                )
            )
        if call.include_usage:
            done = [r for r in results if r is not None]
            yield sse(protocol.envelope(call, chunk=True, choices=[], usage=_usage(prepared, done)))
        yield sse("[DONE]")
    finally:
        for h in handles:
            h.cancel()
        for p in pumps:
            p.cancel()


# -- GET /v1/models ----------------------------------------------------------------------------------


def models_app(model_id: Callable[[], str], context_length: Callable[[], int | None]) -> Starlette:
    """GET /v1/models and GET /v1/models/{id} (the SDKs' models.retrieve), mounted at /v1; `model_id` names
    the served model, `context_length` is its context once it is loaded (None before)."""
    started = int(time.time())  # the model's `created`: when this server started

    def served() -> dict[str, Any]:
        return protocol.model_body(model_id(), started, context_length())

    async def list_models(request: Request) -> Response:
        return JSONResponse(protocol.models_body(served()))

    async def retrieve_model(request: Request) -> Response:
        model = served()
        unknown = _unknown_model(request.path_params["model"], model["id"], OPENAI)
        return unknown if unknown is not None else JSONResponse(model)

    return Starlette(
        routes=[
            Route("/models", list_models, methods=["GET"]),
            Route("/models/{model:path}", retrieve_model, methods=["GET"]),
        ]
    )
