"""The running batch: sequences decoded together, in segments of rows left-padded among themselves.

Like TGI's `CausalLMBatch`, the batch knows how to take in new sequences (prefill, then concatenate),
run one decoding step for all of them, and drop the ones that finished. Within a segment rows are
left-padded, so that every row's newest token sits in the last column; each row gets its own position ids,
so a sequence computes the same thing whatever it is batched with.

One forward pass serves every segment (the weights are read once per step), but each segment attends over
its own width (textgen/model/attention.py). One padded cache for all rows made a 1000-token prompt joining
16 short streams re-lay all 17 rows to 1000 positions (136 ms) and then read them at every step (90 ms a
step instead of 34; GPT-2, 2-core Xeon): rows of very different lengths now go to segments of their own,
and rows of similar lengths share one (MERGE_PADDING).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from textgen.model.attention import decodes_with_segments
from textgen.model.memory import GROWTH_BLOCK  # tokens of spare KV capacity added when a layer is full

# A new segment rather than a merge when merging would pad more than this many positions (rows x columns),
# about what costs a step as much as one more segment does. Measured on a 2-core Xeon (AMX), GPT-2 int8:
# 32 rows of 64 positions step in 45.7 ms as one segment, 48.0 as two, 50.6 as four (about 1.2 ms a
# segment); 16 rows padded by 1920 and 7680 positions take 5.5 and 26 ms longer (about 3 us a position).
MERGE_PADDING = 384
MAX_SEGMENTS = 4  # beyond, the two segments cheapest to merge are merged


class GrowingLayer(DynamicLayer):
    """A KV cache layer that writes new keys/values into spare capacity.

    Hugging Face's DynamicLayer concatenates at every step, copying the whole cache: at batch 32 and a
    few hundred tokens that is hundreds of MB per step for GPT-2. Here spare capacity is reserved in blocks, so a
    step copies only the new token's keys and values.

    Hugging Face's attention (prefill, and models that keep their own attention) gets the whole buffer, spare
    positions included, like transformers' StaticLayer: `get_mask_sizes` reports the full width, so the
    attention mask covers the spare positions (the padding mask is extended with zeros there and the causal
    mask excludes them anyway). textgen's decode attention reads `keys`/`values`, the filled part only.
    """

    room = 0  # positions to reserve at once when the layer grows (a prompt computed in chunks: all of it)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._keys = key_states.new_zeros(0)
        self._values = value_states.new_zeros(0)

    @property
    def capacity(self) -> int:
        return self._keys.shape[-2] if self.is_initialized and self._keys.dim() == 4 else 0

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value buffers [B, H, capacity, D], spare room (zeros) included."""
        return self._keys, self._values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            # A layer created by this very call gets no spare room: transformers sizes the mask of a layer
            # it has not seen yet to the query alone. Prefill is one call, so spare room comes at the first step.
            self._reserve(key_states, self._grown(end) if self.length else end)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self._keys, self._values

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        needed = self.get_seq_length() + query_length
        return (self.capacity if needed <= self.capacity else self._grown(needed)), 0

    def _grown(self, needed: int) -> int:
        return max(self.room, _capacity_for(needed))

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


