"""The running batch: sequences decoded together, one row each in a left-padded KV cache.

Like TGI's `CausalLMBatch`, the batch knows how to take in new sequences (prefill, then concatenate),
run one decoding step for all of them, and drop the ones that finished. Rows are left-padded so that
every row's newest token sits in the last column: one forward pass then serves prompts of any length.
Each row gets its own position ids, so a sequence computes the same thing whatever it is batched with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from textgen.model.memory import GROWTH_BLOCK  # tokens of spare KV capacity added when a layer is full


class GrowingLayer(DynamicLayer):
    """A KV cache layer that writes new keys/values into spare capacity and attends over all of it.

    Hugging Face's DynamicLayer concatenates at every step, copying the whole cache: at batch 32 and a
    few hundred tokens that is hundreds of MB per step for GPT-2. Here spare capacity is reserved in blocks, so a
    step copies only the new token's keys and values.

    Attention gets the whole buffer, spare positions included, like transformers' StaticLayer: a slice of it
    would not be contiguous, and the matmuls of decode attention (textgen/attention.py) would copy the cache to
    make it so, at every layer and step. `get_mask_sizes` reports the full width, so the attention mask covers the
    spare positions (the padding mask is extended with zeros there and the causal mask excludes them anyway).
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._keys = key_states.new_zeros(0)
        self._values = value_states.new_zeros(0)

    @property
    def capacity(self) -> int:
        return self._keys.shape[-2] if self.is_initialized and self._keys.dim() == 4 else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            # A layer created by this very call gets no spare room: transformers sizes the mask of a layer
            # it has not seen yet to the query alone. Prefill is one call, so spare room comes at the first step.
            self._reserve(key_states, _capacity_for(end) if self.length else end)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self._keys, self._values

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        needed = self.get_seq_length() + query_length
        return (self.capacity if needed <= self.capacity else _capacity_for(needed)), 0

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take new contents (after rows were dropped or added); capacity grows again on the next step."""
        self._keys, self._values = keys.contiguous(), values.contiguous()
        self.keys, self.values = self._keys, self._values
        self.length = keys.shape[-2]
        self.is_initialized = True

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take buffers whose first `length` positions are the contents and the rest zeroed spare room: a join
        or a leave then copies the cache once, not again at the next step to make room (measured on a 2-core
        Xeon, GPT-2, 16 rows joined by a 1000-token row: 193 ms to join, then 260 ms for the first step)."""
        self._keys, self._values = keys, values
        self.length = length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on: undoes a step that failed half-way through the layers.

        The buffer keeps its contents up to `length` (a reservation copies them); what the failed step wrote
        beyond is overwritten by the next update.
        """
        self.length = length
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def _reserve(self, like: torch.Tensor, capacity: int) -> None:
        batch, heads, _, dim = like.shape
        keys = like.new_empty(batch, heads, capacity, dim)
        values = like.new_empty(batch, heads, capacity, dim)
        if self.length:
            keys[:, :, : self.length] = self._keys[:, :, : self.length]
            values[:, :, : self.length] = self._values[:, :, : self.length]
        # Zeros, never garbage, in the spare room: it is masked out, but 0 * NaN would still be NaN.
        keys[:, :, self.length :].zero_()
        values[:, :, self.length :].zero_()
        self._keys, self._values = keys, values


def _capacity_for(needed: int) -> int:
    # Grow by a fixed block rather than doubling: a doubled cache is up to twice the memory (and, since
    # attention reads the spare positions too, twice the attention work) for nothing, and one copy per
    # GROWTH_BLOCK steps is already negligible.
    return needed + GROWTH_BLOCK


def _spare_buffers(like: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value buffers for `rows` rows of `width` positions plus spare room; only the spare room is
    zeroed here (the caller writes every position below `width`, padding included), so each byte is written
    once."""
    _, heads, _, dim = like.shape
    capacity = _capacity_for(width)
    keys = like.new_empty(rows, heads, capacity, dim)
    values = like.new_empty(rows, heads, capacity, dim)
    keys[:, :, width:].zero_()
    values[:, :, width:].zero_()
    return keys, values


def new_cache() -> Cache:
    return Cache(layer_class_to_replicate=GrowingLayer)


def _cache_layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "self_attention_cache", cache).layers)


@dataclass(frozen=True)
class Checkpoint:
    """What a decoding step changes in the batch, taken before it: enough to undo a step that failed."""

    attention_mask: torch.Tensor
    next_tokens: torch.Tensor | None
    lengths: list[int]  # per cache layer


