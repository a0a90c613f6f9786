"""HTTP glue of the OpenAI-compatible routes: OpenAI's error shape, deferred JSON and SSE.

Like /generate, a route only admits: it validates, tokenizes and submits every choice of the request
to the engine at once (so n choices and list prompts share forward passes), then returns a response
that waits for the results while it is being sent, and cancels them if the client goes away.

Errors have OpenAI's shape, which its client libraries turn into typed exceptions:
    {"error": {"message": "...", "type": "invalid_request_error", "param": "<field>", "code": null}}
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from textgen import openai_api as api
from textgen.engine import QueueFull, RequestHandle
from textgen.generator import TextGenerator
from textgen.http import DeferredJSONResponse, overloaded, overloaded_body, sse, timeout_message
from textgen.params import ParamError
from textgen.sequence import GenerationResult

log = logging.getLogger(__name__)


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def parse(model: type[BaseModel], raw: Any) -> Any:
    """`raw` validated as `model`, or a 400 naming the first offending parameter."""
    if not isinstance(raw, dict):
        return error_response(400, "the body must be a JSON object", param=None)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_context=False, include_input=False, include_url=False)
        first = errors[0]
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            message = f"unknown parameter {param!r}: textgen does not support it; remove it from the request"
        else:
            # Every complaint about that parameter (a union such as `prompt` gives one per member).
            message = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in errors
                if e["loc"][:1] == first["loc"][:1]
            )
        return error_response(400, message, param=param)


def completions(generator: TextGenerator, raw: Any, ctx: Any) -> Response:
    """POST /v1/completions; `ctx` is the API's bentoml.Context."""
    return _with_status(ctx, _handle(generator, raw, ctx, api.CompletionRequest, api.plan_completion))


def chat_completions(generator: TextGenerator, raw: Any, ctx: Any) -> Response:
    """POST /v1/chat/completions; `ctx` is the API's bentoml.Context."""
    return _with_status(ctx, _handle(generator, raw, ctx, api.ChatCompletionRequest, api.plan_chat))


def _with_status(ctx: Any, response: Response) -> Response:
    # BentoML overwrites the status of an API that takes a Context with ctx's (200 unless set here).
    ctx.response.status_code = response.status_code
    return response


def _handle(generator: TextGenerator, raw: Any, ctx: Any, model: Any, plan_fn: Any) -> Response:
    req = parse(model, raw)
    if isinstance(req, Response):
        return req
    try:
        api.check_model(req.model, generator.model_id)
    except LookupError as exc:
        return error_response(404, str(exc), param="model", code="model_not_found")
    limits = api.Limits(
        model_id=generator.model_id,
        max_new_tokens=generator.settings.max_new_tokens,
        max_prompt_chars=generator.settings.max_prompt_chars,
        context_length=generator.loaded.context_length,
    )
    try:
        plan = plan_fn(req, generator.tokenizer, limits)
    except ParamError as exc:
        return error_response(400, exc.message, param=exc.field)
    # Every choice enters the engine now, before anything is awaited: they join the batch together.
    try:
        handles = generator.engine.submit_many([(plan.prompts[c.prompt], c.params) for c in plan.choices])
    except QueueFull as exc:
        log.info("refused a request: %s", exc)
        return overloaded(overloaded_body(openai_shape=True))
    if plan.stream:
        return StreamingResponse(
            _events(plan, handles), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return CompletionResponse(plan, handles, generator.settings.request_timeout)


def _failure(results: list[GenerationResult]) -> tuple[int, dict[str, Any]] | None:
    for r in results:
        if r.finish_reason == "error":
            return 500, error_body(f"generation failed: {r.error}; retry, or report it", "server_error")
    for r in results:
        if r.finish_reason == "cancelled":
            return 503, error_body("the server is shutting down; retry", "server_error")
    return None


def _usage(plan: api.Plan, results: list[GenerationResult]) -> dict[str, int]:
    # Each prompt counts once however many choices continue it, as OpenAI counts.
    return api.usage_body(sum(len(p) for p in plan.prompts), sum(r.completion_tokens for r in results))


class CompletionResponse(DeferredJSONResponse):
    """The JSON body is known once every choice is done; a client that leaves cancels them all."""

    def __init__(self, plan: api.Plan, handles: list[RequestHandle], timeout: float) -> None:
        super().__init__(handles, timeout)
        self.plan = plan

    def render_timeout(self) -> dict[str, Any]:
        return error_body(timeout_message(self.timeout), "server_error", code="timeout")

    def render_results(self, results: list[GenerationResult]) -> tuple[int, dict[str, Any]]:
        failure = _failure(results)
        if failure is not None:
            return failure
        plan = self.plan
        choices = []
        for choice, r in zip(plan.choices, results):
            text = plan.prompt_texts[choice.prompt] + r.text if plan.echo else r.text
            choices.append(api.choice_body(plan, choice.index, text, api.finish_reason(r.finish_reason)))
        return 200, api.envelope(plan, chunk=False, choices=choices, usage=_usage(plan, results))


async def _events(plan: api.Plan, handles: list[RequestHandle]) -> AsyncIterator[str]:
    """SSE chunks of all choices as they come; exactly one per choice carries its finish_reason.

    Leaving early (client disconnect: starlette cancels this generator) cancels every choice.
    """
    merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        async for event in handle.stream():
            await merged.put((i, event))

    pumps = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        for choice in plan.choices:
            echo = plan.prompt_texts[choice.prompt] if plan.echo else ""
            if plan.kind == "chat" or echo:
                opening = api.chunk_choice(plan, choice.index, echo, None, first=True)
                yield sse(api.envelope(plan, chunk=True, choices=[opening]))
        results: list[GenerationResult | None] = [None] * len(handles)
        while any(r is None for r in results):
            i, event = await merged.get()
            choice = plan.choices[i]
            reason = None
            if event.result is not None:
                results[i] = event.result
                if event.result.finish_reason in ("error", "cancelled"):
                    _, body = _failure([event.result])  # type: ignore[misc]
                    yield sse(body)  # the stream has started: the error can only be an event now
                    return
                reason = api.finish_reason(event.result.finish_reason)
            elif not event.text:
                continue
            chunk = api.chunk_choice(plan, choice.index, event.text, reason, first=False)
            yield sse(api.envelope(plan, chunk=True, choices=[chunk]))
        if plan.include_usage:
            done = [r for r in results if r is not None]
            yield sse(api.envelope(plan, chunk=True, choices=[], usage=_usage(plan, done)))
        yield "data: [DONE]\n\n"
    finally:
        for h in handles:
            h.cancel()
        for p in pumps:
            p.cancel()


# -- GET /v1/models ----------------------------------------------------------------------------------


async def list_models(request: Request) -> Response:
    import bentoml  # here, in the worker, whose service instance holds the generator

    generator: TextGenerator = bentoml.get_current_service().generator
    return JSONResponse(api.models_body(generator.model_id, STARTED))


STARTED = int(time.time())  # the model's `created`: when this server started
models_app = Starlette(routes=[Route("/models", list_models, methods=["GET"])])
