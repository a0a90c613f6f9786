"""Decoder-only models: the running batch advanced one token per step (iteration-level batching).

A step that raises (a kernel error, an allocation that fails, a bug one request's parameters reach) does not
take the batch down with it: the step is undone and each of its rows retried alone, so that only the
sequences whose own step fails finish with "error"; the others go on as if nothing happened (in float32,
with the same text: a row computes the same thing alone or batched). vLLM and TGI abort the whole batch.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from textgen.engine.batch import DecodeBatch
from textgen.engine.chunking import SHORT_PROMPT, ChunkSizer, PromptFill
from textgen.engine.faults import FaultInjector
from textgen.engine.grammar import allowed_tokens, apply_masks, lift_dead_bans, restrict
from textgen.engine.logprobs import prompt_logprobs, sampled_logprobs
from textgen.engine.outputs import TokenLogprob
from textgen.engine.prefix_cache import PrefixCache
from textgen.engine.sampling import apply_penalties, sample
from textgen.engine.sequence import Sequence, end_tokens_of
from textgen.engine.speculative import Speculator
from textgen.engine.thinking import force_tokens
from textgen.model.attention import cache_dtype, decodes_with_segments

log = logging.getLogger(__name__)

# Told about every failed step: seq None for a batched step (its rows are then retried alone), else the
# sequence whose own step failed (it then finishes with "error").
ErrorHook = Callable[[Sequence | None, BaseException], None]


class CausalRunner:
    """Owns the running DecodeBatch and the prompts being computed: each step decodes the batch and
    computes as much of the waiting prompts as the step's budget allows (chunking.py), a long prompt's chunk
    in the decoding step's own pass; a prompt whose beginning is in the prefix cache starts from there
    (prefix_cache.py); finished rows leave.

    The encoder-decoder runner (seq2seq.py) is this runner with another kind of batch: everything from
    sampling to fault isolation is shared, only how a batch is prefilled, stepped and reshaped differs.
    """

    batch_class: type[DecodeBatch] = DecodeBatch
    scores_prompts = True  # False: prompt_logprobs are not computed (an encoder's input is not predicted)
    chunks_prompts = True  # False: every prompt is computed whole, as soon as it is admitted

    def __init__(
        self,
        model: Any,
        vocab_size: int,
        faults: FaultInjector | None = None,
        on_error: ErrorHook | None = None,
        speculator: Speculator | None = None,
        max_step_tokens: int = 512,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.speculator = speculator  # None: no speculative decoding at all
        self.last_tokens = 0  # tokens the last step generated (more than its rows when it speculated)
        self.vocab_size = vocab_size
        self.batch: DecodeBatch | None = None
        # Admitted, not decoding yet, first come first served: sequences not started, and prompts part-done.
        self.filling: collections.deque[Sequence | PromptFill] = collections.deque()
        self.chunks = ChunkSizer(max_step_tokens)
        self.prefix_cache = prefix_cache
        self.faults = faults  # tests only: None in production
        self.on_error: ErrorHook = on_error or (lambda seq, exc: None)

    @property
    def rows(self) -> list[Sequence]:
        decoding = self.batch.rows if self.batch is not None else []
        return decoding + [item.seq if isinstance(item, PromptFill) else item for item in self.filling]

    def kv_bytes(self) -> int:
        fills = [item.batch for item in self.filling if isinstance(item, PromptFill)]
        return sum(b.kv_bytes() for b in fills + ([self.batch] if self.batch is not None else []))

    def reset(self) -> None:
        self.batch = None
        self.filling.clear()

    def step(self, new: list[Sequence]) -> int:
        """One iteration: the waiting short prompts alone, or a long prompt's next chunk and a decoding step
        (in one forward pass when the model decodes with textgen's attention).

        Returns how many sequences got a token (0 when nothing ran); `last_tokens` says how many tokens.
        """
        self.filling.extend(new)
        self.last_tokens = 0
        batch = self.batch
        if batch is not None:
            _drop_cancelled(batch)
            if len(batch) == 0:
                batch = self.batch = None
        decoding = len(batch) if batch is not None else 0
        head = self.filling[0] if self.filling else None
        last = head.last if isinstance(head, PromptFill) else None
        chunk = self.chunks.budget(decoding, last) if decoding and self.chunks_prompts else sys.maxsize
        completed = 0
        if self.filling and not self._is_long(self.filling[0], chunk):
            # Short prompts get an iteration of their own, as before chunked prefill: sharing it with the
            # decoding step measured slower (workload W, 2-core Xeon: 457 against 497 tok/s).
            cap = self.chunks.cap(decoding) if decoding and self.chunks_prompts else sys.maxsize
            completed = self._fill(chunk, cap)
            if completed or batch is None:
                self.last_tokens = completed
                return completed
        elif self.filling:
            fill = self._as_fill(self.filling[0])
            if fill is not None and batch is not None and self._mixes(batch):
                return self._mixed_step(batch, fill)
            # A long prompt: one chunk of it, then the decoding step; the streams wait for a chunk, not for
            # the whole prompt.
            completed = self._fill(chunk, chunk)
        if self.batch is None:
            self.last_tokens = completed
            return completed
        started = time.perf_counter()
        stepped = len(self.batch)
        self.last_tokens = stepped
        self.batch = self._decode(self.batch)  # sets last_tokens higher when it speculates
        self.last_tokens += completed
        self.chunks.decoded(time.perf_counter() - started)
        return stepped + completed

    def _is_long(self, item: Sequence | PromptFill, chunk: int) -> bool:
        """Whether a waiting prompt is computed in chunks: one in progress, one longer than `chunk`, or one
        whose beginning is in the prefix cache (the rest is computed as a chunk of its own)."""
        if isinstance(item, PromptFill):
            return True
        if item.cancelled or (self.scores_prompts and item.params.prompt_logprobs is not None):
            return False
        if len(item.prompt_ids) > max(chunk, SHORT_PROMPT):
            return True
        if self.prefix_cache is None:
            return False
        return self.prefix_cache.cached_tokens(item.prompt_ids) >= self.chunks.worth_reusing()

    def _fill(self, chunk: int, cap: int) -> int:
        """Compute waiting prompts, first come first served; those completed get their first token and join
        the batch. Returns how many completed.

        While rows decode, one pass at most (each pass reads every weight: on a CPU that alone costs about a
        decoding step): the next `chunk` tokens of the prompt in progress, or of a prompt longer than `chunk`
        or whose beginning is cached; else whole prompts together, up to `cap` tokens. Only long prompts are
        cut: cutting short ones too, or spreading a burst of them over several steps, cost 17% of workload W's
        throughput (32 clients, 32-token prompts; 2-core Xeon) for no gain a stream would notice. With
        nothing decoding (`chunk` unlimited) it goes on until every waiting prompt is done.
        """
        completed = 0
        unlimited = chunk == sys.maxsize
        while self.filling:
            item = self.filling[0]
            seq = item.seq if isinstance(item, PromptFill) else item
            if seq.cancelled:  # a prompt cancelled half-way: its partial cache goes with it
                self.filling.popleft()
                seq.abort("cancelled")
                continue
            if isinstance(item, PromptFill):
                completed += self._advance(item, chunk)
            elif self.scores_prompts and item.params.prompt_logprobs is not None:
                # Scored prompts keep the logits of every position: each is computed whole and alone, so that
                # only it pays for the output layer over its whole prompt.
                self.filling.popleft()
                item.started = time.perf_counter()
                self._prefill([item], score=True)
                completed += 1
            else:
                cached = None
                if self.prefix_cache is not None:
                    cached = self.prefix_cache.lookup(item.prompt_ids, self.chunks.worth_reusing())
                item.started = time.perf_counter()
                if cached is not None or len(item.prompt_ids) > max(chunk, SHORT_PROMPT):
                    self._begin(item, cached)
                    continue
                group = [self.filling.popleft()]
                used = len(item.prompt_ids)
                whole = max(chunk, SHORT_PROMPT)
                while self.filling and self._joins_group(self.filling[0], min(whole, cap - used)):
                    seq = self.filling.popleft()
                    seq.started = time.perf_counter()
                    group.append(seq)
                    used += len(seq.prompt_ids)
                self._prefill(group, score=False)
                completed += len(group)
            if not unlimited:
                break
        return completed

    def _begin(self, seq: Sequence, cached: Any) -> PromptFill:
        """Make the waiting prompt at the head one computed on its own, chunk by chunk, from its cached
        beginning if it has one."""
        seq.cached_tokens = cached.tokens if cached is not None else 0
        fill = PromptFill(
            seq,
            self.batch_class.start(
                seq,
                seq.prompt_ids,
                self.vocab_size,
                seq.params.penalize_prompt,
                cached,
                staggered=decodes_with_segments(self.model),
                stored=cache_dtype(self.model),
            ),
        )
        self.filling[0] = fill
        return fill

    def _as_fill(self, item: Sequence | PromptFill) -> PromptFill | None:
        """The long prompt at the head as a prompt in progress (begun now if it was waiting); None when it was
        cancelled (`_fill` drops it)."""
        seq = item.seq if isinstance(item, PromptFill) else item
        if seq.cancelled:
            return None
        if isinstance(item, PromptFill):
            return item
        cached = None
        if self.prefix_cache is not None:
            cached = self.prefix_cache.lookup(item.prompt_ids, self.chunks.worth_reusing())
        item.started = time.perf_counter()
        return self._begin(item, cached)

    def _mixes(self, batch: DecodeBatch) -> bool:
        """Whether a chunk of a long prompt shares the decoding step's forward pass: the pass then reads the
        weights once for both (separately, a chunk's pass costs about a decoding step by itself: 16 rows and
        1000-token prompt, GPT-2 int8, 2-core Xeon: gaps of 90 ms between a stream's tokens, 37 ms normally).
        The rows do not speculate meanwhile: a verification would need a pass of its own."""
        return self.chunks_prompts and decodes_with_segments(self.model)

    def _mixed_step(self, batch: DecodeBatch, fill: PromptFill) -> int:
        """A decoding step that also computes the next chunk of `fill`, in one forward pass. A failure undoes
        both, then does them apart, each with its own fault isolation."""
        seq = fill.seq
        n = min(self.chunks.shared_budget(len(batch), fill), fill.remaining)
        ids = seq.prompt_ids[fill.done : fill.done + n]
        checkpoints = batch.checkpoint(), fill.batch.checkpoint()
        states = _rng_states(batch.rows + [seq])
        started = time.perf_counter()
        try:
            logits, chunk_logits = batch.forward(self.model, batch.next_tokens, (fill.batch, ids))
            batch.next_tokens = None
            self._check_faults(batch.rows + [seq])
            tokens, scores = _choose(batch, logits[:, -1, :])
        except Exception as exc:
            self.on_error(None, exc)
            batch.rollback(checkpoints[0])
            fill.batch.rollback(checkpoints[1])
            _set_rng_states(batch.rows + [seq], states)
            completed = self._advance(fill, n)
            stepped = self.last_tokens = len(self.batch) if self.batch is not None else 0
            if self.batch is not None:
                self.batch = self._decode(self.batch)  # sets last_tokens higher when it speculates
            self.last_tokens += completed
            return stepped + completed
        # What the chunk added to the step: the next chunk is sized from it.
        fill.shared(n, max(time.perf_counter() - started - (self.chunks.step_seconds or 0.0), 1e-4))
        self._remember_chunks(fill)
        stepped = len(batch)
        self.batch = batch if self._accept(batch, tokens, scores) else None
        completed = self._complete(fill, chunk_logits, states[-1:]) if not fill.remaining else 0
        self.last_tokens = stepped + completed
        return stepped + completed

    def _joins_group(self, item: Sequence | PromptFill, room: int) -> bool:
        """Whether a waiting prompt can be computed whole in the same pass as the ones before it."""
        if not isinstance(item, Sequence) or item.cancelled or len(item.prompt_ids) > room:
            return False
        if self.scores_prompts and item.params.prompt_logprobs is not None:
            return False
        if self.prefix_cache is None:
            return True
        return self.prefix_cache.cached_tokens(item.prompt_ids) < self.chunks.worth_reusing()

    def _advance(self, fill: PromptFill, chunk: int) -> int:
        """Compute the next `chunk` tokens of a prompt; returns 1 if that completed it and it took its first
        token, else 0. A failure fails its sequence alone."""
        seq = fill.seq
        n = min(chunk, fill.remaining)
        states = _rng_states([seq])
        started = time.perf_counter()
        try:
            logits = fill.batch.extend(self.model, seq.prompt_ids[fill.done : fill.done + n])
            self._check_faults([seq])
        except Exception as exc:
            self.filling.popleft()
            self._fail(seq, exc)
            return 0
        fill.last = (n, time.perf_counter() - started)
        self.chunks.prefilled(*fill.last)
        self._remember_chunks(fill)
        return 0 if fill.remaining else self._complete(fill, logits, states)

    def _complete(self, fill: PromptFill, logits: torch.Tensor, states: list[torch.Tensor]) -> int:
        """A prompt computed to its end (`logits` after its last token): it takes its first token and joins
        the batch. Returns 1 (0 if its sampling failed: it alone fails). `states`: its generator's state
        before, to restore on failure."""
        seq = fill.seq
        self.filling.popleft()
        self._remember_prompts(fill.batch)
        try:
            tokens, scores = _choose(fill.batch, logits)
        except Exception as exc:
            _set_rng_states([seq], states)
            self._fail(seq, exc)
            return 0
        if self._accept(fill.batch, tokens, scores):
            self._join(fill.batch)
        return 1

    def _decode(self, batch: DecodeBatch) -> DecodeBatch | None:
        """One token for every row (or several, when it speculates); returns the batch that goes on (None
        when no row is left)."""
        if self.speculator is not None:
            drafts = self.speculator.propose(batch)
            if drafts is not None:
                appended = self.speculator.decode(self, batch, drafts)
                if appended is not None:
                    self.last_tokens = appended
                    batch.filter([i for i, s in enumerate(batch.rows) if s.finish_reason is None])
                    return batch if len(batch) else None
        checkpoint, states = batch.checkpoint(), _rng_states(batch.rows)
        try:
            logits = batch.step(self.model)
            self._check_faults(batch.rows)
            tokens, scores = _choose(batch, logits)
        except Exception as exc:
            failure = exc
        else:
            return batch if self._accept(batch, tokens, scores) else None
        # Outside the except block, so that a row's own failure is not logged chained to the batch's.
        if len(batch) == 1:
            self._fail(batch.rows[0], failure)
            return None
        self.on_error(None, failure)
        # Undo the step (the cache may hold half of it, the samplers may have drawn), retry rows alone.
        batch.rollback(checkpoint)
        _set_rng_states(batch.rows, states)
        parts = [self._decode(batch.take([i])) for i in range(len(batch))]
        return _join([part for part in parts if part is not None], decodes_with_segments(self.model))

    def _prefill(self, group: list[Sequence], score: bool) -> None:
        """Compute whole prompts in one pass (left-padded together), and give each its first token."""
        states = _rng_states(group)
        started = time.perf_counter()
        try:
            fresh, logits = self.batch_class.prefill(
                self.model,
                group,
                [s.prompt_ids for s in group],
                self.vocab_size,
                count_prompt=[s.params.penalize_prompt for s in group],
                all_logits=score,
            )
            self._check_faults(group)
            self.chunks.prefilled(fresh.width * len(group), time.perf_counter() - started, len(group))
            self._remember_prompts(fresh)
            if score:
                (seq,) = group
                seq.prompt_logprobs = prompt_logprobs(
                    logits[0], seq.prompt_ids, seq.params.prompt_logprobs or 0
                )
                logits = logits[:, -1, :]
            tokens, scores = _choose(fresh, logits)
        except Exception as exc:
            failure = exc
        else:
            if self._accept(fresh, tokens, scores):
                self._join(fresh)
            return
        if len(group) == 1:
            self._fail(group[0], failure)
            return
        self.on_error(None, failure)
        _set_rng_states(group, states)
        for seq in group:  # nothing of the failed prefill is kept: each prompt is prefilled alone
            self._prefill([seq], score)

    def _remember_prompts(self, fresh: DecodeBatch) -> None:
        """Offer the KV of freshly computed prompts to the prefix cache (before any row leaves the batch).

        Not a prompt too short for any of its beginning to be reused (a hit must cover `worth_reusing`
        tokens and never the last one): it would only take memory. Workload W's 32-token prompts filled
        the cache (256 MB then) with blocks no request could use."""
        if self.prefix_cache is None:
            return
        shortest = self.chunks.worth_reusing() + 1
        for i, seq in enumerate(fresh.rows):
            if len(seq.prompt_ids) >= shortest:
                self._remember(fresh, i, len(seq.prompt_ids))

    def _remember_chunks(self, fill: PromptFill) -> None:
        """Offer the blocks a prompt's chunks have computed so far to the prefix cache, as they come, not all
        when the prompt ends: keeping a 1000-token prompt's 62 blocks (37 MB, GPT-2 bfloat16) in the step
        that completed it made that step 60-84 ms against ~40 for the other chunks' (2-core Xeon; 16 streams
        decoding), and a prompt sharing its beginning can start from the blocks already done."""
        if self.prefix_cache is not None and fill.remaining:
            self._remember(fill.batch, 0, fill.done)

    def _remember(self, batch: DecodeBatch, row: int, tokens: int) -> None:
        """Offer row `row`'s first `tokens` prompt positions to the prefix cache (it keeps the full blocks it
        does not hold yet)."""
        assert self.prefix_cache is not None
        keys, values = batch.row_kv(row, tokens)
        self.prefix_cache.insert(batch.rows[row].prompt_ids[:tokens], keys, values)

    def _join(self, fresh: DecodeBatch) -> None:
        if self.batch is None:
            self.batch = fresh
        else:
            self.batch.concatenate(fresh, segmented=decodes_with_segments(self.model))

    def _accept(self, batch: DecodeBatch, tokens: torch.Tensor, scores: list[TokenLogprob | None]) -> bool:
        """Hand each row its token, drop finished rows; False when none is left."""
        batch.record(tokens)
        seqs = batch.rows
        for seq, token, score in zip(seqs, tokens.tolist(), scores):
            try:
                seq.append(token, score)
            except Exception as exc:  # the sequence's own bookkeeping (text, stop strings): it alone fails
                self._fail(seq, exc)
        batch.filter([i for i, s in enumerate(seqs) if s.finish_reason is None])
        return len(batch) > 0

    def _check_faults(self, rows: list[Sequence]) -> None:
        if self.faults is not None:
            self.faults.check(rows)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        """The sequence's own step failed: it finishes with "error" (a 500 or an error event)."""
        self.on_error(seq, exc)
        try:
            seq.abort("error", f"{type(exc).__name__}: {exc} (request {seq.request_id})")
        except Exception:  # its consumer's side failed too: at least let it leave the batch
            log.exception("request %s: could not report its failure", seq.request_id)
            seq.finish_reason = "error"


