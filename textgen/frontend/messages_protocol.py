"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens): its bodies, how they become a chat
request, and its answers.

Anthropic's SDKs, and the tools built on them, speak this API as OpenAI's speak chat completions (llama.cpp's
server, vLLM and Ollama serve it too). A request is the same conversation in other clothes: `system` is a
system message, content comes in blocks (text, the model's earlier `tool_use`, the client's `tool_result`),
tools give an `input_schema`, `tool_choice` says "any" for OpenAI's "required", and a conversation that ends
with the assistant's words is a prefill the answer continues (vLLM's continue_final_message). So it becomes
a ChatCompletionRequest (`to_chat`), which goes through the one door like every other dialect, and errors
name the Messages fields. Answers are content blocks: a thinking model's thought (`thinking`), the text, the
calls (`tool_use`, with `input` as an object).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from textgen.engine.outputs import GenerationResult
from textgen.engine.params import ParamError
from textgen.frontend.openai_protocol import ChatCompletionRequest, ChatDialect
from textgen.frontend.prepare import FieldNames, SpeculativeField
from textgen.frontend.reasoning import Effort
from textgen.frontend.tools import ToolReply
from textgen.frontend.usage import TokenCounts

# The chat fields a Messages request's errors are about, under the Messages names.
MESSAGES_NAMES = {
    "max_completion_tokens": "max_tokens",
    "stop": "stop_sequences",
    "response_format": "output_config.format",
    "function.name": "name",  # tools.0.function.name is tools.0.name
    "function.parameters": "input_schema",
    "thinking_token_budget": "thinking.budget_tokens",
}
# Block types a request may hold that the model never sees: an earlier answer's thought (chat templates
# leave thoughts out, and Anthropic's clients send them back with tool results).
THOUGHTS = ("thinking", "redacted_thinking")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InputMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]] = Field(
        description='A string, or blocks: {"type": "text", "text"}, the assistant\'s {"type": "tool_use", '
        '"id", "name", "input"}, the user\'s {"type": "tool_result", "tool_use_id", "content"}.'
    )


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(_Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None
    display: str | None = None


class OutputFormat(_Body):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    format: OutputFormat | None = None
    effort: Literal["low", "medium", "high", "max"] | None = Field(
        None, description="With thinking enabled, the effort a template that reads one is given (gpt-oss's)."
    )


class Conversation(ChatDialect):
    """What POST /v1/messages and /v1/messages/count_tokens share: the conversation and what shapes it.
    Unknown fields are rejected (400), never silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    model: str | None = Field(None, description="The served model's id (GET /v1/models).")
    messages: list[InputMessage] = Field(
        examples=[[{"role": "user", "content": "What is the capital of France?"}]]
    )
    system: str | list[dict[str, Any]] | None = Field(None, description="A string, or text blocks.")
    tools: list[dict[str, Any]] | None = Field(
        None, description="Client tools {name, description, input_schema} (textgen runs no tools itself)."
    )
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = Field(
        None,
        description='{"type": "disabled"} turns a thinking model\'s thought off, "enabled" or "adaptive" on '
        "(its chat template's enable_thinking, as chat's reasoning_effort); the thought comes as a thinking "
        "block. With enabled, budget_tokens bounds the thought: one still open after that many tokens is "
        "closed and the answer follows (0 and up; Anthropic asks for 1024 and up). No effect on a model that "
        "does not think; chat_template_kwargs wins over it.",
    )
    output_config: OutputConfig | None = Field(
        None, description='{"format": {"type": "json_schema", "schema": {...}}}: structured output.'
    )
    cache_control: dict[str, Any] | None = Field(
        None, description="Accepted: textgen caches prompt prefixes by itself (TEXTGEN_PREFIX_CACHE)."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM's: variables for the model's chat template."
    )

    FIELDS = FieldNames("messages", "max_tokens", truncate=None)

    def _sampling(self) -> dict[str, Any]:
        """The chat request's sampling fields (a token count has none)."""
        return {}

    def _as_chat(self) -> ChatCompletionRequest:
        messages = self._chat_messages()
        body: dict[str, Any] = {"messages": messages, **self._sampling()}
        if self.model is not None:
            body["model"] = self.model
        if self.chat_template_kwargs is not None:
            body["chat_template_kwargs"] = self.chat_template_kwargs
        if self.thinking is not None:
            body["reasoning_effort"] = self._effort(self.thinking)
            if self.thinking.type == "enabled" and self.thinking.budget_tokens is not None:
                body["thinking_token_budget"] = self.thinking.budget_tokens
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
            body["continue_final_message"] = True  # a prefill: the answer goes on from it
        if self.tools:
            body["tools"] = [_as_function(tool, i) for i, tool in enumerate(self.tools)]
        choice = self.tool_choice
        if choice is not None:
            body["tool_choice"] = _as_tool_choice(choice)
            if choice.disable_parallel_tool_use is not None:
                body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
        fmt = self.output_config.format if self.output_config else None
        if fmt is not None:
            schema = {"name": "output", "schema": fmt.schema_}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        return ChatCompletionRequest.model_validate(body)

    def _effort(self, thinking: ThinkingConfig) -> Effort:
        """Chat's reasoning_effort for Anthropic's thinking: "none" when disabled, else output_config's effort
        (Anthropic's "max" is OpenAI's "xhigh"), "high" by default, as Anthropic's."""
        if thinking.type == "disabled":
            return "none"
        effort = self.output_config.effort if self.output_config is not None else None
        return "xhigh" if effort == "max" else effort or "high"

    def _chat_messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            messages.append({"role": "system", "content": _texts(self.system, "system")})
        for i, message in enumerate(self.messages):
            where = f"messages.{i}.content"
            if isinstance(message.content, str):
                messages.append({"role": message.role, "content": message.content})
            elif message.role == "assistant":
                messages.append(_assistant(message.content, where))
            else:
                messages.extend(_user(message.content, where))
        return messages


class MessagesRequest(Conversation, SpeculativeField):
    """POST /v1/messages."""

    max_tokens: int = Field(
        description="The most tokens to generate; at most the server's TEXTGEN_MAX_NEW_TOKENS."
    )
    stop_sequences: list[str] | None = Field(None, description="Up to 16 strings that end the answer.")
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    # What Anthropic's SDK may send that means nothing here: accepted and ignored.
    metadata: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    service_tier: str | None = Field(None, description="Accepted and ignored.")
    speed: str | None = Field(None, description="Accepted and ignored.")
    inference_geo: str | None = Field(None, description="Accepted and ignored.")
    diagnostics: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    user_profile_id: str | None = Field(None, description="Accepted and ignored.")
    workspace_id: str | None = Field(None, description="Accepted and ignored.")
    # textgen's and vLLM's extras, as on /v1/chat/completions
    seed: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def _sampling(self) -> dict[str, Any]:
        given = self.model_fields_set
        sampling: dict[str, Any] = {"max_completion_tokens": self.max_tokens}
        for name in ("temperature", "top_p", "top_k", "seed", "min_p", "repetition_penalty", "speculative"):
            if name in given and getattr(self, name) is not None:
                sampling[name] = getattr(self, name)
        if self.stop_sequences:
            sampling["stop"] = self.stop_sequences
        return sampling


class CountTokensRequest(Conversation):
    """POST /v1/messages/count_tokens: the conversation whose prompt is counted."""


def _as_function(tool: dict[str, Any], index: int) -> dict[str, Any]:
    """A client tool {name, description, input_schema} as an OpenAI function tool."""
    where = f"tools.{index}"
    if tool.get("type") not in (None, "custom"):
        raise ParamError(
            "tools",
            f"{where} is a server tool of type {tool['type']!r}; textgen runs no tools itself: give client "
            "tools {name, description, input_schema} and run them in your code",
        )
    name, schema = tool.get("name"), tool.get("input_schema")
    if not isinstance(name, str) or not isinstance(schema, dict):
        raise ParamError("tools", f"{where} must have a string name and an input_schema object")
    taken = {"type", "name", "description", "input_schema", "cache_control", "strict", "input_examples"}
    unknown = sorted(set(tool) - taken)
    if unknown:
        raise ParamError("tools", f"{where} has fields textgen does not know: {', '.join(unknown)}")
    function = {"name": name, "parameters": schema}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _as_tool_choice(choice: ToolChoice) -> Any:
    if choice.type == "tool":
        if not choice.name:
            raise ParamError("tool_choice", 'tool_choice {"type": "tool"} needs the name of the tool to call')
        return {"type": "function", "function": {"name": choice.name}}
    if choice.name is not None:
        raise ParamError("tool_choice", f'tool_choice "{choice.type}" takes no name; use {{"type": "tool"}}')
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def _block_type(block: Any, where: str, field: str = "messages") -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise ParamError(field, f'{where} must be a block {{"type": ..., ...}}')
    return block["type"]


def _text_of(block: dict[str, Any], where: str, field: str = "messages") -> str:
    if not isinstance(block.get("text"), str):
        raise ParamError(field, f'{where} is a text block without a string "text"')
    return block["text"]


def _unreadable(kind: str, where: str, field: str = "messages") -> ParamError:
    return ParamError(
        field,
        f"{where} is a block of type {kind!r}; this server's model reads text only: send text blocks "
        '{"type": "text", "text": "..."}',
    )


def _texts(content: str | list[Any], where: str) -> str:
    """A system prompt or a tool result: a string, or text blocks joined by newlines."""
    if isinstance(content, str):
        return content
    field = "system" if where == "system" else "messages"
    if not isinstance(content, list):
        raise ParamError(field, f"{where} must be a string or a list of text blocks")
    texts = []
    for j, block in enumerate(content):
        kind = _block_type(block, f"{where}.{j}", field)
        if kind != "text":
            raise _unreadable(kind, f"{where}.{j}", field)
        texts.append(_text_of(block, f"{where}.{j}", field))
    return "\n".join(texts)


def _assistant(blocks: list[Any], where: str) -> dict[str, Any]:
    """The assistant's blocks as one chat message: its text, and its tool_use blocks as tool_calls."""
    texts, calls = [], []
    for j, block in enumerate(blocks):
        kind, at = _block_type(block, f"{where}.{j}"), f"{where}.{j}"
        if kind == "text":
            texts.append(_text_of(block, at))
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise ParamError("messages", f"{at} is a tool_use block without a string id and name")
            if not isinstance(block.get("input", {}), dict):
                raise ParamError("messages", f"{at} is a tool_use block whose input is not an object")
            arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": arguments},
                }
            )
        elif kind not in THOUGHTS:
            raise _unreadable(kind, at)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "\n".join(texts) if texts or not calls else None,
    }
    return message | ({"tool_calls": calls} if calls else {})


