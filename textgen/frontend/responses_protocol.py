"""OpenAI's Responses API (POST /v1/responses): its bodies, how they become a chat request, and its answers.

The Responses API is what OpenAI's SDK documents first (`client.responses.create`) and what its Agents SDK
speaks. A request is the same conversation as a chat completion in other clothes: `input` (a string, or
items: messages, the model's earlier `function_call`s and their `function_call_output`s), `instructions`
(a system message), flat function `tools`, `text.format` for structured output. So it becomes a
ChatCompletionRequest (`to_chat`), which goes through the one door like every other dialect, and errors name
the Responses fields. textgen keeps no responses: `previous_response_id` is refused; send the whole
conversation in `input`, as with `store: false`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from textgen.engine.detokenize import IncrementalDetokenizer
from textgen.engine.outputs import GenerationResult, TokenLogprob
from textgen.engine.params import RANGES, ParamError, SamplingParams
from textgen.frontend.answer import AnswerParts, AnswerStream
from textgen.frontend.openai_protocol import (
    ChatCompletionRequest,
    ChatDialect,
    OpenAIBookkeeping,
    chat_logprobs,
)
from textgen.frontend.prepare import FieldNames, SpeculativeField
from textgen.frontend.reasoning import Effort
from textgen.frontend.tools import ToolReply, ToolUse
from textgen.frontend.usage import TokenCounts

# What `include` names to have the message's tokens scored.
LOGPROBS = "message.output_text.logprobs"

# The chat fields a Responses request's errors are about, under the Responses names.
RESPONSES_NAMES = {
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "messages": "input",
    "response_format": "text.format",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextFormat(_Body):
    """`text.format`: {"type": "text"}, {"type": "json_object"} or
    {"type": "json_schema", "name": ..., "schema": {...}}."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextOptions(_Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="Accepted and ignored.")


class ReasoningOptions(_Body):
    effort: Effort | None = Field(
        None,
        description="\"none\" turns a thinking model's thought off, any other effort on (as chat's "
        "reasoning_effort); no effect on a model that does not think.",
    )
    summary: Literal["auto", "concise", "detailed"] | None = Field(
        None, description="Accepted: the thought comes whole, as reasoning_text."
    )


class ResponsesStreamOptions(_Body):
    include_obfuscation: bool | None = Field(
        None, description="OpenAI's: accepted; textgen pads no stream events with obfuscation."
    )


class FunctionTool(_Body):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Body):
    type: Literal["function"]
    name: str


