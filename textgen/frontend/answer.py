"""A chat-shaped answer split into a thinking model's reasoning, its content and its tool calls, whole or
as it streams. Every chat dialect (chat completions, the Responses API, Anthropic's Messages) splits its
answers here, so that a streamed answer and the same answer whole always split alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from textgen.frontend.prepare import Prepared
from textgen.frontend.reasoning import ReasoningStream, split_reasoning
from textgen.frontend.tools import ToolReply, ToolStream, ToolUse


def prompt_thinks(prepared: Prepared) -> bool | None:
    """Whether a chat request's prompt opened a thought (None: the model does not think), for splitting its
    answer (`split_answer`, `AnswerStream`); an answer a grammar forces is never a thought (prepare.py)."""
    thinking = prepared.choices[0].params.thinking
    return thinking.opened if thinking is not None else None


def split_answer(
    text: str, thinking: bool | None, tools: ToolUse | None
) -> tuple[str | None, str, ToolReply | None]:
    """A whole chat answer as (a thinking model's reasoning or None, the rest, its tool calls' reply or None
    without tools): `thinking` says whether the prompt opened <think> (None: the model does not think)."""
    reasoning, content = split_reasoning(text, thinking) if thinking is not None else (None, text)
    return reasoning, content, tools.reply(content) if tools is not None else None


@dataclass
class AnswerParts:
    """A piece of a streamed chat answer: reasoning, content and tool-call deltas to send now."""

    reasoning: str = ""
    content: str = ""
    calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __add__(self, later: "AnswerParts") -> "AnswerParts":
        return AnswerParts(
            self.reasoning + later.reasoning, self.content + later.content, self.calls + later.calls
        )


class AnswerStream:
    """One streamed chat choice's text split as the JSON answer splits it: a thinking model's reasoning first
    (frontend/reasoning.py), then tool calls in what is left (frontend/tools.py)."""

    def __init__(self, thinking: bool | None, tools: ToolUse | None) -> None:
        """`thinking`: whether the prompt opened <think> (None: the model does not think); `tools`: the
        request's tool calling."""
        self.thoughts = ReasoningStream(thinking) if thinking is not None else None
        self.tools = ToolStream(tools) if tools is not None else None
        self.reply: ToolReply | None = None  # the tool calls' reply, once finished

    def feed(self, piece: str) -> AnswerParts:
        reasoning, content = self.thoughts.feed(piece) if self.thoughts is not None else ("", piece)
        return self._content(reasoning, content)

    def finish(self) -> AnswerParts:
        reasoning, content = self.thoughts.finish() if self.thoughts is not None else ("", "")
        parts = self._content(reasoning, content)
        if self.tools is not None:
            rest, more, self.reply = self.tools.finish()
            parts.content, parts.calls = parts.content + rest, parts.calls + more
        return parts

    def finish_reason(self, reason: str) -> str:
        return self.tools.use.finish_reason(reason, self.reply) if self.tools and self.reply else reason

    @property
    def in_thought(self) -> bool:
        """Whether the text so far ends in a thought, or after its closing tag before the answer."""
        return self.thoughts is not None and self.thoughts.state in ("reasoning", "after")

    def _content(self, reasoning: str, content: str) -> AnswerParts:
        if self.tools is None or not content:
            return AnswerParts(reasoning, content)
        text, calls = self.tools.feed(content)
        return AnswerParts(reasoning, text, calls)