def _user(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """The user's blocks as chat messages: each tool_result a tool message, the text around them user ones."""
    messages: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        kind, at = _block_type(block, f"{where}.{j}"), f"{where}.{j}"
        if kind == "text":
            texts.append(_text_of(block, at))
        elif kind == "tool_result":
            if texts:
                messages.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            if not isinstance(block.get("tool_use_id"), str):
                raise ParamError("messages", f"{at} is a tool_result block without a string tool_use_id")
            result = _texts(block.get("content") or "", f"{at}.content")
            if block.get("is_error"):
                result = f"Error: {result}"
            messages.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
        else:
            raise _unreadable(kind, at)
    if texts or not messages:
        messages.append({"role": "user", "content": "\n".join(texts)})
    return messages


# -- the answer ---------------------------------------------------------------------------------------


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id(call_id: str) -> str:
    """A chat call's id (call_...) as Anthropic names them (toolu_...)."""
    return "toolu_" + call_id.removeprefix("call_")


def thinking_block(text: str) -> dict[str, Any]:
    # No signature: textgen's thoughts are not signed, and a thought sent back is left out (THOUGHTS).
    return {"type": "thinking", "thinking": text, "signature": ""}


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_use_block(call: dict[str, Any], whole: bool = True) -> dict[str, Any]:
    """A chat tool call as a tool_use block; `whole`: with its input (else {} to stream it into)."""
    function = call["function"]
    return {
        "type": "tool_use",
        "id": tool_use_id(call["id"]),
        "name": function["name"],
        "input": _input(function["arguments"]) if whole else {},
    }


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the object Anthropic's input is; {} for arguments cut short (max_tokens)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(reasoning: str | None, text: str, reply: ToolReply | None) -> list[dict[str, Any]]:
    """A whole answer's content: its thought (if any), its text, then its calls."""
    blocks = [thinking_block(reasoning)] if reasoning is not None else []
    if reply is not None:
        text = reply.content or ""
    calls = reply.calls if reply is not None else []
    if text or not (blocks or calls):  # an answer of nothing is one empty text block (streamed too)
        blocks.append(text_block(text))
    return blocks + [tool_use_block(c) for c in calls]


def stop_of(result: GenerationResult, asked: list[str] | None, called: bool) -> tuple[StopReason, str | None]:
    """Anthropic's stop_reason and stop_sequence: only the client's own stop sequences count as such (a
    transcript's own stop, "\\nUser:", ends the turn)."""
    if result.finish_reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if result.finish_reason == "stop" and result.stop_sequence in (asked or ()):
        return "stop_sequence", result.stop_sequence
    return "end_turn", None


def usage_body(counts: TokenCounts) -> dict[str, Any]:
    # Anthropic counts cache reads apart: input_tokens + cache_read_input_tokens is the whole prompt.
    return {
        "input_tokens": counts.prompt - counts.cached,
        "output_tokens": counts.completion,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": counts.cached,
    }


def message_body(
    message: str,
    model: str,
    content: list[dict[str, Any]],
    stop: tuple[StopReason | None, str | None],
    usage: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": message,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop[0],
        "stop_sequence": stop[1],
        "usage": usage,
    }


class MessageObject(BaseModel):
    """The 200 body of /v1/messages; with `stream`, message_start carries it empty and the events after it
    add its content blocks."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]] = Field(
        description='Blocks: {"type": "thinking", "thinking"} (a thinking model\'s thought), '
        '{"type": "text", "text"}, {"type": "tool_use", "id", "name", "input"}.'
    )
    stop_reason: StopReason | None = Field(json_schema_extra={"nullable": True})
    stop_sequence: str | None = Field(json_schema_extra={"nullable": True})
    usage: dict[str, Any]


class TokenCount(BaseModel):
    """The 200 body of /v1/messages/count_tokens."""

    input_tokens: int