class ResponsesRequest(SpeculativeField, OpenAIBookkeeping, ChatDialect):
    """POST /v1/responses. Unknown fields are rejected (400), never silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    model: str | None = Field(None, description="The served model's id (GET /v1/models); optional.")
    input: str | list[dict[str, Any]] = Field(
        examples=["What is the capital of France?"],
        description="A string (the user's message), or items: messages {role, content}, function_call and "
        "function_call_output.",
    )
    instructions: str | None = Field(None, description="A system message before the input.")
    max_output_tokens: int | None = Field(None, description="Default: the server's TEXTGEN_MAX_NEW_TOKENS.")
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = Field(
        None, description="Function tools (textgen has no built-in tools)."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    reasoning: ReasoningOptions | None = None
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    background: Literal[False] | None = Field(
        None, description="false only: textgen keeps no responses, so none runs in the background."
    )
    store: bool | None = Field(None, description="Accepted: textgen keeps no responses in any case.")
    previous_response_id: str | None = Field(
        None, description="Not supported: textgen keeps no responses; send the conversation in `input`."
    )
    include: list[str] | None = Field(
        None,
        description='Extra output to include: "message.output_text.logprobs" (each token of the message\'s '
        'text with its log-probability); "reasoning.encrypted_content" is accepted and adds nothing (a '
        "thought comes as plain reasoning_text); others are a 400.",
    )
    top_logprobs: int | None = Field(
        None,
        description='With include "message.output_text.logprobs": also the likeliest alternatives at each '
        "position, 0 to 20.",
    )
    metadata: dict[str, str] | None = Field(None, description="Returned as given.")
    user: str | None = Field(None, description="Accepted and ignored.")
    truncation: Literal["disabled"] | None = Field(
        None, description='"disabled" only: a conversation too long for the context is a 400.'
    )
    # textgen's and vLLM's extras, as on /v1/chat/completions
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    FIELDS = FieldNames(prompt="input", max_tokens="max_output_tokens", truncate=None)

    def _as_chat(self) -> ChatCompletionRequest:
        if self.previous_response_id is not None:
            raise ParamError(
                "previous_response_id",
                "textgen keeps no responses, so previous_response_id cannot be followed: send the whole "
                "conversation in `input` (earlier messages, function_call and function_call_output items)",
            )
        unknown = sorted(set(self.include or ()) - {"reasoning.encrypted_content", LOGPROBS})
        if unknown:
            raise ParamError("include", f"textgen cannot include {', '.join(unknown)}; leave them out")
        body: dict[str, Any] = {"messages": self._messages()}
        if self.top_logprobs is not None:
            RANGES["logprobs"].check("top_logprobs", self.top_logprobs)
        if self.wants_logprobs:  # as vLLM reads them: top_logprobs alone asks for nothing
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs or 0}
        given = self.model_fields_set
        extras = ("seed", "top_k", "min_p", "repetition_penalty", "speculative")
        for name in ("model", "temperature", "top_p", *extras):
            if name in given and getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        if self.reasoning is not None and self.reasoning.effort is not None:
            body["reasoning_effort"] = self.reasoning.effort
        if self.tools:
            body["tools"] = [
                {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                for t in self.tools
            ]
            body["parallel_tool_calls"] = self.parallel_tool_calls
        if isinstance(self.tool_choice, NamedFunction):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type != "text":
            schema = {"name": fmt.name or "response", "schema": fmt.schema_ or {}}
            body["response_format"] = {"type": fmt.type} | (
                {"json_schema": schema} if fmt.type == "json_schema" else {}
            )
        return ChatCompletionRequest.model_validate(body)

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS in (self.include or ())

    def _messages(self) -> list[dict[str, Any]]:
        """`instructions` and `input` as chat messages: a function_call joins the assistant turn before it."""
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for i, item in enumerate(items):
            kind = item.get("type", "message")
            where = f"input.{i}"
            if kind == "message":
                role = item.get("role")
                if role not in ("system", "developer", "user", "assistant"):
                    raise ParamError(
                        "input", f"{where}.role must be system, developer, user or assistant; got {role!r}"
                    )
                messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
            elif kind == "function_call":
                call = {
                    "id": _string(item, "call_id", where),
                    "type": "function",
                    "function": {
                        "name": _string(item, "name", where),
                        "arguments": _string(item, "arguments", where),
                    },
                }
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "reasoning":
                continue  # an earlier answer's thought, sent back: chat templates leave thoughts out
            elif kind == "function_call_output":
                output = _string(item, "output", where)
                messages.append(
                    {"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": output}
                )
            else:
                raise ParamError(
                    "input",
                    f"{where} is an item of type {kind!r}; textgen takes message, function_call, "
                    "function_call_output and reasoning items",
                )
        return messages


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ParamError("input", f"{where}.{key} must be a string; got {value!r}")
    return value


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or parts of type input_text / output_text, joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ParamError("input", f"{where} must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise ParamError(
                "input",
                f"{where}.{j} is a part of type {kind!r}; this server's model reads text only: "
                'send {"type": "input_text", "text": "..."}',
            )
        texts.append(part["text"])
    return "\n".join(texts)


# -- the answer ---------------------------------------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class ResponseShape:
    """What a Responses answer repeats of its request, and its id; `output` items are built per answer."""

    request: ResponsesRequest
    model: str
    id: str = field(default_factory=lambda: _id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def body(
        self,
        status: Literal["in_progress", "completed", "incomplete"],
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        req = self.request
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        choice = (
            req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunction) else req.tool_choice
        )
        fmt = (
            req.text.format.model_dump(by_alias=True, exclude_none=True)
            if req.text and req.text.format
            else None
        )
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_logprobs": req.top_logprobs,
            "tool_choice": choice or ("auto" if tools else "none"),
            "tools": tools,
            "text": {"format": fmt or {"type": "text"}},
            "truncation": "disabled",
            "store": False,
            "metadata": req.metadata or {},
            "usage": usage,
        }


class ResponseObject(BaseModel):
    """The 200 body of /v1/responses; with `stream`, each event's `response` (created, in_progress,
    completed or incomplete) has this shape, and the events between them carry the output as it grows."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    incomplete_details: dict[str, str] | None = Field(
        None,
        json_schema_extra={"nullable": True},
        description='{"reason": "max_output_tokens"} if cut short.',
    )
    model: str
    output: list[dict[str, Any]] = Field(
        description="A message {type: message, content: [{type: output_text, text}]} and/or function_call "
        "items {type: function_call, call_id, name, arguments}."
    )
    usage: dict[str, Any] | None = Field(None, json_schema_extra={"nullable": True})


