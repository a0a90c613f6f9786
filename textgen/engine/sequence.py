"""One request's life inside the engine: its tokens, text, stop rules and timings."""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from textgen.engine.detokenize import IncrementalDetokenizer, StopMatcher
from textgen.engine.params import SamplingParams

# Why a sequence ended. The first three are answers; "cancelled" (client gone, timeout, shutdown) and
# "error" (a failed step) become HTTP errors in the api wing.
FinishReason = Literal["length", "stop", "eos", "cancelled", "error"]


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    seed: int
    queue_seconds: float
    first_token_seconds: float  # from submission to the first token
    total_seconds: float
    max_batch_size: int  # most sequences that shared a forward pass with this one
    error: str | None = None


@dataclass
class Event:
    """What a request's consumer receives: a text delta, and on the last event, the result."""

    text: str
    result: GenerationResult | None = None


class Sequence:
    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Any,
        eos_token_ids: set[int],
        max_length: int,
        emit: Callable[[Event], None],
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.rng = torch.Generator().manual_seed(self.seed)  # this sequence's own random stream
        self.eos_token_ids = set() if params.ignore_eos else eos_token_ids
        budget = params.max_new_tokens if params.max_new_tokens is not None else max_length
        self.max_new_tokens = min(budget, max_length - len(prompt_ids))
        self.emit = emit
        self.output_ids: list[int] = []
        self.text = ""
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop_matcher = StopMatcher(params.stop)
        self.finish_reason: FinishReason | None = None
        self.cancelled = False
        self.max_batch_size = 0
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.first_token: float | None = None
        n = params.no_repeat_ngram_size
        self._ngrams: dict[tuple[int, ...], set[int]] = defaultdict(set)
        if n > 0 and params.penalize_prompt:
            for i in range(len(prompt_ids) - n + 1):
                self._ngrams[tuple(prompt_ids[i : i + n - 1])].add(prompt_ids[i + n - 1])

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def banned_tokens(self) -> set[int]:
        """Tokens that would complete an n-gram already present (no_repeat_ngram_size)."""
        n = self.params.no_repeat_ngram_size
        if n <= 0:
            return set()
        ids = self.all_ids
        if len(ids) < n - 1:
            return set()
        return self._ngrams.get(tuple(ids[len(ids) - n + 1 :]), set()) if n > 1 else set(ids)

    def append(self, token_id: int) -> None:
        """Take the token sampled for this sequence: update text, n-grams and finish state."""
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        n = self.params.no_repeat_ngram_size
        ids = self.all_ids
        if n > 1 and len(ids) >= n - 1:
            self._ngrams[tuple(ids[len(ids) - n + 1 :])].add(token_id)
        self.output_ids.append(token_id)
        eos = token_id in self.eos_token_ids
        last = eos or len(self.output_ids) >= self.max_new_tokens
        text = "" if eos else self.detokenizer.push(token_id)
        if last:
            text += self.detokenizer.flush()
        delta, stopped = self.stop_matcher.feed(text)
        if stopped:
            self._finish("stop", delta)
        elif last:
            self._finish("eos" if eos else "length", delta + self.stop_matcher.flush())
        elif delta:
            self.text += delta
            self.emit(Event(delta))

    def abort(self, reason: FinishReason, error: str | None = None) -> None:
        if self.finish_reason is None:
            tail = ""
            if reason == "length":
                tail, _ = self.stop_matcher.feed(self.detokenizer.flush())
                tail += self.stop_matcher.flush()
            self._finish(reason, tail, error)

    def _finish(self, reason: FinishReason, delta: str, error: str | None = None) -> None:
        self.text += delta
        self.finish_reason = reason
        now = time.perf_counter()
        result = GenerationResult(
            text=self.text,
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            seed=self.seed,
            queue_seconds=(self.started or now) - self.submitted,
            first_token_seconds=(self.first_token or now) - self.submitted,
            total_seconds=now - self.submitted,
            max_batch_size=self.max_batch_size,
            error=error,
        )
        self.emit(Event(delta, result))
