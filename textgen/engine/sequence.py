"""One request's life inside the engine: its tokens, text, stop rules and timings."""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from typing import Any, Callable

import torch

from textgen.engine.detokenize import IncrementalDetokenizer, StopMatcher
from textgen.engine.grammar import Guide
from textgen.engine.outputs import Event, FinishReason, GenerationResult, TokenLogprob
from textgen.engine.params import SamplingParams
from textgen.engine.thinking import Thought


class Sequence:
    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Any,
        eos_token_ids: set[int],
        max_length: int,
        emit: Callable[[Event], None],
        guide: Guide | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.guide = guide  # structured output: the grammar's state, None for free text
        self.thought = Thought(params.thinking) if params.thinking is not None else None
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.rng = torch.Generator().manual_seed(self.seed)  # this sequence's own random stream
        self.eos_token_ids = set() if params.ignore_eos else eos_token_ids
        self.stop_token_ids = set(params.stop_token_ids)
        budget = params.max_new_tokens if params.max_new_tokens is not None else max_length
        self.max_new_tokens = min(budget, max_length - len(prompt_ids))
        self.emit = emit
        self.output_ids: list[int] = []
        self.text = ""
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stop_matcher = StopMatcher(params.stop)
        self.finish_reason: FinishReason | None = None
        self.cancelled = False
        self.request_id = ""  # set by the engine: names the request in logs (never the prompt)
        self.max_batch_size = 0
        self.cached_tokens = 0  # prompt tokens the prefix cache served
        self.drafted_tokens = 0  # speculative drafts checked, and those kept (OpenAI's prediction usage)
        self.accepted_draft_tokens = 0
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.first_token: float | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob] | None = None  # set by the runner at prefill
        self._unsent_logprobs = 0  # logprobs of tokens whose text is still held back
        self._allowed: torch.Tensor | None = None  # allowed_token_ids as a mask, once built
        self._sent_tokens = 0  # output tokens the events so far have named
        # How often each generated token was generated, sparse: ids and counts in the first len(_count_slot)
        # slots (capacity doubling), and each id's slot. Kept only for presence_penalty and frequency_penalty.
        self._count_slot: dict[int, int] = {}
        self._count_ids = torch.empty(0, dtype=torch.long)
        self._counts = torch.empty(0)
        self.context_ids = prompt_ids
        self._ngrams: dict[tuple[int, ...], set[int]] = defaultdict(set)
        self.set_context(prompt_ids)

    def set_context(self, context_ids: list[int]) -> None:
        """The ids the output continues, for the n-gram and repetition rules: the prompt for a causal
        model; for an encoder-decoder, the decoder's own start (its prompt is the encoder's input), as in
        Hugging Face `generate`. Call before the first token."""
        self.context_ids = context_ids
        self._ngrams.clear()
        n = self.params.no_repeat_ngram_size
        if n > 0 and self.params.penalize_prompt:
            for i in range(len(context_ids) - n + 1):
                self._ngrams[tuple(context_ids[i : i + n - 1])].add(context_ids[i + n - 1])

    @property
    def all_ids(self) -> list[int]:
        return self.context_ids + self.output_ids

    def banned_tokens(self) -> set[int]:
        """Tokens the next step must not sample: those that would complete an n-gram already present
        (no_repeat_ngram_size) or a bad word (bad_words), and end-of-text and stop_token_ids while fewer
        than min_tokens were generated."""
        banned = self._ngram_bans()
        if self.params.bad_words_ids:
            banned = banned | bad_word_bans(self.params.bad_words_ids, self.output_ids)  # a new set
        if len(self.output_ids) < self.params.min_tokens:
            banned = banned | self.early_ends(len(self.output_ids))  # a new set: never the n-gram table's
        return banned

    def allowed_mask(self, width: int) -> torch.Tensor | None:
        """allowed_token_ids as a [width] bool mask over the logits (None: any token), built once."""
        if not self.params.allowed_token_ids:
            return None
        if self._allowed is None or len(self._allowed) != width:
            self._allowed = torch.zeros(width, dtype=torch.bool)
            self._allowed[[t for t in self.params.allowed_token_ids if t < width]] = True
        return self._allowed

    @property
    def end_tokens(self) -> set[int]:
        """The tokens that end the text: end-of-text (unless ignore_eos) and stop_token_ids."""
        return self.eos_token_ids | self.stop_token_ids

    def early_ends(self, generated: int) -> set[int]:
        """The tokens that would end the text, while `generated` tokens are fewer than min_tokens."""
        if generated >= self.params.min_tokens:
            return set()
        return self.end_tokens

    def _ngram_bans(self) -> set[int]:
        n = self.params.no_repeat_ngram_size
        if n <= 0:
            return set()
        ids = self.all_ids
        if len(ids) < n - 1:
            return set()
        return self._ngrams.get(tuple(ids[len(ids) - n + 1 :]), set()) if n > 1 else set(ids)

    def token_counts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(distinct generated token ids, how often each was generated), or None when no penalty of this
        sequence needs them (presence_penalty, frequency_penalty).

        Sparse and kept up to date by append(), so a step costs a penalized row a few hundred scattered
        values, not a pass over the vocabulary: dense [rows, vocab] counts took 9.1 ms per step for 32
        penalized rows of GPT-2's 50257 tokens (one thread), against 0.5 ms for the whole unpenalized step.
        """
        if not self.params.penalizes_counts:
            return None
        n = len(self._count_slot)
        return self._count_ids[:n], self._counts[:n]

    def _count(self, token_id: int) -> None:
        slot = self._count_slot.get(token_id)
        if slot is not None:
            self._counts[slot] += 1
            return
        slot = len(self._count_slot)
        if slot == len(self._count_ids):
            grown = max(64, 2 * slot)
            self._count_ids = torch.cat([self._count_ids, torch.empty(grown - slot, dtype=torch.long)])
            self._counts = torch.cat([self._counts, torch.empty(grown - slot)])
        self._count_slot[token_id] = slot
        self._count_ids[slot] = token_id
        self._counts[slot] = 1.0

    def append(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        """Take the token sampled for this sequence: update text, n-grams and finish state."""
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
            self._unsent_logprobs += 1
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        n = self.params.no_repeat_ngram_size
        ids = self.all_ids
        if n > 1 and len(ids) >= n - 1:
            self._ngrams[tuple(ids[len(ids) - n + 1 :])].add(token_id)
        self.output_ids.append(token_id)
        if self.params.penalizes_counts:
            self._count(token_id)
        eos = token_id in self.eos_token_ids
        early = len(self.output_ids) < self.params.min_tokens
        stop_token = token_id in self.stop_token_ids and not eos and not early
        complete = self.guide is not None and self.guide.advance(token_id)  # nothing may follow
        last = eos or stop_token or complete or len(self.output_ids) >= self.max_new_tokens
        text = "" if eos else self.detokenizer.push(token_id)
        if self.thought is not None:
            self.thought.advance(text)
        if last:
            text += self.detokenizer.flush()
        if early:
            # Too early for a stop string to end the text (vLLM's min_tokens): the text so far goes out
            # unmatched, and matching starts with the text of token number min_tokens.
            delta, stopped = text, False
        else:
            delta, stopped = self.stop_matcher.feed(text)
        if stopped:
            kept = self.stop_matcher.matched if self.params.include_stop_str_in_output else None
            self._finish("stop", delta + (kept or ""))
        elif stop_token:  # as vLLM, the stop token's own text stays (none for a special token)
            self._finish("stop", delta + self.stop_matcher.flush())
        elif last:
            self._finish("eos" if eos or complete else "length", delta + self.stop_matcher.flush())
        elif delta:
            self.text += delta
            self.emit(Event(delta, logprobs=self._take_logprobs(), **self._tokens_since()))

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
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            stop_sequence=self.stop_matcher.matched,
            cached_tokens=self.cached_tokens,
            drafted_tokens=self.drafted_tokens,
            accepted_draft_tokens=self.accepted_draft_tokens,
            reasoning_tokens=self.thought.tokens if self.thought is not None else 0,
            token_ids=self.output_ids,
        )
        self.emit(Event(delta, result, logprobs=self._take_logprobs(), **self._tokens_since()))

    def _tokens_since(self) -> dict[str, Any]:
        """An event's token fields: how many so far, and the ids since the previous event."""
        sent, self._sent_tokens = self._sent_tokens, len(self.output_ids)
        return {"tokens": len(self.output_ids), "token_ids": self.output_ids[sent:]}

    def _take_logprobs(self) -> list[TokenLogprob] | None:
        if self.logprobs is None:
            return None
        taken = self.logprobs[len(self.logprobs) - self._unsent_logprobs :] if self._unsent_logprobs else []
        self._unsent_logprobs = 0
        return taken


def end_tokens_of(seqs: list[Sequence]) -> set[int]:
    """The tokens that end any of `seqs`' texts: what the repetition penalty spares in their batch."""
    return set().union(*(s.end_tokens for s in seqs))


def bad_word_bans(words: tuple[tuple[int, ...], ...], output_ids: list[int]) -> set[int]:
    """The last token of every bad word whose other tokens end the output so far (a one-token word is
    always banned). The prompt does not count, as in vLLM: a word may be asked about, not answered."""
    banned = set()
    for word in words:
        *start, last = word
        if not start or output_ids[len(output_ids) - len(start) :] == start:
            banned.add(last)
    return banned
