"""A thinking model's reasoning apart from its answer, as vLLM's reasoning parsers, Ollama and LM Studio give
it.

Models whose chat template knows `<think>` (Qwen3, DeepSeek-R1 and its distillations, SmolLM3) write their
reasoning as `<think>...</think>` before the answer, or after a prompt that already opened `<think>`
(DeepSeek-R1's template ends with it). On /v1/chat/completions the text inside goes to the message's
`reasoning_content` (streamed as `delta.reasoning_content`), the answer after it to `content`, where tool
calls are then looked for. An answer a grammar forces (structured output, a forced tool call) is never split:
the grammar leaves no room for a thought. Models whose template has no `<think>` are untouched: a `<think>`
they write stays in the content.

Whether such a model thinks is its chat template's choice, made from the template's variables: Qwen3's,
SmolLM3's and GLM's `enable_thinking`, gpt-oss's `reasoning_effort`. Every dialect's switch sets them
(`thinking_variables`): OpenAI's `reasoning_effort` ("none" is off), the Responses API's `reasoning.effort`,
Anthropic's `thinking` ({"type": "disabled"} is off); vLLM's `chat_template_kwargs` sets them directly and
wins over the switch. A model without a chat template, or whose template reads neither, is unaffected.
"""

from __future__ import annotations

from typing import Any, Literal

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# OpenAI's reasoning efforts (the chat API's reasoning_effort, the Responses API's reasoning.effort).
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


def thinking_variables(effort: Effort) -> dict[str, Any]:
    """The chat template variables for a reasoning effort: "none" turns a thinking model's thought off, any
    other effort on, and is given to templates that read it (gpt-oss's; vLLM passes it the same way)."""
    if effort == "none":
        return {"enable_thinking": False}
    return {"enable_thinking": True, "reasoning_effort": effort}


def template_text(tokenizer: Any) -> str:
    """The model's chat template source ("" without one); named templates joined."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return " ".join(template.values()) if isinstance(template, dict) else template


def thinks(tokenizer: Any) -> bool:
    """Whether the model's chat template knows the <think> ... </think> block."""
    template = template_text(tokenizer)
    return THINK_OPEN in template and THINK_CLOSE in template


def opened_by(prompt: str) -> bool:
    """Whether the prompt ends inside a <think> block, so that the answer starts with reasoning."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def thinking_of(tokenizer: Any, prompt: str, forced: bool) -> bool | None:
    """How an answer to `prompt` may hold a thought: True if it starts inside one (the prompt opened
    <think>), False if it may open one; None if the model does not think or a grammar forces the answer
    (`forced`), which leaves no room for a thought."""
    return None if forced or not thinks(tokenizer) else opened_by(prompt)


def may_open(text: str, tag: str) -> int:
    """How many of `text`'s last characters may begin `tag` (held back from a stream until known)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """One answer's text, piece by piece, as (reasoning, content) to send now."""

    def __init__(self, opened: bool) -> None:
        self.state: Literal["start", "reasoning", "after", "content"] = "reasoning" if opened else "start"
        self.held = ""

    def feed(self, piece: str) -> tuple[str, str]:
        self.held += piece
        reasoning = ""
        while True:
            if self.state == "start":  # before the answer shows whether it opens with <think>
                text = self.held.lstrip()
                if text.startswith(THINK_OPEN):
                    self.held, self.state = text[len(THINK_OPEN) :], "reasoning"
                elif THINK_OPEN.startswith(text):
                    return reasoning, ""
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                end = self.held.find(THINK_CLOSE)
                if end < 0:
                    keep = len(self.held) - may_open(self.held, THINK_CLOSE)
                    reasoning, self.held = reasoning + self.held[:keep], self.held[keep:]
                    return reasoning, ""
                reasoning += self.held[:end]
                self.held, self.state = self.held[end + len(THINK_CLOSE) :], "after"
            elif self.state == "after":  # the blank lines between </think> and the answer are neither
                self.held = self.held.lstrip()
                if not self.held:
                    return reasoning, ""
                self.state = "content"
            else:
                content, self.held = self.held, ""
                return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held at the end: reasoning the budget cut inside <think>, else content."""
        held, self.held = self.held, ""
        if self.state == "reasoning":
            return held, ""
        return "", "" if self.state == "after" else held


def split_reasoning(text: str, opened: bool) -> tuple[str | None, str]:
    """A whole answer as (reasoning, or None without any; content)."""
    stream = ReasoningStream(opened)
    reasoning, content = stream.feed(text)
    more_reasoning, more_content = stream.finish()
    return (reasoning + more_reasoning) or None, content + more_content
