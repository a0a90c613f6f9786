"""POST /v1/responses, OpenAI's Responses API: parse, go through the one door, answer as a Response object
(JSON) or as its typed stream of events (SSE: response.created ... response.completed)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response

from textgen.api.bentoml_io import json_body, response_spec
from textgen.api.errors import OPENAI
from textgen.api.openai import SplitAnswer, admit, with_status
from textgen.api.responses import event_stream, failure, sse
from textgen.engine.handle import RequestHandle
from textgen.engine.outputs import GenerationResult
from textgen.frontend import responses_protocol as protocol
from textgen.frontend.prepare import Frontend, Prepared
from textgen.frontend.answer import AnswerStream, prompt_thinks
from textgen.frontend.tools import ToolReply
from textgen.frontend.usage import TokenCounts

ResponsesBody = json_body(protocol.ResponsesRequest, "OpenAI's Responses API body.")
ResponsesReply = response_spec(protocol.ResponseObject, "application/json", "OpenAI's Response object.")


def as_chat_fields(body: Any) -> Any:
    """The fields of a body by which Frontend.index_vocabulary_for knows whether it may ask for a grammar."""
    if not isinstance(body, dict):
        return body
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    asked = {"response_format": fmt} if isinstance(fmt, dict) and fmt.get("type") != "text" else {}
    return asked | ({"tool_choice": body["tool_choice"]} if "tool_choice" in body else {})


def responses(frontend: Frontend, raw: Any, ctx: Any) -> Response:
    """POST /v1/responses; `ctx` is the API's bentoml.Context."""
    return with_status(ctx, _handle(frontend, raw))


def _handle(frontend: Frontend, raw: Any) -> Response:
    admitted = admit(frontend, raw, protocol.ResponsesRequest, protocol.RESPONSES_NAMES)
    if isinstance(admitted, Response):
        return admitted
    req, prepared, (handle,) = admitted.request, admitted.prepared, admitted.handles
    tools = req.to_chat().tool_use()  # checked as the request was prepared
    thinking = prompt_thinks(prepared)
    shape = protocol.ResponseShape(req, frontend.model_id)
    timeout = frontend.settings.request_timeout
    tokenizer = frontend.tokenizer
    if req.stream:
        answer = AnswerStream(thinking, tools)
        return event_stream(_events(shape, prepared, handle, answer, tokenizer), [handle], timeout)

    def body(
        reasoning: str | None, text: str, reply: ToolReply | None, result: GenerationResult
    ) -> dict[str, Any]:
        scores = None
        if req.wants_logprobs:
            params, prompt_ids = prepared.choices[0].params, prepared.prompt_of(0)
            scores = protocol.message_logprobs(tokenizer, prompt_ids, params, result, thinking, tools)
        output = protocol.output_items(text, reply, reasoning, scores)
        usage = protocol.usage_body(TokenCounts.of(prepared, [result]))
        return shape.body(protocol.status_of(result.finish_reason), output, usage)

    return SplitAnswer(handle, timeout, OPENAI, thinking, tools, body)


