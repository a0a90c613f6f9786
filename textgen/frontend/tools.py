"""Tool calling on /v1/chat/completions: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, for any
model.

What the model is shown: a model whose chat template takes `tools` (Qwen2.5, Llama 3.1, ...) renders them,
and the conversation's earlier calls and results, itself. For every other model (SmolLM2, GPT-2's plain
transcript) textgen writes them in the Hermes format that Qwen2.5/3, Hermes and SmolLM3 were trained on: the
tools' JSON in the system message, each earlier call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in its assistant turn, each result as
`<tool_response>...</tool_response>` in a user turn.

What the model writes, by `tool_choice`:
- "auto" (the default when tools are given): its own choice; the Hermes calls in its text become `tool_calls`
  and what comes before them `content`, as does an answer that is nothing but calls in bare JSON
  ({"name": ..., "parameters": {...}}, Llama 3.1's and 3.2's). Calls in other formats stay text.
- "required": one or more Hermes calls of the given tools, forced by a grammar (the same token masks as
  structured output, textgen/engine/grammar.py), so that even a model never trained on tools calls one with
  arguments valid against its schema; with `parallel_tool_calls: false` exactly one.
- {"type": "function", "function": {"name": ...}}: that function's arguments, forced to its schema (as vLLM
  and OpenAI: the output is the arguments; finish_reason "stop").
- "none": the tools are not shown and the model answers in text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from textgen.engine.json_schema import enforced_schema
from textgen.engine.params import Constraint, ParamError
from textgen.frontend.reasoning import may_open, template_text

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# A call as the model writes it; an unclosed last call (the text ended inside it) is read to its end.
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)
_JSON = json.JSONDecoder()
# A function with no parameters takes exactly {} (OpenAI: "omitting parameters defines a function with an
# empty parameter list").
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


# -- request bodies ----------------------------------------------------------------------------------


class _Body(BaseModel):
    """A part of a request body: unknown fields are a 400, never ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDefinition(_Body):
    name: str = Field(description="Letters, digits, underscores and dashes, at most 64.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments object.")
    strict: bool | None = Field(None, description="Accepted: forced calls always follow the schema.")


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Body):
    name: str
    arguments: str = Field(description="The arguments as a JSON text.")


class ToolCall(_Body):
    """A call in an assistant message: in the answer, and as the client sends it back in the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolFields(BaseModel):
    """The request fields of tool calling; the route's model checks unknown ones."""

    tools: list[Tool] | None = Field(
        None,
        description='Functions the model may call: [{"type": "function", "function": {...}}], at most 128.',
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description='"auto" (the default with tools), "required", "none", or {"type": "function", '
        '"function": {"name": ...}}; "required" and a named function are forced by a grammar.',
    )
    parallel_tool_calls: bool = Field(True, description="false: at most one call per answer.")
    # Checked once: the constraint, the rendering and the answer each ask.
    _tool_use: tuple[ToolUse | None] | None = PrivateAttr(None)

    def tool_use(self) -> ToolUse | None:
        """What these fields ask for, checked; None when the model answers in text without tools."""
        if self._tool_use is None:
            self._tool_use = (self._checked_tool_use(),)
        return self._tool_use[0]

    def _checked_tool_use(self) -> ToolUse | None:
        tools, choice = self.tools or [], self.tool_choice
        if choice is not None and choice != "none" and not tools:
            raise ParamError("tool_choice", "tool_choice other than 'none' needs a non-empty tools list")
        if len(tools) > 128:
            raise ParamError("tools", f"at most 128 tools; got {len(tools)}")
        names = [t.function.name for t in tools]
        for i, name in enumerate(names):
            if not _NAME.fullmatch(name):
                raise ParamError(
                    "tools", f"tools.{i}.function.name must be 1-64 letters, digits, _ or -; got {name!r}"
                )
        if len(set(names)) < len(names):
            raise ParamError("tools", "two tools have the same name; each function needs its own")
        if not tools or choice == "none":
            return None
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise ParamError(
                    "tool_choice",
                    f"tool_choice names {choice.function.name!r}, which is not among the tools "
                    f"({', '.join(names)})",
                )
            return ToolUse("named", tuple(tools), choice.function.name, self.parallel_tool_calls)
        return ToolUse(choice or "auto", tuple(tools), None, self.parallel_tool_calls)