def _spare_buffers(
    like: torch.Tensor, rows: int, width: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value buffers for `rows` rows of `width` positions plus spare room (up to `capacity`); only
    the spare room is zeroed here (the caller writes every position below `width`, padding included), so
    each byte is written once."""
    _, heads, _, dim = like.shape
    capacity = capacity or _capacity_for(width)
    keys = like.new_empty(rows, heads, capacity, dim)
    values = like.new_empty(rows, heads, capacity, dim)
    keys[:, :, width:].zero_()
    values[:, :, width:].zero_()
    return keys, values


def new_cache() -> Cache:
    return Cache(layer_class_to_replicate=GrowingLayer)


def _cache_layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "self_attention_cache", cache).layers)


class Segment:
    """Rows left-padded together: one padding mask, one KV buffer per layer (a Hugging Face cache)."""

    def __init__(self, cache: Any, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # [b, L] 1 = real token, 0 = left padding

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def layers(self) -> list[Any]:
        return _cache_layers(self.cache)

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers()]

    def select(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`, then drop the padding columns no remaining row needs."""
        if len(keep) == len(self):
            return
        index = torch.tensor(keep, dtype=torch.long)
        mask = self.mask[index]
        start = _first_used(mask)
        self.mask = mask[:, start:]
        width = self.width
        for layer in self.layers():
            if not isinstance(layer, GrowingLayer):
                layer.replace(layer.keys[index, :, start:], layer.values[index, :, start:])
                continue
            keys, values = _spare_buffers(layer.keys, len(keep), width)
            for j, i in enumerate(keep):
                keys[j, :, :width] = layer.keys[i, :, start:]
                values[j, :, :width] = layer.values[i, :, start:]
            layer.adopt(keys, values, width)

    def copy(self, keep: list[int]) -> "Segment":
        """A segment of copies of the rows at `keep`; this one is left as it was."""
        index = torch.tensor(keep, dtype=torch.long)
        mask = self.mask[index]
        start = _first_used(mask)
        layers = []
        for layer in self.layers():
            twin = copy.copy(layer)  # same kind of layer; `replace` gives it tensors of its own
            twin.replace(layer.keys[index, :, start:], layer.values[index, :, start:])
            layers.append(twin)
        cache = copy.copy(self.cache)
        if hasattr(cache, "self_attention_cache"):
            cache.self_attention_cache = copy.copy(cache.self_attention_cache)
        getattr(cache, "self_attention_cache", cache).layers = layers
        return Segment(cache, mask[:, start:])

    def padding_to_merge(self, other: "Segment") -> int:
        """Positions (rows x columns) of left padding that merging `other` into this segment would add."""
        width = max(self.width, other.width)
        return len(self) * (width - self.width) + len(other) * (width - other.width)

    def merge(self, other: "Segment") -> None:
        """Append the rows of `other`, left-padding whichever segment is narrower."""
        width = max(self.width, other.width)
        mine, theirs = width - self.width, width - other.width
        self.mask = torch.cat([F.pad(self.mask, (mine, 0)), F.pad(other.mask, (theirs, 0))])
        ours = self.mask.shape[0] - len(other)
        for a, b in zip(self.layers(), other.layers()):
            if not isinstance(a, GrowingLayer):
                a.replace(
                    torch.cat([F.pad(a.keys, (0, 0, mine, 0)), F.pad(b.keys, (0, 0, theirs, 0))]),
                    torch.cat([F.pad(a.values, (0, 0, mine, 0)), F.pad(b.values, (0, 0, theirs, 0))]),
                )
                continue
            keys, values = _spare_buffers(a.keys, ours + len(other), width)
            for buffer, x, y in ((keys, a.keys, b.keys), (values, a.values, b.values)):
                buffer[:ours, :, :mine].zero_()
                buffer[:ours, :, mine:width] = x
                buffer[ours:, :, :theirs].zero_()
                buffer[ours:, :, theirs:width] = y
            a.adopt(keys, values, width)

    def kv_bytes(self) -> int:
        total = 0
        for layer in self.layers():
            for name in ("_keys", "_values"):
                tensor = getattr(layer, name, None)
                total += tensor.nbytes if isinstance(tensor, torch.Tensor) else 0
        return total


def _first_used(mask: torch.Tensor) -> int:
    used = mask.any(0).nonzero()
    return int(used[0]) if len(used) else mask.shape[1]


class _SegmentedLayer(CacheLayerMixin):
    """One model layer's view of every segment: writes each segment's rows of a step into its own cache."""

    def __init__(self, cache: "SegmentedCache", index: int) -> None:
        super().__init__()
        self.cache, self.index = cache, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Keys and values of the packed step [1, H, T, D] go to their segments, [rows, H, q, D] each."""
        for (start, stop), segment, q in zip(self.cache.spans, self.cache.segments, self.cache.queries):
            rows = (len(segment), q)
            segment.cache.update(
                key_states[0, :, start:stop].unflatten(1, rows).transpose(0, 1),
                value_states[0, :, start:stop].unflatten(1, rows).transpose(0, 1),
                self.index,
            )
        # What the attention reads comes from `SegmentedCache.parts`; these are for code that looks at shapes.
        return key_states, value_states

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return max(segment.cache.get_seq_length(self.index) for segment in self.cache.segments)

    def get_max_length(self) -> int:
        return -1


class SegmentedCache(Cache):
    """The cache of a segmented forward pass. Its tokens come packed in one sequence [1, T]: each segment's
    rows, q tokens a row (one to decode, or a few drafted ones to verify), then possibly a chunk of a prompt
    being computed (a one-row segment of its own, q = the chunk). textgen's decode attention asks it, as
    `kv_segments`, for each part's tokens, keys, values and mask (`parts`).

    Attention reads each segment's whole buffer, spare room included, masked: a slice of the filled part is
    not contiguous, and the matmuls then took 130 us each instead of a few (GPT-2, one row, 2-core Xeon:
    20.2 ms a step against 16.6).
    """

    def __init__(self, parts: list[tuple[Segment, int]]) -> None:
        self.segments = [segment for segment, _ in parts]
        self.queries = [queries for _, queries in parts]
        bounds = [0]
        for segment, queries in parts:
            bounds.append(bounds[-1] + len(segment) * queries)
        self.spans = list(zip(bounds[:-1], bounds[1:]))  # each part's tokens in the packed sequence
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        layers = max(len(segment.layers()) for segment in self.segments)
        super().__init__(layers=[_SegmentedLayer(self, i) for i in range(layers)])

    def parts(self, layer: int) -> list[tuple[int, int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per part: its tokens in the packed sequence (start, stop), its queries per row, its key and value
        buffers at `layer` [rows, H, C, D] and its mask [rows, 1, q, C] (asked after the update, so the
        buffers hold the new positions)."""
        result = []
        for index, ((start, stop), segment) in enumerate(zip(self.spans, self.segments)):
            keys, values = segment.layers()[layer].buffers
            mask = self._mask(index, keys.shape[2])
            result.append((start, stop, self.queries[index], keys, values, mask))
        return result

    def _mask(self, index: int, capacity: int) -> torch.Tensor:
        """The rows' real positions, then the q new ones (query j sees those up to its own), then spare room
        nobody sees; the same for every layer of the pass."""
        mask = self._masks.get((index, capacity))
        if mask is None:
            segment, q = self.segments[index], self.queries[index]
            rows, width = segment.mask.shape
            mask = torch.zeros(rows, 1, q, capacity, dtype=torch.bool)
            mask[..., :width] = segment.mask.bool()[:, None, None, :]
            mask[..., width : width + q] = torch.ones(q, q, dtype=torch.bool).tril()
            self._masks[(index, capacity)] = mask
        return mask


@dataclass(frozen=True)
class Checkpoint:
    """What a decoding step changes in the batch, taken before it: enough to undo a step that failed."""

    masks: list[torch.Tensor]
    next_tokens: torch.Tensor | None
    lengths: list[list[int]]  # per segment, per cache layer


class DecodeBatch:
    def __init__(self, rows: list[Any], segments: list[Segment], seen: torch.Tensor) -> None:
        self.rows = rows  # one object per row, owned by the caller (the engine's sequences)
        self.segments = segments  # their rows in order: the first segment's rows are rows[:len(it)], ...
        self.seen = seen  # [B, V] tokens present so far (prompt + output), for the repetition penalty
        self.next_tokens: torch.Tensor | None = None  # [B, 1] tokens to feed at the next step
        # Positions a prompt computed piece by piece (`start`, `extend`) reserves at once: growing by the
        # usual block at every chunk copied the whole cache each time (a 1000-token prompt: 15 copies).
        self.room = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Positions of the widest segment (a one-row batch: the positions of its sequence)."""
        return max(segment.width for segment in self.segments)

    @property
    def cache(self) -> Any:
        """The cache of a batch of one segment (prefill, a prompt in progress, encoder-decoders)."""
        (segment,) = self.segments
        return segment.cache

    @property
    def attention_mask(self) -> torch.Tensor:
        (segment,) = self.segments
        return segment.mask

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
        batch = cls(rows, [Segment(out.past_key_values, mask)], seen)
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
        room = _capacity_for(len(prompt))
        cache = new_cache()
        done = 0
        if cached is not None:
            keys, values = cached
            done = keys[0].shape[2]
            layers = []
            for k, v in zip(keys, values):
                layer = GrowingLayer()
                layer.dtype, layer.device, layer.room = k.dtype, k.device, room
                # Room for the whole prompt at once: the cached beginning is copied once, not again at
                # the first chunk to make room.
                buffers = _spare_buffers(k, 1, done, room)
                buffers[0][:, :, :done], buffers[1][:, :, :done] = k, v
                layer.adopt(*buffers, done)
                layers.append(layer)
            cache = Cache(layers=layers)
        seen = torch.zeros(1, vocab_size, dtype=torch.bool)
        if count_prompt:
            seen[0, torch.tensor(prompt).clamp(max=vocab_size - 1)] = True
        batch = cls([row], [Segment(cache, torch.ones(1, done, dtype=torch.long))], seen)
        batch.room = room
        return batch

    def extend(self, model: Any, ids: list[int]) -> torch.Tensor:
        """Feed a one-row batch the next tokens of its prompt; return the logits after the last [1, V]."""
        assert len(self.rows) == 1 and self.next_tokens is None
        (segment,) = self.segments
        done = segment.width
        segment.mask = F.pad(segment.mask, (0, len(ids)), value=1)
        out = model(
            input_ids=torch.tensor([ids], dtype=torch.long),
            attention_mask=segment.mask,
            position_ids=torch.arange(done, done + len(ids))[None],
            past_key_values=segment.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        segment.cache = out.past_key_values
        for layer in segment.layers():  # created by this call if it was the first: room for the whole prompt
            layer.room = self.room
        return out.logits[:, -1, :].float()

    def row_kv(self, row: int, tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of row `row`'s keys and values for its first `tokens` real positions, per layer [H, T, D]."""
        segment, i = self._locate(row)
        start = segment.width - int(segment.mask[i].sum())  # its left padding
        layers = segment.layers()
        return (
            [layer.keys[i, :, start : start + tokens] for layer in layers],
            [layer.values[i, :, start : start + tokens] for layer in layers],
        )

    def step(self, model: Any) -> torch.Tensor:
        """Feed every row its newest token; return next-token logits [B, V]."""
        assert self.next_tokens is not None, "record() the sampled tokens before the next step"
        logits, _ = self.forward(model, self.next_tokens)
        self.next_tokens = None
        return logits[:, -1, :]

    def forward(
        self, model: Any, input_ids: torch.Tensor, chunk: tuple["DecodeBatch", list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed every row `input_ids[row]` [B, q] after its cached positions; return the logits of all of
        them [B, q, V] (float32). The masks and caches grow by q positions (`cut` takes them back).

        `chunk` (a one-row batch whose prompt is being computed, `start`; the next tokens of that prompt):
        computed in the same pass, which reads the weights once for both; the second value returned is then
        the logits after the chunk's last token [1, V]. Needs a model that decodes with segments.
        """
        queries = input_ids.shape[1]
        positions = torch.cat([s.mask.sum(-1, keepdim=True) for s in self.segments]) + torch.arange(queries)
        if decodes_with_segments(model):
            parts = [(segment, queries) for segment in self.segments]
            ids, places = [input_ids.reshape(-1)], [positions.reshape(-1)]
            if chunk is not None:
                filling, tokens = chunk
                (segment,) = filling.segments
                parts.append((segment, len(tokens)))
                ids.append(torch.tensor(tokens, dtype=torch.long))
                places.append(torch.arange(segment.width, segment.width + len(tokens)))
            cache = SegmentedCache(parts)
            decoded = input_ids.numel()
            keep: int | torch.Tensor = 0  # every position's logits
            if chunk is not None:  # the decoded rows', and the chunk's last position's only
                keep = torch.cat([torch.arange(decoded), torch.tensor([decoded + len(chunk[1]) - 1])])
            out = model(
                input_ids=torch.cat(ids)[None],
                position_ids=torch.cat(places)[None],
                past_key_values=cache,
                use_cache=True,
                kv_segments=cache,
                logits_to_keep=keep,
            )
            for segment, q in parts:
                segment.mask = F.pad(segment.mask, (0, q), value=1)
            logits = out.logits[0].float()
            if chunk is None:
                return logits.view(*input_ids.shape, -1), None
            for layer in (
                chunk[0].segments[0].layers()
            ):  # a layer this pass created: room for the whole prompt
                layer.room = chunk[0].room
            return logits[:decoded].view(*input_ids.shape, -1), logits[decoded:]
        # A model with attention of its own (it could not take textgen's): one segment, Hugging Face masks.
        assert chunk is None, "a chunk shares a pass only with textgen's decode attention"
        while len(self.segments) > 1:
            self._merge_cheapest()
        (segment,) = self.segments
        segment.mask = F.pad(segment.mask, (0, queries), value=1)
        out = model(
            input_ids=input_ids,
            attention_mask=segment.mask,
            position_ids=positions,
            past_key_values=segment.cache,
            use_cache=True,
        )
        segment.cache = out.past_key_values
        return out.logits.float(), None

    def cut(self, positions: int) -> None:
        """Forget every row's last `positions` positions (the rejected part of a speculative step)."""
        if not positions:
            return
        for segment in self.segments:
            for layer in segment.layers():
                layer.truncate(layer.length - positions)
            segment.mask = segment.mask[:, : segment.width - positions]

    def record(self, tokens: torch.Tensor) -> None:
        """Remember the tokens just sampled (one per row): they are the next step's input."""
        self.next_tokens = tokens.view(-1, 1)
        self.seen.scatter_(1, self.next_tokens.clamp(max=self.seen.shape[1] - 1), True)

    def filter(self, keep: list[int]) -> None:
        """Keep only the rows at `keep` (in order); segments left empty go."""
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.seen = self.seen[index]
        if self.next_tokens is not None:
            self.next_tokens = self.next_tokens[index]
        segments = []
        for segment, local in zip(self.segments, self._split(keep)):
            if local:
                segment.select(local)
                segments.append(segment)
        self.segments = segments

    def checkpoint(self) -> Checkpoint:
        """Cheap (no tensor is copied): a step replaces the masks and only appends to the caches."""
        return Checkpoint(
            [s.mask for s in self.segments], self.next_tokens, [s.lengths() for s in self.segments]
        )

    def rollback(self, checkpoint: Checkpoint) -> None:
        """Undo a `step` that raised (half-way through the layers, or after): the batch is as before it."""
        self.next_tokens = checkpoint.next_tokens
        for segment, mask, lengths in zip(self.segments, checkpoint.masks, checkpoint.lengths):
            segment.mask = mask
            for i, layer in enumerate(segment.layers()):
                layer.truncate(lengths[i] if i < len(lengths) else 0)  # a layer the failed pass created

    def take(self, keep: list[int]) -> "DecodeBatch":
        """A new batch of copies of the rows at `keep`; this batch is left as it was (to retry rows alone)."""
        index = torch.tensor(keep, dtype=torch.long)
        segments = [s.copy(local) for s, local in zip(self.segments, self._split(keep)) if local]
        part = copy.copy(self)  # of the same class, so that a subclass (seq2seq.py) only adds its own state
        part.rows, part.segments, part.seen = [self.rows[i] for i in keep], segments, self.seen[index]
        if self.next_tokens is not None:
            part.next_tokens = self.next_tokens[index]
        return part

    def kv_bytes(self) -> int:
        """Bytes held by the KV cache, spare capacity included."""
        return sum(segment.kv_bytes() for segment in self.segments)

    def concatenate(self, other: "DecodeBatch", segmented: bool = False) -> None:
        """Append the rows of `other`. `segmented` (the model decodes with textgen's attention): its segments
        may stay segments of their own, else everything is merged into one."""
        rows, seen = self.rows, self.seen
        nexts = self.next_tokens if self.next_tokens is not None and other.next_tokens is not None else None
        for segment, (start, stop) in zip(other.segments, _spans(other.segments)):
            at = self._place(segment, segmented)
            if at is None:
                end = len(rows)
                self.segments.append(segment)
            else:
                end = _spans(self.segments)[at][1]  # the new rows follow that segment's
                self.segments[at].merge(segment)
            rows = rows[:end] + other.rows[start:stop] + rows[end:]
            seen = torch.cat([seen[:end], other.seen[start:stop], seen[end:]])
            if nexts is not None:
                nexts = torch.cat([nexts[:end], other.next_tokens[start:stop], nexts[end:]])
        self.rows, self.seen = rows, seen
        self.next_tokens = nexts
        while len(self.segments) > MAX_SEGMENTS:
            self._merge_cheapest()

    def _place(self, segment: Segment, segmented: bool) -> int | None:
        """The segment `segment` merges into (None: it becomes one of its own)."""
        if not self.segments:
            return None
        if not segmented:
            return 0
        costs = [s.padding_to_merge(segment) for s in self.segments]
        best = min(range(len(costs)), key=costs.__getitem__)
        return best if costs[best] <= MERGE_PADDING else None

    def _merge_cheapest(self) -> None:
        """Merge the two segments whose merge pads least (their rows are moved together)."""
        pairs = [(a, b) for a in range(len(self.segments)) for b in range(a + 1, len(self.segments))]
        a, b = min(pairs, key=lambda p: self.segments[p[0]].padding_to_merge(self.segments[p[1]]))
        spans = _spans(self.segments)
        (a_start, a_stop), (b_start, b_stop) = spans[a], spans[b]
        order = (
            list(range(a_stop))
            + list(range(b_start, b_stop))
            + list(range(a_stop, b_start))
            + list(range(b_stop, len(self.rows)))
        )
        index = torch.tensor(order, dtype=torch.long)
        self.rows = [self.rows[i] for i in order]
        self.seen = self.seen[index]
        if self.next_tokens is not None:
            self.next_tokens = self.next_tokens[index]
        self.segments[a].merge(self.segments.pop(b))

    def _locate(self, row: int) -> tuple[Segment, int]:
        for segment, (start, stop) in zip(self.segments, _spans(self.segments)):
            if row < stop:
                return segment, row - start
        raise IndexError(row)

    def _split(self, keep: list[int]) -> list[list[int]]:
        """`keep` (batch rows, in order) as each segment's local row indices."""
        return [[i - start for i in keep if start <= i < stop] for start, stop in _spans(self.segments)]


def _spans(segments: list[Segment]) -> list[tuple[int, int]]:
    bounds = [0]
    for segment in segments:
        bounds.append(bounds[-1] + len(segment))
    return list(zip(bounds[:-1], bounds[1:]))
