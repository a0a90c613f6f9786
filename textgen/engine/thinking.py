"""A thinking model's thought inside one sequence: where it starts and ends, its tokens, and its budget.

A thinking model writes `<think> ... </think>` before its answer, or starts inside the thought when the
prompt opened it (SamplingParams.thinking says which). The thought's tokens are counted as they come (usage's
reasoning tokens). With a budget (Anthropic's thinking.budget_tokens, vLLM's thinking_token_budget), a
thought still open after that many tokens is closed: the tokens of `</think>` are forced, one a step, as the
only token the row may sample, and the model answers after them. vLLM's ThinkingBudgetStateHolder and
llama.cpp's reasoning budget do the same.

The tags are found in the text, not as token ids: a model without `</think>` as one special token writes it
in pieces, differently from how the tag alone tokenizes. Rows with a budget take no speculative drafts (a
forced token would be one more rule for every verified position); rows whose thought is only counted do.
"""

from __future__ import annotations

import torch

from textgen.engine.params import Thinking


class Thought:
    """One sequence's thought: before it (the model may still open one), in it, being closed, or after."""

    def __init__(self, thinking: Thinking) -> None:
        self.rule = thinking
        self.inside = thinking.opened
        self.over = False  # closed (by the model, or by force): the rest is the answer
        self.tokens = 0  # of thought, the closing tag's included
        self._forcing: list[int] = []  # the closing tag's tokens still to force
        self._text = ""  # the thought's last characters (or the answer's first ones, before it opens)
        if self.inside:
            self._check_budget()  # a budget of 0 closes it at once

    def forced(self) -> int | None:
        """The token the next step must produce, or None."""
        return self._forcing[0] if self._forcing else None

    def advance(self, text: str) -> None:
        """Take the text the sequence's newest token added."""
        if self.over:
            return
        if self._forcing:
            self.tokens += 1
            self._forcing.pop(0)
            self.over = not self._forcing
            return
        self._text += text
        if not self.inside:  # a thought opens the answer or there is none, as the answer is split
            start = self._text.lstrip()
            if not start.startswith(self.rule.open):
                self.over = not self.rule.open.startswith(start)  # else only blanks and part of the tag yet
                return
            self.inside, self._text = True, start[len(self.rule.open) :]
            if self.rule.close not in self._text:  # the opening tag's token: the thought begins after it
                self._check_budget()
                return
        self.tokens += 1
        if self.rule.close in self._text:
            self.over = True
            return
        self._text = self._text[-len(self.rule.close) :]
        self._check_budget()

    def _check_budget(self) -> None:
        if self.rule.budget is not None and self.tokens >= self.rule.budget:
            self._forcing = list(self.rule.close_ids)


def force_tokens(allowed: list[torch.Tensor | None], thoughts: list[Thought | None], width: int) -> None:
    """Per row, in place: a row whose thought is being closed may produce only its next forced token."""
    for row, thought in enumerate(thoughts):
        token = thought.forced() if thought is not None else None
        if token is not None:
            only = torch.zeros(width, dtype=torch.bool)
            only[token] = True
            allowed[row] = only