# -- one request's tool use ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolReply:
    """An answer's text split into what the client gets: `content` (None: none) and `tool_calls`."""

    content: str | None
    calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ToolUse:
    mode: Literal["auto", "required", "named"]
    tools: tuple[Tool, ...]
    name: str | None = None  # the named function
    parallel: bool = True

    def constraint(self) -> Constraint | None:
        """The grammar that forces the answer: the named function's arguments, or Hermes calls. Raises
        ParamError naming the tool whose parameters are not a JSON schema the grammar engine takes."""
        if self.mode == "auto":
            return None
        # Here, not at the top: the grammar module imports torch, which `bentoml serve`'s first import of
        # service.py must not (tests/test_layout.py).
        from textgen.engine.grammar import schema_problem

        for i, tool in enumerate(self.tools):
            if self.mode == "required" or tool.function.name == self.name:
                problem = schema_problem(json.dumps(self._parameters(tool.function.name)))
                if problem is not None:
                    raise ParamError(
                        "tools", f"tools.{i}.function.parameters is not a usable JSON schema: {problem}"
                    )
        if self.mode == "named":
            return Constraint("json_schema", json.dumps(self._parameters(self.name)), "tool_choice")
        return Constraint("grammar", self._calls_grammar(), "tool_choice")

    def shown(self) -> list[dict[str, Any]]:
        """The tools as chat templates take them (OpenAI's shape)."""
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def reply(self, text: str) -> ToolReply:
        """The generated text as the answer's content and calls."""
        if self.mode == "named":
            return ToolReply(None, [_call(self.name or "", text)])
        bare = self._bare_calls(text)
        if bare:
            return ToolReply(None, bare if self.parallel else bare[:1])
        return self._hermes_reply(text)

    def finish_reason(self, reason: str, reply: ToolReply) -> str:
        """OpenAI's: "tool_calls" when the model chose to call (not for a named function, as OpenAI)."""
        return "tool_calls" if reason == "stop" and reply.calls and self.mode != "named" else reason

    def _parameters(self, name: str | None) -> dict[str, Any]:
        (tool,) = [t for t in self.tools if t.function.name == name]
        # Closed as the grammar closes any schema: tool_choice "required"'s grammar holds them inline
        return json.loads(enforced_schema(tool.function.parameters or NO_PARAMETERS))

    def _calls_grammar(self) -> str:
        """A Lark grammar (llguidance's, with inline JSON schemas) of Hermes calls, one per line."""
        alternatives = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": self._parameters(t.function.name),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        from textgen.engine.grammar import JSON_LAYOUT  # (as in `constraint`)

        schema = json.dumps({"anyOf": alternatives, "x-guidance": JSON_LAYOUT})
        repeat = ' ("\\n" call)*' if self.parallel else ""
        return f'start: call{repeat}\ncall: "{CALL_OPEN}\\n" %json {schema} "\\n{CALL_CLOSE}"\n'

    def _hermes_reply(self, text: str) -> ToolReply:
        start = text.find(CALL_OPEN)
        if start < 0:
            return ToolReply(text)
        calls = []
        for found in _HERMES_CALL.finditer(text, start):
            try:
                call, end = _JSON.raw_decode(found.group(1))
                if not CALL_CLOSE.startswith(found.group(1)[end:].strip()):  # a cut "</tool_call>" is fine
                    raise json.JSONDecodeError("text after the call", found.group(1), end)
            except json.JSONDecodeError:
                if calls and found.end() == len(text) and not found.group(0).endswith(CALL_CLOSE):
                    break  # the token budget cut the last call short (finish_reason "length"): the rest stand
                return ToolReply(text)  # not a call after all: the text is the answer
            if (called := self._as_call(call)) is None:
                return ToolReply(text)
            calls.append(called)
        before = text[:start].strip()
        return ToolReply(before or None, calls if self.parallel else calls[:1])

    def _bare_calls(self, text: str) -> list[dict[str, Any]] | None:
        """Calls written as the whole answer in bare JSON, as Llama 3.1 and 3.2 write them:
        {"name": ..., "parameters": {...}}, several separated by ";". None if the answer is anything else."""
        text, calls, at = text.strip(), [], 0
        while at < len(text):
            try:
                found, at = _JSON.raw_decode(text, at)
            except json.JSONDecodeError:
                return None
            if (call := self._as_call(found)) is None:
                return None
            calls.append(call)
            while at < len(text) and text[at] in "; \t\r\n":
                at += 1
        return calls

    def _as_call(self, found: Any) -> dict[str, Any] | None:
        """A call if `found` names one of the tools and gives its arguments as an object."""
        if not isinstance(found, dict):
            return None
        arguments = found.get("arguments", found.get("parameters"))
        if found.get("name") not in {t.function.name for t in self.tools} or not isinstance(arguments, dict):
            return None
        return _call(found["name"], json.dumps(arguments, ensure_ascii=False))


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