class _Items:
    """The output items of a streamed answer as they open, grow and close, and the events that say so."""

    def __init__(self, tokenizer: Any) -> None:
        self.items: list[dict[str, Any]] = []
        self.text = ""  # the open message's (or reasoning item's) text
        self.scores = protocol.MessageLogprobs(tokenizer)
        self.logprobs: list[dict[str, Any]] = []  # the open message's tokens' scores, when asked
        self.arguments = ""  # the open call's arguments
        self.open: str | None = None  # "reasoning", "message" or "call"
        self.sequence = itertools.count()

    def event(self, kind: str, **fields: Any) -> str:
        return sse({"type": kind, "sequence_number": next(self.sequence), **fields})

    def content(self, text: str, logprobs: list[dict[str, Any]]) -> list[str]:
        """Message text, and its tokens' scores (MessageLogprobs; [] unless asked)."""
        if self.open != "message":
            events = self.close()
            item = protocol.message_item("", status="in_progress")
            self.items.append(item)
            self.open, self.text, self.logprobs = "message", "", []
            part = protocol.output_text("")
            events += [
                self.event("response.output_item.added", output_index=self._index, item=item),
                self.event("response.content_part.added", **self._where, content_index=0, part=part),
            ]
        else:
            events = []
        self.text += text
        self.logprobs += logprobs
        delta = self.event(
            "response.output_text.delta", **self._where, content_index=0, delta=text, logprobs=logprobs
        )
        return events + [delta]

    def reasoning(self, text: str) -> list[str]:
        events = []
        if self.open != "reasoning":
            events = self.close()
            item = protocol.reasoning_item("", status="in_progress")
            self.items.append(item)
            self.open, self.text = "reasoning", ""
            events.append(self.event("response.output_item.added", output_index=self._index, item=item))
        self.text += text
        delta = self.event("response.reasoning_text.delta", **self._where, content_index=0, delta=text)
        return events + [delta]

    def call(self, delta: dict[str, Any]) -> list[str]:
        """A tool-call delta (frontend/tools.py ToolStream): a new call when it has an id, else more
        arguments."""
        events = []
        if "id" in delta:
            events = self.close()
            item = protocol.call_item(delta, status="in_progress")
            self.items.append(item)
            self.open, self.arguments = "call", ""
            events.append(self.event("response.output_item.added", output_index=self._index, item=item))
        piece = delta["function"].get("arguments", "")
        if piece:
            self.arguments += piece
            events.append(self.event("response.function_call_arguments.delta", **self._where, delta=piece))
        return events

    def close(self) -> list[str]:
        """The open item's closing events; its completed form replaces it."""
        where, item = self._where if self.open else {}, self.items[-1] if self.items else None
        if self.open == "message" and item is not None:
            text, logprobs = self.text, self.logprobs
            part = protocol.output_text(text, logprobs)
            done = protocol.message_item(text, item["id"], logprobs=logprobs)
            events = [
                self.event(
                    "response.output_text.done", **where, content_index=0, text=text, logprobs=logprobs
                ),
                self.event("response.content_part.done", **where, content_index=0, part=part),
            ]
        elif self.open == "reasoning" and item is not None:
            done = protocol.reasoning_item(self.text, item["id"])
            events = [self.event("response.reasoning_text.done", **where, content_index=0, text=self.text)]
        elif self.open == "call" and item is not None:
            done = {**item, "arguments": self.arguments, "status": "completed"}
            events = [self.event("response.function_call_arguments.done", **where, arguments=self.arguments)]
        else:
            return []
        self.items[-1] = done
        self.open = None
        return events + [
            self.event("response.output_item.done", output_index=where["output_index"], item=done)
        ]

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    @property
    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": self._index}


async def _events(
    shape: protocol.ResponseShape,
    prepared: Prepared,
    handle: RequestHandle,
    answer: AnswerStream,
    tokenizer: Any = None,
) -> AsyncIterator[str]:
    """The Responses API's events for one answer; leaving early (client disconnect) cancels it."""
    out = _Items(tokenizer)
    start = shape.body("in_progress", [])
    yield out.event("response.created", response=start)
    yield out.event("response.in_progress", response=start)
    try:
        async for event in handle.stream():
            parts = answer.feed(event.text)
            if event.result is not None:
                problem = failure([event.result])
                if problem is not None:  # the stream has started: the error can only be an event now
                    yield out.event("error", code=problem.reason, message=problem.message, param=None)
                    return
                parts = parts + answer.finish()
            for piece in out.reasoning(parts.reasoning) if parts.reasoning else []:
                yield piece
            logprobs = out.scores.take(parts, event.logprobs, answer)
            for piece in out.content(parts.content, logprobs) if parts.content else []:
                yield piece
            for piece in (e for c in parts.calls for e in out.call(c)):
                yield piece
            if event.result is not None:
                for piece in out.close():
                    yield piece
                result = event.result
                usage = protocol.usage_body(TokenCounts.of(prepared, [result]))
                status = protocol.status_of(result.finish_reason)
                yield out.event(f"response.{status}", response=shape.body(status, out.items, usage))
                return
    finally:
        handle.cancel()
