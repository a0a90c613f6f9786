"""Turning a growing list of token ids into text deltas that are safe to show.

Byte-level BPE (GPT-2) splits one emoji or CJK character across several tokens; decoding those tokens
one at a time yields U+FFFD replacement characters. The detokenizer holds text back until it decodes
cleanly. The stop matcher holds back any tail that could still become a stop string, so a client never
sees the start of a stop string that later matches.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded as context so that tokenizers that drop a leading space (SentencePiece) do not
# glue the first generated word to the prompt.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Decode tokens one at a time into complete text deltas (vLLM's prefix/read offsets)."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix, full = self._decoded()
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete character, or a token that adds no text (a special token)
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Text still held back when generation ends (a character the model never completed)."""
        prefix, full = self._decoded()
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def _decoded(self) -> tuple[str, str]:
        """The text up to the read offset, and all of it, from the prefix offset."""
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        return prefix, decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)


class StopMatcher:
    """Find stop strings in streamed text, emitting only text that can no longer start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add `delta`; return (text safe to emit, whether a stop string matched)."""
        text = self.pending + delta
        hits = [(i, s) for i, s in ((text.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            at, self.matched = min(hits, key=lambda hit: hit[0])
            return text[:at], True
        hold = self._longest_stop_prefix_suffix(text)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop string."""
        text, self.pending = self.pending, ""
        return text

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