def status_of(finish_reason: str) -> Literal["completed", "incomplete"]:
    return "incomplete" if finish_reason == "length" else "completed"


def usage_body(counts: TokenCounts) -> dict[str, Any]:
    return {
        "input_tokens": counts.prompt,
        "input_tokens_details": {"cached_tokens": counts.cached},
        "output_tokens": counts.completion,
        "output_tokens_details": {"reasoning_tokens": counts.reasoning},
        "total_tokens": counts.total,
    }


def message_item(
    text: str,
    item_id: str | None = None,
    status: str = "completed",
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    content = [] if status == "in_progress" else [output_text(text, logprobs)]
    return {
        "type": "message",
        "id": item_id or _id("msg"),
        "status": status,
        "role": "assistant",
        "content": content,
    }


def output_text(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A message's text; `logprobs` its tokens' (include "message.output_text.logprobs"), else []."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def call_item(call: dict[str, Any], item_id: str | None = None, status: str = "completed") -> dict[str, Any]:
    """A chat tool call ({"id", "function": {"name", "arguments"}}) as a function_call output item."""
    return {
        "type": "function_call",
        "id": item_id or _id("fc"),
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"] if status == "completed" else "",
        "status": status,
    }


def reasoning_item(text: str, item_id: str | None = None, status: str = "completed") -> dict[str, Any]:
    """A thinking model's thought (frontend/reasoning.py) as a reasoning output item."""
    content = [] if status == "in_progress" else [{"type": "reasoning_text", "text": text}]
    return {
        "type": "reasoning",
        "id": item_id or _id("rs"),
        "summary": [],
        "content": content,
        "status": status,
    }


def output_items(
    text: str,
    reply: ToolReply | None,
    reasoning: str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """A whole answer's output: its thought (if any), its text as a message (if any), then its calls;
    `logprobs`: the message's tokens' (`message_logprobs`)."""
    items = [reasoning_item(reasoning)] if reasoning is not None else []
    if reply is None:
        return items + [message_item(text, logprobs=logprobs)]
    items += [message_item(reply.content, logprobs=logprobs)] if reply.content else []
    return items + [call_item(c) for c in reply.calls]


class MessageLogprobs:
    """The log-probabilities of the tokens whose text became the answer's message (its output_text), in
    the Responses API's shape; a thought's tokens (its tags' too) and a tool call's are not the message's.
    A step's scores go with the message text its text released: text held back (a call that may be
    starting) keeps its scores waiting, and they are dropped if it turns out to be a call."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.waiting: list[TokenLogprob] = []

    def take(
        self, parts: AnswerParts, scores: list[TokenLogprob] | None, answer: AnswerStream
    ) -> list[dict[str, Any]]:
        """The entries to send with `parts`' message text (none without any): `scores` are the step's
        that `answer` (its AnswerStream) split into `parts`."""
        if answer.in_thought:
            self.waiting = []
            return []
        self.waiting += scores or []
        if not parts.content:
            if parts.calls:
                self.waiting = []
            return []
        taken, self.waiting = self.waiting, []
        return chat_logprobs(self.tokenizer, taken)["content"]


def message_logprobs(
    tokenizer: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    result: GenerationResult,
    thinking: bool | None,
    tools: ToolUse | None,
) -> list[dict[str, Any]]:
    """A whole answer's message logprobs: its tokens replayed one at a time, split as its stream is."""
    text = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
    answer, message = AnswerStream(thinking, tools), MessageLogprobs(tokenizer)
    entries = []
    for score in result.logprobs or []:
        entries += message.take(answer.feed(text.push(score.token)), [score], answer)
    last = answer.feed(text.flush())
    return entries + message.take(last + answer.finish(), None, answer)
