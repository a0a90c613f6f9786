"""Encoder-decoder models (T5 and kin): the causal runner's running batch, with an encoder side.

Each request's prompt goes through the encoder once, when it joins (newcomers of one step are encoded
together, right-padded under an encoder mask). From then on its row is one of the decoder batch: every step
runs the decoder once for all rows, with a self-attention cache (left-padded, like the causal batch, so
that every row's newest token sits in the last column) and a cross-attention cache (the encoder's keys and
values, computed at the row's first step and right-padded to the widest prompt of the batch). Tokens are
chosen by the causal runner's own code (penalties, banned tokens, per-row random generators, logprobs) and
streamed as they come; rows leave when they finish, and a failing step is undone and retried row by row.

Padding changes nothing a row computes: T5's position information is a bias on the distance between query
and key, which left padding of the decoder leaves as it is (padded keys are masked), and cross-attention
has no position bias at all. Decoders with absolute positions (BART and kin) would read a joining row's
positions off the batch's width instead: for them, newcomers wait until the running batch is empty.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import EncoderDecoderCache

from textgen.engine.batch import DecodeBatch
from textgen.engine.kv_cache import Segment, new_cache
from textgen.engine.causal import CausalRunner, ErrorHook
from textgen.engine.faults import FaultInjector
from textgen.engine.sequence import Sequence

# Decoders whose positions are relative (a bias on query-key distances): a row's padding shifts nothing.
RELATIVE_POSITION_MODELS = frozenset({"t5", "mt5", "umt5", "longt5", "switch_transformers"})


def decoder_start_token(model: Any) -> int:
    for source in (getattr(model, "generation_config", None), model.config):
        start = getattr(source, "decoder_start_token_id", None)
        if start is not None:
            return int(start)
    raise ValueError(f"{type(model).__name__} names no decoder_start_token_id")


class Seq2SeqBatch(DecodeBatch):
    """A DecodeBatch whose cache is an EncoderDecoderCache, plus each row's encoder mask."""

    def __init__(
        self,
        rows: list[Any],
        cache: Any,
        attention_mask: torch.Tensor,
        seen: torch.Tensor,
        encoder_mask: torch.Tensor,
        encoder_like: torch.Tensor,
    ) -> None:
        super().__init__(rows, [Segment(cache, attention_mask)], seen)
        self.encoder_mask = encoder_mask  # [B, S] 1 = prompt token, 0 = right padding
        self.encoder_like = encoder_like  # [1, 1, hidden]: the encoder output's dtype and width

    @classmethod
    def prefill(
        cls,
        model: Any,
        rows: list[Any],
        prompts: list[list[int]],
        vocab_size: int,
        count_prompt: list[bool] | None = None,
        all_logits: bool = False,
    ) -> tuple["Seq2SeqBatch", torch.Tensor]:
        """Encode the prompts of new sequences and run the decoder's first step (its start token), which
        fills the cross-attention cache; return their batch and next-token logits [B, V].

        `count_prompt[i]` False: the start token does not count as seen (repetition penalty).
        """
        if all_logits:
            raise ValueError("an encoder-decoder does not score its prompt")
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        encoder_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            encoder_mask[i, : len(p)] = 1
        encoded = model.get_encoder()(input_ids=input_ids, attention_mask=encoder_mask).last_hidden_state
        start = torch.full((len(prompts), 1), decoder_start_token(model), dtype=torch.long)
        mask = torch.ones(len(prompts), 1, dtype=torch.long)
        out = model(
            encoder_outputs=(encoded,),
            attention_mask=encoder_mask,
            decoder_input_ids=start,
            decoder_attention_mask=mask,
            past_key_values=EncoderDecoderCache(new_cache(), new_cache()),
            use_cache=True,
        )
        seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool)
        counted = torch.ones(len(prompts), 1, dtype=torch.bool)
        if count_prompt is not None:
            counted &= torch.tensor(count_prompt)[:, None]
        seen.scatter_(1, start.clamp(max=vocab_size - 1), counted)
        batch = cls(
            rows, out.past_key_values, mask, seen, encoder_mask, encoded.new_zeros(1, 1, encoded.shape[-1])
        )
        return batch, out.logits[:, -1, :].float()

    def step(self, model: Any) -> torch.Tensor:
        """Feed every row its newest token; return next-token logits [B, V]."""
        assert self.next_tokens is not None, "record() the sampled tokens before the next step"
        (segment,) = self.segments  # an encoder-decoder's rows are always one segment
        segment.mask = F.pad(segment.mask, (0, 1), value=1)
        # The encoder's states were turned into the cross-attention cache at the rows' first step and are
        # not kept: the decoder only reads their shape and dtype (for the encoder mask), so a zero-stride
        # stand-in costs nothing to keep, filter or join.
        states = self.encoder_like.expand(*self.encoder_mask.shape, -1)
        out = model(
            encoder_outputs=(states,),
            attention_mask=self.encoder_mask,
            decoder_input_ids=self.next_tokens,
            decoder_attention_mask=segment.mask,
            past_key_values=segment.cache,
            use_cache=True,
        )
        segment.cache = out.past_key_values
        self.next_tokens = None
        return out.logits[:, -1, :].float()

    def _cross_layers(self) -> list[Any]:
        return list(self.cache.cross_attention_cache.layers)

    def _select_encoder(
        self, keep: list[int]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The encoder mask and cross-attention keys/values of the rows at `keep`, without the right-padding
        columns none of them needs (cross-attention costs in proportion to the width)."""
        index = torch.tensor(keep, dtype=torch.long)
        mask = self.encoder_mask[index]
        used = mask.any(0).nonzero()
        width = int(used[-1]) + 1 if len(used) else 0
        kv = [
            (layer.keys[index, :, :width], layer.values[index, :, :width]) for layer in self._cross_layers()
        ]
        return mask[:, :width], kv

    def filter(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.encoder_mask, kv = self._select_encoder(keep)
        for layer, (keys, values) in zip(self._cross_layers(), kv):
            layer.replace(keys, values)
        super().filter(keep)

    def take(self, keep: list[int]) -> "Seq2SeqBatch":
        part = super().take(keep)
        assert isinstance(part, Seq2SeqBatch)
        part.encoder_mask, kv = self._select_encoder(keep)
        cross = copy.copy(self.cache.cross_attention_cache)
        cross.layers = []
        for layer, (keys, values) in zip(self._cross_layers(), kv):
            twin = copy.copy(layer)
            twin.replace(keys, values)
            cross.layers.append(twin)
        part.cache.cross_attention_cache = cross
        part.cache.is_updated = dict(self.cache.is_updated)
        return part

    def concatenate(self, other: DecodeBatch, segmented: bool = False) -> None:
        """Append the rows of `other`: the decoder side left-padded (DecodeBatch), the encoder side right-padded."""
        assert isinstance(other, Seq2SeqBatch)
        width = max(self.encoder_mask.shape[1], other.encoder_mask.shape[1])
        mine, theirs = width - self.encoder_mask.shape[1], width - other.encoder_mask.shape[1]
        self.encoder_mask = torch.cat(
            [F.pad(self.encoder_mask, (0, mine)), F.pad(other.encoder_mask, (0, theirs))]
        )
        for a, b in zip(self._cross_layers(), other._cross_layers()):
            a.replace(
                torch.cat([F.pad(a.keys, (0, 0, 0, mine)), F.pad(b.keys, (0, 0, 0, theirs))]),
                torch.cat([F.pad(a.values, (0, 0, 0, mine)), F.pad(b.values, (0, 0, 0, theirs))]),
            )
        super().concatenate(other)  # one segment: its cross-attention cache is one buffer too

    def kv_bytes(self) -> int:
        """Bytes held by both caches (the cross-attention one is the size of the encoder's output, twice)."""
        cross = sum(layer.keys.nbytes + layer.values.nbytes for layer in self._cross_layers())
        return super().kv_bytes() + cross


class Seq2SeqRunner(CausalRunner):
    """The causal runner (causal.py) with Seq2SeqBatch: the same steps, sampling and fault isolation."""

    batch_class = Seq2SeqBatch
    scores_prompts = False
    chunks_prompts = False  # an encoder reads its whole input in one pass; no prefix cache either

    def __init__(
        self,
        model: Any,
        vocab_size: int,
        faults: FaultInjector | None = None,
        on_error: ErrorHook | None = None,
    ) -> None:
        super().__init__(model, vocab_size, faults=faults, on_error=on_error)
        self.start_ids = [decoder_start_token(model)]
        self.joins_running = model.config.model_type in RELATIVE_POSITION_MODELS
        self.held: list[Sequence] = []  # newcomers waiting for an empty batch (absolute positions only)

    @property
    def rows(self) -> list[Sequence]:
        return super().rows + self.held

    def reset(self) -> None:
        super().reset()
        self.held = []

    def step(self, new: list[Sequence]) -> int:
        for seq in new:
            # The n-gram and repetition rules look at the decoder's ids, as in Hugging Face `generate`.
            seq.set_context(self.start_ids)
        if not self.joins_running:
            self.held += new
            for seq in [s for s in self.held if s.cancelled]:
                self.held.remove(seq)
                seq.abort("cancelled")
            running = [s for s in super().rows if not s.cancelled]
            if running:
                return super().step([])
            new, self.held = self.held, []
        return super().step(new)
