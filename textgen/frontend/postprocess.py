"""Post-processing of generated text: the old service's clean-ups, made correct and switchable.

Every function takes and returns plain text and never fails on odd input: an empty result is a
valid result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A sentence ends at . ! ? or an ellipsis, optionally followed by closing quotes or brackets.
_SENTENCE_END = re.compile(r"""[.!?…][\"'”’)\]]*(?=\s|$)""")


@dataclass(frozen=True)
class PostProcessing:
    """Which clean-ups to apply, in the order `apply` runs them."""

    strip_prompt: bool = True
    drop_repeated_lines: bool = True
    max_words: int | None = 200
    trim_incomplete_sentence: bool = False

    def apply(self, text: str, prompt: str) -> str:
        if self.strip_prompt:
            text = strip_echoed_prompt(text, prompt)
        if self.drop_repeated_lines:
            text = drop_repeated_lines(text)
        if self.max_words is not None:
            text = limit_words(text, self.max_words)
        if self.trim_incomplete_sentence:
            text = trim_incomplete_sentence(text)
        return text.strip()


def strip_echoed_prompt(text: str, prompt: str) -> str:
    """Drop the prompt when the model starts its answer by repeating it."""
    echo = prompt.strip()
    stripped = text.lstrip()
    if echo and stripped.startswith(echo):
        return stripped[len(echo) :]
    return text


def drop_repeated_lines(text: str) -> str:
    """Keep the first occurrence of each non-blank line; blank lines stay as paragraph breaks."""
    seen: set[str] = set()
    kept: list[str] = []
    for line in text.split("\n"):
        key = " ".join(line.split()).casefold()
        if key:
            if key in seen:
                continue
            seen.add(key)
        elif kept and not kept[-1].strip():
            continue  # collapse the blank lines that dropping a repeat leaves behind
        kept.append(line)
    return "\n".join(kept)


def limit_words(text: str, max_words: int) -> str:
    """Cut `text` after `max_words` words, keeping its original spacing up to there."""
    if max_words <= 0:
        return ""
    matches = list(re.finditer(r"\S+", text))
    if len(matches) <= max_words:
        return text
    return text[: matches[max_words - 1].end()]


def trim_incomplete_sentence(text: str) -> str:
    """Drop a dangling half-sentence after the last sentence end; text without one is kept whole."""
    ends = list(_SENTENCE_END.finditer(text))
    if not ends:
        return text
    return text[: ends[-1].end()]
