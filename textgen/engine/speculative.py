"""Speculative decoding: draft a few tokens cheaply, check them all in one forward pass of the model.

At small batch a CPU decoding step is bound by reading the weights (GPT-2 124M: ~500 MB of float32 per
step), so a forward pass over [last token, d1..dk] costs little more than one over the last token alone, and
every accepted draft token is a step saved.

Drafts come from prompt lookup (transformers' `prompt_lookup_num_tokens`, vLLM's n-gram proposer): find the
row's last n tokens (n = 3, 2, 1) earlier in its prompt and output, and propose the k tokens that followed
them. It costs no model at all and wins where the answer copies the prompt (extraction, summaries, code
edits) or the output loops. A request's prediction (OpenAI's Predicted Outputs: the text being edited) is
looked up the same way, between the prompt and the output.

Verification keeps the output exactly what decoding without it gives:
- every position gets the row's full processing (logit_bias, repetition, presence and frequency penalties,
  no_repeat_ngram bans, min_tokens) as if the drafts before it had been generated, then
- greedy rows accept drafts while they equal the argmax, then take the model's own token: the same tokens
  as plain greedy decoding (up to float rounding of a k+1-token forward against a 1-token one);
- sampled rows use speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023). The draft is a
  point mass q(d) = 1, so d is accepted with probability p(d) and, on rejection, the token is drawn from
  p with d removed, renormalised, where p is the row's full sampling distribution (temperature, min-p,
  top-k, top-p). Every emitted token is then distributed exactly as in plain sampling, drawn with the row's
  own random generator (a seeded request alone reproduces its text; it is not the same text as without
  speculation, which draws differently).

Rows of one batch are verified in one forward pass with the same number of drafts; all rows then keep the
same number of tokens L (the fewest any row produced), so the left-padded cache stays rectangular: a row
that accepted more keeps a prefix of its accepted tokens, which is still a correct sample. With more rows
the shortest acceptance rules and the k+1-wide forward costs more: bench/results/*-speculative.md measures
where that stops paying, and `max_batch` (TEXTGEN_SPEC_MAX_BATCH) is set from it.

Drafts can also come from a small draft model sharing the tokenizer (TEXTGEN_DRAFT_MODEL, mode "draft"):
it runs k greedy steps with a KV cache of its own per sequence, cropped back to the tokens the target kept.
Its drafts are point masses too, so the same verification applies.

Rows that ask for logprobs or structured output are not speculated (a step without drafts is an ordinary
step).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from textgen.engine.batch import DecodeBatch
from textgen.engine.params import SamplingParams
from textgen.engine.sampling import (
    MIN_DIVISOR,
    _apply_min_p,
    _inverse_cdf,
    _nucleus_threshold,
    apply_penalties,
)
from textgen.engine.sequence import Sequence, bad_word_bans, end_tokens_of

if TYPE_CHECKING:
    from textgen.engine.causal import CausalRunner

log = logging.getLogger(__name__)

MODES = ("off", "ngram", "draft")
MAX_NGRAM = 3  # longest n-gram looked up; a longer match is no likelier to continue the same way
MIN_NGRAM = 1

# Told after every speculative step: draft tokens proposed, draft tokens kept.
SpeculationHook = Callable[[int, int], None]


def ngram_draft(ids: list[int], k: int, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens of `ids`.

    Longest n first (3, then 2, then 1): a longer match is better evidence. The most recent occurrence,
    not the first: a loop or the passage being copied is usually the nearest one.
    """
    total = len(ids)
    if k <= 0 or total < 2:
        return []
    t = torch.tensor(ids, dtype=torch.long)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        key = t[total - n :]
        # Windows that start before the last n tokens themselves and are followed by at least one token.
        windows = t[: total - 1].unfold(0, n, 1)  # [total - n, n]
        hits = (windows == key).all(1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n
            return ids[start : start + k]
    return []


class Speculator:
    """Decides when to speculate, proposes drafts and runs the verification step for a CausalRunner."""

    def __init__(
        self,
        mode: str = "ngram",
        num_tokens: int = 5,
        max_batch: int = 1,
        on_speculation: SpeculationHook | None = None,
        draft_model: Any = None,
        backoff: bool = True,
    ) -> None:
        """`mode`: the server's default for requests that do not say (SamplingParams.speculative None):
        "off", "ngram" or "draft" (needs `draft_model`). `num_tokens`: most drafts per step. `max_batch`:
        speculate only while the running batch has at most this many rows (beyond it the plain batched step
        is faster, see the module doc). `backoff`: a sequence whose drafts keep failing is speculated less
        often (see `_record`). A request that asks for speculation while the server's mode is off
        gets the draft model if there is one, else prompt lookup."""
        if mode not in MODES:
            raise ValueError(f"speculative mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "draft" and draft_model is None:
            raise ValueError('speculative mode "draft" needs a draft model (TEXTGEN_DRAFT_MODEL)')
        self.default_on = mode != "off"
        # "ngram" keeps prompt lookup even when a draft model is configured.
        use_draft = draft_model is not None and mode != "ngram"
        self.drafter: DraftModel | None = DraftModel(draft_model) if use_draft else None
        self.backoff = backoff
        # Per sequence: (consecutive verifications that accepted nothing, output length before which it
        # takes ordinary steps). See `_record`.
        self._misses: weakref.WeakKeyDictionary[Sequence, tuple[int, int]] = weakref.WeakKeyDictionary()
        self.num_tokens = num_tokens
        self.max_batch = max_batch
        self.on_speculation: SpeculationHook = on_speculation or (lambda drafted, accepted: None)

    def wants(self, params: SamplingParams) -> bool:
        """Whether this request is speculated. The server's default covers greedy requests only: their
        output does not change. A sampled request speculates only when it asks: its text is then drawn
        differently (same distribution), so a seed no longer gives the text it gives without
        speculation, nor, in a speculating batch, the same text whatever it is batched with."""
        if params.logprobs is not None or params.constraint is not None or params.allowed_token_ids:
            # Structured output advances its grammar token by token and masks each step by it (as
            # allowed_token_ids masks it): drafts would need a mask per verified position. Not done: such
            # rows take ordinary steps.
            return False
        if params.thinking is not None and params.thinking.budget is not None:
            return False  # its thought may have to be closed by force (textgen/engine/thinking.py)
        if params.speculative is not None:
            return params.speculative
        return bool(params.prediction) or (self.default_on and params.greedy)

    def propose(self, batch: DecodeBatch) -> list[list[int]] | None:
        """One draft per row, all of the same length, or None: take an ordinary step."""
        if len(batch) > self.max_batch or batch.next_tokens is None:
            return None
        drafts = []
        for seq in batch.rows:
            if not self.wants(seq.params):
                return None
            if self.backoff and len(seq.output_ids) < self._misses.get(seq, (0, 0))[1]:
                return None
            # k + 1 tokens come out of a verification: never more than the row may still generate.
            room = min(self.num_tokens, seq.max_new_tokens - len(seq.output_ids) - 1)
            if room <= 0:
                return None
            try:
                draft = self._draft(seq, room)
            except Exception as exc:  # drafting is optional: never let it fail a request
                log.warning("drafting failed (%s); taking an ordinary step", type(exc).__name__)
                if self.drafter:
                    self.drafter.forget(seq)
                return None
            if not draft:
                return None
            drafts.append(draft)
        k = min(len(d) for d in drafts)
        return [d[:k] for d in drafts]

    def _draft(self, seq: Sequence, room: int) -> list[int]:
        """Up to `room` draft tokens: looked up in the prompt, the request's prediction (before the draft
        model: a prediction is the text being edited) and the output so far, or the draft model's."""
        if seq.params.prediction:
            return ngram_draft([*seq.context_ids, *seq.params.prediction, *seq.output_ids], room)
        return self.drafter.draft(seq, room) if self.drafter else ngram_draft(seq.all_ids, room)

    def _record(self, seq: Sequence, accepted: int) -> None:
        """Back off from a sequence whose drafts fail: after n verifications in a row that accepted nothing,
        it takes 2^(n-1) - 1 ordinary steps (at most 31) before the next; one accepted draft resets it.
        A single miss costs nothing: copying a passage misses once at every span boundary, then hits again
        (a first version skipped 2 steps after one miss: 1 client grounded fell from 1.98x to 1.62x).

        A rejected verification costs a (k+1)-token forward for one token: the worst case (bench
        "shuffled": a draft at every step, always wrong) ran at 0.64x of plain speed without backoff
        (k=5, 1 client, float32: bench/results/2026-12-03-speculative-float32-b.md)."""
        if accepted:
            self._misses.pop(seq, None)
            return
        misses = self._misses.get(seq, (0, 0))[0] + 1
        self._misses[seq] = (misses, len(seq.output_ids) + 1 + min(2 ** (misses - 1) - 1, 31))

    def decode(self, runner: "CausalRunner", batch: DecodeBatch, drafts: list[list[int]]) -> int | None:
        """Verify `drafts` and hand each row its tokens; returns the tokens appended (None: the step failed
        before any row changed and was undone; the caller takes an ordinary step, with its own fault
        isolation)."""
        checkpoint = batch.checkpoint()
        states = [s.rng.get_state() for s in batch.rows]
        try:
            logits = verify_forward(runner.model, batch, drafts)
            runner._check_faults(batch.rows)
            produced = choose(batch, logits, drafts)
        except Exception as exc:
            log.warning("a speculative step failed (%s); taking an ordinary step", type(exc).__name__)
            batch.rollback(checkpoint)
            for seq, state in zip(batch.rows, states):
                seq.rng.set_state(state)
            return None
        keep = min(len(p) for p in produced)
        commit(batch, len(drafts[0]) + 1, [p[:keep] for p in produced])
        kept = [_kept_drafts(p, keep) for p in produced]
        self.on_speculation(sum(len(d) for d in drafts), sum(kept))
        for seq, tokens, draft, accepted in zip(batch.rows, produced, drafts, kept):
            self._record(seq, accepted=len(tokens) - 1)
            # Counted before the tokens are appended: the last one appended reports the sequence's usage.
            seq.drafted_tokens += len(draft)
            seq.accepted_draft_tokens += accepted
        appended = 0
        for seq, tokens in zip(batch.rows, produced):
            for token in tokens[:keep]:
                try:
                    seq.append(token)
                except Exception as exc:  # its own bookkeeping (text, stop strings): it alone fails
                    runner._fail(seq, exc)
                appended += 1
                if seq.finish_reason is not None:  # EOS, max_new_tokens, a stop string: exactly here
                    break
        return appended


def load_draft_model(path: str, target: Any, context_length: int) -> Any:
    """The draft model at `path` (a Hugging Face directory or id), checked against the target: the same
    vocabulary (its tokens are the target's) and at least the target's context. It computes in the target's
    format (bfloat16 where `auto` chose it: a draft in float32 would read twice the bytes per token; for an
    int8 target its dense compute format)."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(target, "dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    vocab = int(target.config.get_text_config().vocab_size)
    theirs = int(model.config.get_text_config().vocab_size)
    if theirs != vocab:
        raise ValueError(f"draft model {path}: vocabulary of {theirs} tokens, the model's has {vocab}")
    positions = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", 0
    )
    if positions and positions < context_length:
        raise ValueError(
            f"draft model {path}: context of {positions} tokens, the model's is {context_length}"
        )
    return model


class DraftModel:
    """Greedy drafts from a small model with the target's vocabulary, one KV cache per sequence.

    Each sequence's cache covers the tokens it was last fed; the next call keeps the longest prefix still
    valid (the tokens the target accepted) and feeds only the rest.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._states: weakref.WeakKeyDictionary[Sequence, tuple[Any, list[int]]] = weakref.WeakKeyDictionary()

    def forget(self, seq: Sequence) -> None:
        self._states.pop(seq, None)

    def draft(self, seq: Sequence, k: int) -> list[int]:
        from transformers import DynamicCache

        ids = seq.all_ids
        cache, covered = self._states.get(seq, (None, []))
        if cache is None:
            cache = DynamicCache()
        same = 0
        for a, b in zip(covered, ids):
            if a != b:
                break
            same += 1
        same = min(same, len(ids) - 1)  # at least the newest token is fed: its logits give the first draft
        if same < cache.get_seq_length():
            cache.crop(same - cache.get_seq_length())  # a negative count: tokens to drop
        feed = ids[same:]
        tokens: list[int] = []
        for _ in range(k):
            start = len(ids) + len(tokens) - 1 if tokens else same
            out = self.model(
                input_ids=torch.tensor([feed]),
                position_ids=torch.arange(start, start + len(feed))[None, :],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            feed = [token]
        self._states[seq] = (cache, ids + tokens[:-1])  # the last draft was never fed
        return tokens


def _kept_drafts(produced: list[int], keep: int) -> int:
    """Draft tokens among the `keep` tokens a row keeps: all of its produced tokens but the last are
    accepted drafts (the last is the model's own: a correction, or the bonus after k acceptances)."""
    return min(len(produced) - 1, keep)


def verify_forward(model: Any, batch: DecodeBatch, drafts: list[list[int]]) -> torch.Tensor:
    """Feed every row [its newest token, its drafts] in one pass; return logits [B, k+1, V] (float32).

    The caches and masks grow by k+1 positions; `commit` cuts them back to what was accepted.
    """
    assert batch.next_tokens is not None
    k = len(drafts[0])
    inputs = torch.cat([batch.next_tokens, torch.tensor(drafts, dtype=torch.long).view(len(drafts), k)], 1)
    logits, _ = batch.forward(model, inputs)
    batch.next_tokens = None
    return logits


def commit(batch: DecodeBatch, fed: int, kept: list[list[int]]) -> None:
    """After a verification of `fed` positions per row, keep the cache of each row's newest token and the
    first L-1 of its `kept` tokens; the L-th is the next step's input."""
    batch.cut(fed - len(kept[0]))
    tokens = torch.tensor(kept, dtype=torch.long)
    batch.seen.scatter_(1, tokens.clamp(max=batch.seen.shape[1] - 1), True)
    batch.next_tokens = tokens[:, -1:].clone()


def choose(batch: DecodeBatch, logits: torch.Tensor, drafts: list[list[int]]) -> list[list[int]]:
    """The tokens each row produces from the verification logits [B, k+1, V]: its accepted drafts, then one
    token of the model's own (the correction, or the bonus token after k accepted drafts)."""
    rows, width, vocab = logits.shape
    seqs: list[Sequence] = batch.rows
    for seq in seqs:
        seq.max_batch_size = max(seq.max_batch_size, len(seqs))
    flat_params: list[SamplingParams] = []
    banned: list[set[int]] = []
    counts: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    seen = batch.seen.repeat_interleave(width, 0)  # [B*(k+1), V]: position j has seen the drafts before it
    for r, (seq, draft) in enumerate(zip(seqs, drafts)):
        for j in range(width):
            flat_params.append(seq.params)
            banned.append(banned_after(seq, draft[:j]))
            counts.append(counts_after(seq, draft[:j]))
            if j:
                seen[r * width + j, torch.tensor(draft[:j]).clamp(max=seen.shape[1] - 1)] = True
    flat = logits.reshape(rows * width, vocab)
    processed = apply_penalties(flat, flat_params, seen, banned, counts, end_tokens_of(seqs))
    processed = processed.view(rows, width, vocab)
    out = []
    for r, (seq, draft) in enumerate(zip(seqs, drafts)):
        if seq.params.greedy:
            out.append(_accept_greedy(processed[r].argmax(-1).tolist(), draft))
        else:
            out.append(_accept_sampled(distribution(processed[r], seq.params), draft, seq.rng))
    return out


def _accept_greedy(targets: list[int], draft: list[int]) -> list[int]:
    tokens = []
    for d, t in zip(draft, targets):
        tokens.append(t)
        if t != d:
            return tokens
    tokens.append(targets[len(draft)])
    return tokens


def _accept_sampled(probs: torch.Tensor, draft: list[int], rng: torch.Generator) -> list[int]:
    """Rejection sampling against a point-mass draft: accept d with probability p(d), else draw from
    p without d (renormalised); after k acceptances, draw the bonus token from the next position's p."""
    tokens = []
    for j, d in enumerate(draft):
        u = torch.rand((), generator=rng, dtype=torch.float64)
        if float(u) < float(probs[j, d]):
            tokens.append(d)
            continue
        residual = probs[j].clone()
        residual[d] = 0.0
        tokens.append(_draw(residual, rng))
        return tokens
    tokens.append(_draw(probs[len(draft)], rng))
    return tokens


def _draw(weights: torch.Tensor, rng: torch.Generator) -> int:
    uniform = torch.rand((1,), generator=rng, dtype=weights.dtype)
    return int(_inverse_cdf(weights[None, :], uniform)[0])


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities sampling.sample draws from for rows of processed logits [n, V] with these
    (non-greedy) params: temperature, min-p, top-k (renormalised), then top-p; rows sum to 1."""
    scaled = logits / max(params.temperature, MIN_DIVISOR)
    _apply_min_p(scaled, [params.min_p] * len(scaled))
    top_p = torch.full((len(scaled),), params.top_p, dtype=scaled.dtype)
    probs = torch.softmax(scaled, -1)
    if params.top_k > 0:
        k = min(probs.shape[1], params.top_k)
        cand_p, cand_ids = probs.topk(k, dim=-1)
        before = (cand_p.cumsum(-1) - cand_p) / cand_p.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter_(1, cand_ids, cand_p * (before < top_p[:, None]))
    else:
        threshold = _nucleus_threshold(scaled, probs, top_p)
        if params.top_p >= 1.0:
            threshold.zero_()
        weights = probs * (probs >= threshold[:, None])
    return weights / weights.sum(-1, keepdim=True)


def banned_after(seq: Sequence, extra: list[int]) -> set[int]:
    """What Sequence.banned_tokens would return after `extra` were appended (nothing is changed)."""
    if not extra:
        return seq.banned_tokens()
    params = seq.params
    banned: set[int] = set()
    n = params.no_repeat_ngram_size
    ids = seq.all_ids + extra
    if n == 1:
        banned = set(ids)
    elif n > 1 and len(ids) >= n - 1:
        key = tuple(ids[len(ids) - n + 1 :])
        banned = set(seq._ngrams.get(key, ()))
        # The n-grams the extra tokens complete, as Sequence.append would have recorded them.
        for end in range(len(seq.all_ids), len(ids)):
            if end >= n - 1 and tuple(ids[end - n + 1 : end]) == key:
                banned.add(ids[end])
    if params.bad_words_ids:
        banned |= bad_word_bans(params.bad_words_ids, seq.output_ids + extra)
    return banned | seq.early_ends(len(seq.output_ids) + len(extra))


def counts_after(seq: Sequence, extra: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What Sequence.token_counts would return after `extra` were appended (nothing is changed)."""
    counts = seq.token_counts()
    if counts is None or not extra:
        return counts
    merged: dict[int, float] = dict(zip(counts[0].tolist(), counts[1].tolist()))
    for token in extra:
        merged[token] = merged.get(token, 0.0) + 1.0
    return torch.tensor(list(merged), dtype=torch.long), torch.tensor(list(merged.values()))
