"""POST /v1/messages, Anthropic's Messages API: parse, go through the one door, answer as a Message (JSON) or
as its named events (SSE: message_start, content_block_start/delta/stop, message_delta, message_stop); and
POST /v1/messages/count_tokens. Errors in Anthropic's shape (textgen/api/errors.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response

from textgen.api.bentoml_io import json_body, response_spec
from textgen.api.errors import ANTHROPIC, Problem, error_response
from textgen.api.openai import SplitAnswer, admit, parse, with_status
from textgen.api.responses import event_stream, failure, sse
from textgen.engine.handle import RequestHandle
from textgen.engine.outputs import GenerationResult
from textgen.engine.params import ParamError
from textgen.frontend import messages_protocol as protocol
from textgen.frontend.answer import AnswerParts, AnswerStream, prompt_thinks
from textgen.frontend.prepare import Frontend, Prepared
from textgen.frontend.tools import ToolReply
from textgen.frontend.usage import TokenCounts

MessagesBody = json_body(protocol.MessagesRequest, "Anthropic's Messages API body.")
MessagesReply = response_spec(protocol.MessageObject, "application/json", "Anthropic's Message object.")
CountBody = json_body(protocol.CountTokensRequest, "Anthropic's count_tokens body.")
CountReply = response_spec(protocol.TokenCount, "application/json", "The prompt's length in tokens.")


def as_chat_fields(body: Any) -> Any:
    """The fields of a body by which Frontend.index_vocabulary_for knows whether it may ask for a grammar."""
    if not isinstance(body, dict):
        return body
    config, choice = body.get("output_config"), body.get("tool_choice")
    fmt = config.get("format") if isinstance(config, dict) else None
    asked = {"response_format": fmt} if isinstance(fmt, dict) else {}
    forced = isinstance(choice, dict) and choice.get("type") in ("any", "tool")
    return asked | ({"tool_choice": "required"} if forced else {})


def messages(frontend: Frontend, raw: Any, ctx: Any) -> Response:
    """POST /v1/messages; `ctx` is the API's bentoml.Context."""
    return with_status(ctx, _handle(frontend, raw))


def count_tokens(frontend: Frontend, raw: Any, ctx: Any) -> Response:
    """POST /v1/messages/count_tokens: the prompt's tokens as /v1/messages would submit it."""
    return with_status(ctx, _count(frontend, raw))


def _count(frontend: Frontend, raw: Any) -> Response:
    req = parse(frontend, raw, protocol.CountTokensRequest, ANTHROPIC)
    if isinstance(req, Response):
        return req
    try:
        (tokens,) = frontend.count_tokens(req.to_prompt_request(frontend.tokenizer))
    except ParamError as exc:
        return error_response(ANTHROPIC, Problem.of(exc.renamed(protocol.MESSAGES_NAMES)))
    return JSONResponse({"input_tokens": tokens})


def _handle(frontend: Frontend, raw: Any) -> Response:
    admitted = admit(frontend, raw, protocol.MessagesRequest, protocol.MESSAGES_NAMES, ANTHROPIC)
    if isinstance(admitted, Response):
        return admitted
    req, prepared, (handle,) = admitted.request, admitted.prepared, admitted.handles
    tools = req.to_chat().tool_use()  # checked as the request was prepared
    answer = _Answer(req, frontend.model_id, prepared)
    thinking = prompt_thinks(prepared)
    timeout = frontend.settings.request_timeout
    if req.stream:
        return event_stream(_events(answer, handle, AnswerStream(thinking, tools)), [handle], timeout)

    def body(
        reasoning: str | None, text: str, reply: ToolReply | None, result: GenerationResult
    ) -> dict[str, Any]:
        content = protocol.content_blocks(reasoning, text, reply)
        return answer.body(content, result, bool(reply and reply.calls))

    return SplitAnswer(handle, timeout, ANTHROPIC, thinking, tools, body)