class ToolStream:
    """One streamed choice's text as content deltas and tool-call deltas.

    A named function's arguments stream as they come. Hermes calls ("auto", "required") are sent whole once
    the answer ends (clients add up deltas, so one delta per call is valid); text before them streams as
    content, except a tail that may be the start of "<tool_call>", held until it is known not to be.
    """

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self.text = ""  # all of it so far
        self.sent = 0  # how much of `text` went out as content (or, named, as arguments)
        self.calling = False  # a "<tool_call>" was seen: the rest waits for the end
        self.named_id: str | None = None

    def feed(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        """Content to send now, and tool-call deltas."""
        self.text += piece
        if self.use.mode == "named":
            return "", self._arguments(piece) if piece else []
        if self.calling or (self.sent == 0 and self.text.lstrip()[:1] in ("", "{")):
            return "", []  # in a call, or the answer may be bare JSON calls (Llama 3.x): held to the end
        start = self.text.find(CALL_OPEN, self.sent)
        if start >= 0:
            self.calling = True
            return self._content_until(start), []
        return self._content_until(len(self.text) - may_open(self.text, CALL_OPEN)), []

    def finish(self) -> tuple[str, list[dict[str, Any]], ToolReply]:
        """What is left to send at the end: content, tool-call deltas, and the whole answer's reply."""
        if self.use.mode == "named":
            deltas = [] if self.named_id else self._arguments("")
            return "", deltas, ToolReply(None, [_call(self.use.name or "", self.text)])
        reply = self.use.reply(self.text)
        if not reply.calls:  # no calls after all: what was held is content
            return self._content_until(len(self.text)), [], reply
        deltas = [{"index": i, **call} for i, call in enumerate(reply.calls)]
        return "", deltas, reply

    def _content_until(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def _arguments(self, piece: str) -> list[dict[str, Any]]:
        if self.named_id is None:
            first = _call(self.use.name or "", piece)
            self.named_id = first["id"]
            return [{"index": 0, **first}]
        return [{"index": 0, "function": {"arguments": piece}}]


# -- the conversation as the model sees it --------------------------------------------------------------


def takes_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders `tools` itself."""
    return "tools" in template_text(tokenizer)


def hermes_conversation(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, str]]:
    """`messages` (OpenAI's roles, with calls and results) as system / user / assistant turns of plain text,
    the tools described in the system turn, for templates (and the plain transcript) that know no tools."""
    turns: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [_hermes_call(c["function"]) for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + calls)
        if role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if turns and turns[-1]["role"] == "user" and turns[-1]["content"].endswith("</tool_response>"):
                turns[-1]["content"] += "\n" + response  # results of parallel calls: one turn, as Qwen2.5
                continue
            role, content = "user", response
        turns.append({"role": role, "content": content})
    if tools:
        described = hermes_tools_text(tools)
        if turns and turns[0]["role"] == "system":
            turns[0]["content"] = f"{turns[0]['content']}\n\n{described}"
        else:
            turns.insert(0, {"role": "system", "content": described})
    return turns


def _hermes_call(function: dict[str, Any]) -> str:
    written = {"name": function["name"], "arguments": _as_object(function["arguments"])}
    return f"{CALL_OPEN}\n{json.dumps(written, ensure_ascii=False)}\n{CALL_CLOSE}"


def hermes_tools_text(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to answer. "
        "Their signatures are within <tools></tools>:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each call, write a JSON object with the function's name and arguments within "
        f"{CALL_OPEN}{CALL_CLOSE} tags:\n"
        f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <arguments-json-object>}}\n{CALL_CLOSE}'
    )


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` for a template that takes tools: each call's arguments as an object, as templates expect
    (Llama 3.1's writes `arguments | tojson`; Qwen2.5's takes either), and no None content."""
    out = []
    for m in messages:
        m = {**m, "content": m.get("content") or ""}
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _as_object(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def _as_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