class DecodeBatch:
    def __init__(
        self,
        rows: list[Any],
        cache: Any,
        attention_mask: torch.Tensor,
        seen: torch.Tensor,
    ) -> None:
        self.rows = rows  # one object per row, owned by the caller (the engine's sequences)
        self.cache = cache
        self.attention_mask = attention_mask  # [B, L] 1 = real token, 0 = left padding
        self.seen = seen  # [B, V] tokens present so far (prompt + output), for the repetition penalty
        self.next_tokens: torch.Tensor | None = None  # [B, 1] tokens to feed at the next step

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.attention_mask.shape[1]

    @classmethod
    def prefill(
        cls,
        model: Any,
        rows: list[Any],
        prompts: list[list[int]],
        vocab_size: int,
        count_prompt: list[bool] | None = None,
        all_logits: bool = False,
    ) -> tuple["DecodeBatch", torch.Tensor]:
        """Run the prompts of new sequences; return their batch and next-token logits [B, V].

        `count_prompt[i]` False: row i's prompt tokens do not count as seen (for the repetition penalty).
        `all_logits`: return the logits of every position [B, L, V] instead (to score the prompts).
        """
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=new_cache(),
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        # Padding rows attend to nothing; zero their keys/values so no NaN can ever leak into real rows.
        pad = (mask == 0)[:, None, :, None]
        for layer in _cache_layers(out.past_key_values):
            layer.keys.masked_fill_(pad, 0.0)
            layer.values.masked_fill_(pad, 0.0)
        seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool)
        counted = mask.bool()
        if count_prompt is not None:
            counted &= torch.tensor(count_prompt)[:, None]
        seen.scatter_(1, input_ids.clamp(max=vocab_size - 1), counted)
        batch = cls(rows, out.past_key_values, mask, seen)
        return batch, (out.logits if all_logits else out.logits[:, -1, :].float())

    @classmethod
    def start(
        cls,
        row: Any,
        prompt: list[int],
        vocab_size: int,
        count_prompt: bool,
        cached: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> "DecodeBatch":
        """A one-row batch whose prompt is computed piece by piece (`extend`): chunked prefill, or the rest of
        a prompt whose beginning came from the prefix cache (`cached`: per layer keys and values)."""
        cache = new_cache()
        done = 0
        if cached is not None:
            keys, values = cached
            layers = []
            for k, v in zip(keys, values):
                layer = GrowingLayer()
                layer.dtype, layer.device = k.dtype, k.device
                layer.replace(k, v)
                layers.append(layer)
            cache = Cache(layers=layers)
            done = keys[0].shape[2]
        seen = torch.zeros(1, vocab_size, dtype=torch.bool)
        if count_prompt:
            seen[0, torch.tensor(prompt).clamp(max=vocab_size - 1)] = True
        return cls([row], cache, torch.ones(1, done, dtype=torch.long), seen)

    def extend(self, model: Any, ids: list[int]) -> torch.Tensor:
        """Feed a one-row batch the next tokens of its prompt; return the logits after the last [1, V]."""
        assert len(self.rows) == 1 and self.next_tokens is None
        done = self.width
        self.attention_mask = F.pad(self.attention_mask, (0, len(ids)), value=1)
        out = model(
            input_ids=torch.tensor([ids], dtype=torch.long),
            attention_mask=self.attention_mask,
            position_ids=torch.arange(done, done + len(ids))[None],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1, :].float()

    def row_kv(self, row: int, tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of row `row`'s keys and values for its first `tokens` real positions, per layer [H, T, D]."""
        start = self.width - int(self.attention_mask[row].sum())  # its left padding
        layers = _cache_layers(self.cache)
        return (
            [layer.keys[row, :, start : start + tokens] for layer in layers],
            [layer.values[row, :, start : start + tokens] for layer in layers],
        )

    def step(self, model: Any) -> torch.Tensor:
        """Feed every row its newest token; return next-token logits [B, V]."""
        assert self.next_tokens is not None, "record() the sampled tokens before the next step"
        positions = self.attention_mask.sum(-1, keepdim=True)
        self.attention_mask = F.pad(self.attention_mask, (0, 1), value=1)
        out = model(
            input_ids=self.next_tokens,
            attention_mask=self.attention_mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.next_tokens = None
        return out.logits[:, -1, :].float()

    def record(self, tokens: torch.Tensor) -> None:
        """Remember the tokens just sampled (one per row): they are the next step's input."""
        self.next_tokens = tokens.view(-1, 1)
        self.seen.scatter_(1, self.next_tokens.clamp(max=self.seen.shape[1] - 1), True)

    def filter(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`, then drop the padding columns no remaining row needs."""
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.attention_mask = self.attention_mask[index]
        self.seen = self.seen[index]
        if self.next_tokens is not None:
            self.next_tokens = self.next_tokens[index]
        used = self.attention_mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.width
        self.attention_mask = self.attention_mask[:, start:]
        width = self.attention_mask.shape[1]
        for layer in _cache_layers(self.cache):
            if not isinstance(layer, GrowingLayer):
                layer.replace(layer.keys[index, :, start:], layer.values[index, :, start:])
                continue
            keys, values = _spare_buffers(layer.keys, len(keep), width)
            for j, i in enumerate(keep):
                keys[j, :, :width] = layer.keys[i, :, start:]
                values[j, :, :width] = layer.values[i, :, start:]
            layer.adopt(keys, values, width)

    def checkpoint(self) -> Checkpoint:
        """Cheap (no tensor is copied): `step` replaces the mask and only appends to the cache."""
        return Checkpoint(
            self.attention_mask, self.next_tokens, [layer.length for layer in _cache_layers(self.cache)]
        )

    def rollback(self, checkpoint: Checkpoint) -> None:
        """Undo a `step` that raised (half-way through the layers, or after): the batch is as before it."""
        self.attention_mask = checkpoint.attention_mask
        self.next_tokens = checkpoint.next_tokens
        for layer, length in zip(_cache_layers(self.cache), checkpoint.lengths):
            layer.truncate(length)

    def take(self, keep: list[int]) -> "DecodeBatch":
        """A new batch of copies of the rows at `keep`; this batch is left as it was (to retry rows alone)."""
        index = torch.tensor(keep, dtype=torch.long)
        mask = self.attention_mask[index]
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        layers = []
        for layer in _cache_layers(self.cache):
            twin = copy.copy(layer)  # same kind of layer; `replace` gives it tensors of its own
            twin.replace(layer.keys[index, :, start:], layer.values[index, :, start:])
            layers.append(twin)
        cache = copy.copy(self.cache)
        if hasattr(cache, "self_attention_cache"):
            cache.self_attention_cache = copy.copy(cache.self_attention_cache)
        getattr(cache, "self_attention_cache", cache).layers = layers
        part = copy.copy(self)  # of the same class, so that a subclass (seq2seq.py) only adds its own state
        part.rows, part.cache, part.attention_mask = [self.rows[i] for i in keep], cache, mask[:, start:]
        part.seen = self.seen[index]
        if self.next_tokens is not None:
            part.next_tokens = self.next_tokens[index]
        return part

    def kv_bytes(self) -> int:
        """Bytes held by the KV cache, spare capacity included."""
        total = 0
        for layer in _cache_layers(self.cache):
            for name in ("_keys", "_values"):
                tensor = getattr(layer, name, None)
                total += tensor.nbytes if isinstance(tensor, torch.Tensor) else 0
        return total

    def concatenate(self, other: "DecodeBatch") -> None:
        """Append the rows of `other`, left-padding whichever batch is narrower."""
        width = max(self.width, other.width)
        mine, theirs = width - self.width, width - other.width
        self.attention_mask = torch.cat(
            [
                F.pad(self.attention_mask, (mine, 0)),
                F.pad(other.attention_mask, (theirs, 0)),
            ]
        )
        ours = len(self.rows)
        for a, b in zip(_cache_layers(self.cache), _cache_layers(other.cache)):
            if not isinstance(a, GrowingLayer):
                a.replace(
                    torch.cat([F.pad(a.keys, (0, 0, mine, 0)), F.pad(b.keys, (0, 0, theirs, 0))]),
                    torch.cat([F.pad(a.values, (0, 0, mine, 0)), F.pad(b.values, (0, 0, theirs, 0))]),
                )
                continue
            keys, values = _spare_buffers(a.keys, ours + len(other.rows), width)
            for buffer, x, y in ((keys, a.keys, b.keys), (values, a.values, b.values)):
                buffer[:ours, :, :mine].zero_()
                buffer[:ours, :, mine:width] = x
                buffer[ours:, :, :theirs].zero_()
                buffer[ours:, :, theirs:width] = y
            a.adopt(keys, values, width)
        self.seen = torch.cat([self.seen, other.seen])
        if self.next_tokens is not None and other.next_tokens is not None:
            self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.rows = self.rows + other.rows