class _Answer:
    """What every form of one answer shares: its id, model, prompt and the stop sequences asked."""

    def __init__(self, req: protocol.MessagesRequest, model: str, prepared: Prepared) -> None:
        self.id, self.model, self.prepared = protocol.message_id(), model, prepared
        self.stop_sequences = req.stop_sequences

    def usage(self, result: GenerationResult | None) -> dict[str, Any]:
        """Before the answer (a stream's message_start) the whole prompt counts as input: what the prefix
        cache serves is known once the answer is."""
        if result is None:
            return protocol.usage_body(TokenCounts(len(self.prepared.prompt_ids[0]), 0))
        return protocol.usage_body(TokenCounts.of(self.prepared, [result]))

    def body(
        self, content: list[dict[str, Any]], result: GenerationResult | None, called: bool
    ) -> dict[str, Any]:
        stop = protocol.stop_of(result, self.stop_sequences, called) if result else (None, None)
        return protocol.message_body(self.id, self.model, content, stop, self.usage(result))


def _event(kind: str, **fields: Any) -> str:
    return sse({"type": kind, **fields}, event=kind)


class _Blocks:
    """The content blocks of a streamed answer as they open, grow and close, and the events that say so."""

    def __init__(self) -> None:
        self.count = 0  # blocks opened
        self.open: str | None = None  # the open block's kind: "thinking", "text" or "tool_use"

    def add(self, parts: AnswerParts) -> list[str]:
        events = self._grow("thinking", parts.reasoning) + self._grow("text", parts.content)
        for delta in parts.calls:
            if "id" in delta:  # a new call (frontend/tools.py ToolStream)
                events += self._start(protocol.tool_use_block(delta, whole=False), "tool_use")
            piece = delta["function"].get("arguments", "")
            if piece:
                events.append(self._delta({"type": "input_json_delta", "partial_json": piece}))
        return events

    def finish(self) -> list[str]:
        """The last block's closing event; an answer with no block gets an empty text block, as in JSON."""
        events = [] if self.count else self._start(_empty("text"), "text")
        return events + self.close()

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [_event("content_block_stop", index=self.count - 1)]

    def _grow(self, kind: str, text: str) -> list[str]:
        if not text:
            return []
        events = [] if self.open == kind else self._start(_empty(kind), kind)
        return events + [self._delta({"type": f"{kind}_delta", kind: text})]

    def _start(self, block: dict[str, Any], kind: str) -> list[str]:
        events = self.close()
        self.count += 1
        self.open = kind
        return events + [_event("content_block_start", index=self.count - 1, content_block=block)]

    def _delta(self, delta: dict[str, Any]) -> str:
        return _event("content_block_delta", index=self.count - 1, delta=delta)


def _empty(kind: str) -> dict[str, Any]:
    return protocol.thinking_block("") if kind == "thinking" else protocol.text_block("")


async def _events(answer: _Answer, handle: RequestHandle, parts: AnswerStream) -> AsyncIterator[str]:
    """The Messages API's events for one answer; leaving early (client disconnect) cancels it."""
    blocks = _Blocks()
    yield _event("message_start", message=answer.body([], None, False))
    yield _event("ping")
    try:
        async for event in handle.stream():
            piece = parts.feed(event.text)
            result = event.result
            if result is not None:
                problem = failure([result])
                if problem is not None:  # the stream has started: the error can only be an event now
                    yield sse(ANTHROPIC.body(problem), event="error")
                    return
                piece = piece + parts.finish()
            for out in blocks.add(piece):
                yield out
            if result is not None:
                for out in blocks.finish():
                    yield out
                called = bool(parts.reply and parts.reply.calls)  # as the JSON answer's (SplitAnswer)
                stop, sequence = protocol.stop_of(result, answer.stop_sequences, called)
                delta = {"stop_reason": stop, "stop_sequence": sequence}
                # The whole usage, as Anthropic's API now sends it: its SDK updates each count it finds.
                yield _event("message_delta", delta=delta, usage=answer.usage(result))
                yield _event("message_stop")
                return
    finally:
        handle.cancel()
