"""Decoder-only models: the running batch advanced one token per step (iteration-level batching)."""

from __future__ import annotations

import time
from typing import Any

import torch

from textgen.engine.batch import DecodeBatch
from textgen.engine.sampling import apply_penalties, sample
from textgen.engine.sequence import Sequence


class CausalRunner:
    """Owns the running DecodeBatch: newcomers are prefilled and joined, finished rows leave."""

    def __init__(self, model: Any, vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.batch: DecodeBatch | None = None

    @property
    def rows(self) -> list[Sequence]:
        return self.batch.rows if self.batch is not None else []

    def reset(self) -> None:
        self.batch = None

    def step(self, new: list[Sequence]) -> int:
        """One iteration: prefill newcomers, or advance the running batch by one token.

        Returns how many sequences got a token (0 when nothing ran).
        """
        batch = self.batch
        if batch is not None:
            _drop_cancelled(batch)
            if len(batch) == 0:
                batch = self.batch = None
        if new:
            now = time.perf_counter()
            for seq in new:
                seq.started = now
            fresh, logits = DecodeBatch.prefill(
                self.model,
                new,
                [s.prompt_ids for s in new],
                self.vocab_size,
                count_prompt=[s.params.penalize_prompt for s in new],
            )
            stepped = len(fresh)
            if _advance(fresh, logits):
                if batch is None:
                    self.batch = fresh
                else:
                    batch.concatenate(fresh)
            return stepped
        if batch is None:
            return 0
        logits = batch.step(self.model)
        stepped = len(batch)
        if not _advance(batch, logits):
            self.batch = None
        return stepped


def _advance(batch: DecodeBatch, logits: torch.Tensor) -> bool:
    """Sample a token for every row, hand it to its sequence, drop finished rows."""
    seqs: list[Sequence] = batch.rows
    for seq in seqs:
        seq.max_batch_size = max(seq.max_batch_size, len(seqs))
    params = [s.params for s in seqs]
    logits = apply_penalties(logits, params, batch.seen, [s.banned_tokens() for s in seqs])
    tokens = sample(logits, params, [s.rng for s in seqs])
    batch.record(tokens)
    for seq, token in zip(seqs, tokens.tolist()):
        seq.append(token)
    batch.filter([i for i, s in enumerate(seqs) if s.finish_reason is None])
    return len(batch) > 0


def _drop_cancelled(batch: DecodeBatch) -> None:
    keep = []
    for i, seq in enumerate(batch.rows):
        if seq.cancelled:
            seq.abort("cancelled")
        else:
            keep.append(i)
    batch.filter(keep)