def _choose(batch: DecodeBatch, logits: torch.Tensor) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
    """Sample a token for every row. Nothing changes but the rows' random generators (which the runner
    saves): a step that fails up to here can be retried."""
    seqs: list[Sequence] = batch.rows
    for seq in seqs:
        seq.max_batch_size = max(seq.max_batch_size, len(seqs))
    params = [s.params for s in seqs]
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw = logits[wanted] if wanted else None  # a copy: the penalties below change logits in place
    allowed = allowed_tokens([s.guide for s in seqs], logits.shape[1])  # structured output; None: free
    restrict(allowed, [s.allowed_mask(logits.shape[1]) for s in seqs])  # allowed_token_ids
    force_tokens(allowed, [s.thought for s in seqs], logits.shape[1])  # a thought over its budget closes
    banned = lift_dead_bans([s.banned_tokens() for s in seqs], allowed)
    counts = [s.token_counts() for s in seqs]  # None for rows without presence/frequency penalties
    logits = apply_penalties(logits, params, batch.seen, banned, counts, end_tokens_of(seqs))
    apply_masks(logits, allowed)
    tokens = sample(logits, params, [s.rng for s in seqs])
    scores: list[TokenLogprob | None] = [None] * len(seqs)
    if raw is not None:
        top = [params[i].logprobs or 0 for i in wanted]
        for i, score in zip(wanted, sampled_logprobs(raw, tokens[wanted], top)):
            scores[i] = score
    return tokens, scores


def _rng_states(seqs: list[Sequence]) -> list[torch.Tensor]:
    return [s.rng.get_state() for s in seqs]  # about 1 µs a row


def _set_rng_states(seqs: list[Sequence], states: list[torch.Tensor]) -> None:
    for seq, state in zip(seqs, states):
        seq.rng.set_state(state)


def _join(parts: list[DecodeBatch], segmented: bool) -> DecodeBatch | None:
    if not parts:
        return None
    joined = parts[0]
    for part in parts[1:]:
        joined.concatenate(part, segmented)
    return joined


def _drop_cancelled(batch: DecodeBatch) -> None:
    keep = []
    for i, seq in enumerate(batch.rows):
        if seq.cancelled:
            seq.abort("cancelled")
        else:
            keep.append(i)
    batch.filter(keep)
