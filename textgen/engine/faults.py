"""A test-only fault hook: make engine steps fail for chosen sequences, to prove a failure stays with them.

Off unless TEXTGEN_TEST_FAULT_PROMPT is set (the engine then holds a FaultInjector and consults it after
every forward pass; otherwise it holds None and consults nothing). It is for tests: never set it in
production, where it would fail the requests of any user who types the marker.
"""

from __future__ import annotations

import weakref
from typing import Any

from textgen.engine.sequence import Sequence


class InjectedFault(RuntimeError):
    """The failure a FaultInjector raises (a stand-in for a kernel error or an allocation failure)."""


class FaultInjector:
    """Raises InjectedFault for a step that includes a sequence whose prompt contains `marker`, once that
    sequence has `after_tokens` tokens (0: at its prefill)."""

    def __init__(self, marker: str, tokenizer: Any, after_tokens: int = 0) -> None:
        self.marker = marker
        self.tokenizer = tokenizer
        self.after_tokens = after_tokens
        self._poisoned: weakref.WeakKeyDictionary[Sequence, bool] = weakref.WeakKeyDictionary()

    def check(self, rows: list[Sequence]) -> None:
        for seq in rows:
            if self._is_poisoned(seq) and len(seq.output_ids) >= self.after_tokens:
                raise InjectedFault("injected test fault (TEXTGEN_TEST_FAULT_PROMPT is set)")

    def _is_poisoned(self, seq: Sequence) -> bool:
        poisoned = self._poisoned.get(seq)
        if poisoned is None:  # decoded once per sequence
            poisoned = self._poisoned[seq] = self.marker in self.tokenizer.decode(seq.prompt_ids)
        return poisoned
