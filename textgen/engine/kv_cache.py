"""The KV cache of textgen's batch: layers that grow in place, and segments of rows left-padded together.

A segment (`Segment`) is rows whose caches are left-padded to the same width, so that every row's newest
token sits in the last column: one padding mask, one buffer per model layer (`GrowingLayer`, which reserves
spare room in blocks instead of copying the whole cache at every step). The batch (textgen/engine/batch.py)
keeps several segments when its rows' lengths differ a lot, and runs them in one forward pass through
`SegmentedCache`, which textgen's decode attention (textgen/model/attention.py) reads each segment's keys,
values and mask from.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from textgen.model.memory import GROWTH_BLOCK, fault_in

# A layer's capacity grows CAPACITY_STEP positions at a time, and layer i's is kept at (i * PHASE_STRIDE) mod
# CAPACITY_STEP: the layers of a batch outgrow their buffers at different steps, a quarter of them at a time,
# instead of all at once (16 rows x ~700 positions, GPT-2: the whole cache copied in one step made it
# 300-600 ms instead of 35 on a 2-core Xeon VM, where freshly touched memory comes at 0.4-4 GB/s).
# Capacities stay multiples of 8: torch's bfloat16 SDPA lost precision over other lengths (SmolLM2
# token-by-token perplexity, bfloat16: 17.58 with capacities at multiples of 32, 17.55 at multiples of 8,
# 17.65 with a stride of 7; int8 17.68, 17.68, 17.86).
PHASE_STRIDE = 8
# The layers that share a phase take turns too: the k-th of them grows k positions before it is full, so a
# step copies one layer, not three (GPT-2) or eight (SmolLM2). Three layers of 16 rows x ~150 positions
# grew in 22-28 ms of fresh memory on the 2-core Xeon VM, inside a 26 ms step. A row's cache therefore
# holds at most CAPACITY_STEP + PHASE_STRIDE - 1 spare positions: within GROWTH_BLOCK.
CAPACITY_STEP = GROWTH_BLOCK - PHASE_STRIDE


class GrowingLayer(DynamicLayer):
    """A KV cache layer that writes new keys/values into spare capacity.

    Hugging Face's DynamicLayer concatenates at every step, copying the whole cache: at batch 32 and a
    few hundred tokens that is hundreds of MB per step for GPT-2. Here spare capacity is reserved in blocks, so a
    step copies only the new token's keys and values.

    Hugging Face's attention (prefill, and models that keep their own attention) gets the whole buffer, spare
    positions included, like transformers' StaticLayer: `get_mask_sizes` reports the full width, so the
    attention mask covers the spare positions (the padding mask is extended with zeros there and the causal
    mask excludes them anyway). textgen's decode attention reads the whole buffers too (`buffers`), masked.
    The exception is a prompt's room while its chunks fill it: every reader gets the written part only.
    """

    def __init__(
        self, prompt: int = 0, phase: int = 0, early: int = 0, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.storage = dtype  # what the buffers hold keys and values in; None: the dtype they come in
        self.phase = phase  # capacities are kept at this residue of CAPACITY_STEP (PHASE_STRIDE)
        self.early = early  # it grows this many positions before it is full (< PHASE_STRIDE)
        # A prompt computed piece by piece (`prompt` tokens) reserves room for all of it when it first grows:
        # growing by the usual block at every chunk copied the whole cache each time (a 1000-token prompt:
        # 15 copies). Its chunks never make it grow again (HF attention's one mask needs every layer alike).
        self.prompt = prompt
        self.room = capacity_for(prompt + early, phase) if prompt else 0
        # Positions [length, unwritten) of the buffers hold whatever the allocator left there: a prompt's
        # room is not zeroed ahead of its chunks, and until they reach it, readers get the written part only.
        self.unwritten = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = self.storage or key_states.dtype
        self.length = 0
        self._keys = key_states.new_zeros(0, dtype=self.dtype)
        self._values = value_states.new_zeros(0, dtype=self.dtype)

    @property
    def capacity(self) -> int:
        return self._keys.shape[-2] if self.is_initialized and self._keys.dim() == 4 else 0

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value buffers [B, H, capacity, D], spare room (zeros) included; while a
        prompt's room is being filled, its written part only."""
        if self.length <= self.unwritten:
            return self.keys, self.values
        return self._keys, self._values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        queries = key_states.shape[-2]
        self.make_room(queries, key_states)
        self._keys[:, :, self.length : self.length + queries] = key_states
        self._values[:, :, self.length : self.length + queries] = value_states
        self.advance(queries)
        return self.buffers

    def make_room(self, queries: int, like: torch.Tensor | None = None) -> None:
        """Reserve a larger buffer if `queries` more positions need it (`like`: the shape and dtype of the
        keys to come, needed before the first reservation)."""
        capacity = self._capacity_after(queries)
        if capacity != self.capacity:
            self._reserve(self._keys if like is None else like, capacity)

    def advance(self, queries: int) -> None:
        """Count the `queries` positions written after the last one (into room `make_room` made)."""
        self.length += queries
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        """The width `update` will return for `query_length` more positions (transformers sizes masks by it)."""
        end = self.get_seq_length() + query_length
        capacity = self._capacity_after(query_length)
        unwritten = self.unwritten if capacity == self.capacity else self._unwritten_in(capacity)
        return (end if end <= unwritten else capacity), 0

    def grows(self, queries: int) -> bool:
        """Whether taking `queries` more positions makes it reserve a larger buffer (and copy its cache)."""
        return self.get_seq_length() + queries + self.early > self.capacity

    def _capacity_after(self, queries: int) -> int:
        """Its capacity once it holds `queries` more positions."""
        if not self.grows(queries):
            return self.capacity
        end = self.get_seq_length() + queries
        # A layer created by this very call gets no spare room: transformers sizes the mask of a layer it has
        # not seen yet to the query alone. Prefill is one call, so spare room comes at the first step.
        return self._grown(end + self.early) if self.get_seq_length() else end

    def _unwritten_in(self, capacity: int) -> int:
        """Where the garbage ends in a buffer of `capacity` reserved now (`_reserve`): at the prompt's end in
        its room, else at what the layer holds (the rest is zeroed)."""
        return max(self.length, self.prompt) if capacity == self.room else self.length

    def _grown(self, needed: int) -> int:
        return max(self.room, capacity_for(needed, self.phase))

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take new contents (after rows were dropped or added); capacity grows again on the next step."""
        self._keys, self._values = keys.contiguous(), values.contiguous()
        self.keys, self.values = self._keys, self._values
        self.length = keys.shape[-2]
        self.unwritten = 0
        self.is_initialized = True

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take buffers whose first `length` positions are the contents and the rest zeroed spare room: a join
        or a leave then copies the cache once, not again at the next step to make room (measured on a 2-core
        Xeon, GPT-2, 16 rows joined by a 1000-token row: 193 ms to join, then 260 ms for the first step)."""
        self._keys, self._values = keys, values
        self.length = length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.unwritten = 0
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
        dtype = self.storage or like.dtype
        keys = like.new_empty(batch, heads, capacity, dim, dtype=dtype)
        values = like.new_empty(batch, heads, capacity, dim, dtype=dtype)
        if capacity != self.room:  # a prompt's room: its chunks fault in their own parts
            fault_in(keys, values)
        if self.length:
            keys[:, :, : self.length] = self._keys[:, :, : self.length]
            values[:, :, : self.length] = self._values[:, :, : self.length]
        # Zeros, never garbage, in the spare room: it is masked out, but 0 * NaN would still be NaN. A
        # prompt's room is zeroed only past the prompt: its chunks write the rest, and readers get the
        # written part until then (`buffers`). Zeroing a 1000-token room at once touched 37 MB of fresh
        # memory in one step (GPT-2 bfloat16, 2-core Xeon VM: ~5800 page faults, 35 ms; the 16 running
        # streams' token came after 80-90 ms instead of 25-37); this way each chunk faults in its own part.
        clean = self._unwritten_in(capacity)
        keys[:, :, clean:].zero_()
        values[:, :, clean:].zero_()
        self._keys, self._values = keys, values
        self.unwritten = clean


def capacity_for(needed: int, phase: int = 0) -> int:
    """Room for more than `needed` positions: the next capacity past it that is `phase` mod CAPACITY_STEP
    (at most CAPACITY_STEP spare)."""
    # Grow by a fixed block rather than doubling: a doubled cache is up to twice the memory (and, since
    # attention reads the spare positions too, twice the attention work) for nothing, and one copy per
    # CAPACITY_STEP steps is negligible once the layers take turns (PHASE_STRIDE).
    return needed + 1 + (phase - needed - 1) % CAPACITY_STEP


def spare_buffers(
    like: torch.Tensor, rows: int, width: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value buffers for `rows` rows of `width` positions plus spare room (up to `capacity`); only
    the spare room is zeroed here (the caller writes every position below `width`, padding included), so
    each byte is written once."""
    _, heads, _, dim = like.shape
    capacity = capacity or capacity_for(width)
    keys = like.new_empty(rows, heads, capacity, dim)
    values = like.new_empty(rows, heads, capacity, dim)
    fault_in(keys, values)
    keys[:, :, width:].zero_()
    values[:, :, width:].zero_()
    return keys, values


def new_cache(
    prompt: int = 0, staggered: bool = False, layers: int | None = None, dtype: torch.dtype | None = None
) -> Cache:
    """A cache whose layers (made at the first update, in order) are GrowingLayers, for a `prompt`-token
    prompt computed piece by piece if given; `staggered`: each with its own turn to grow (`staggered_layer`).
    Only for textgen's decode attention, which reads each layer's buffer as it is: Hugging Face's attention
    builds one mask for every layer, from the first layer's capacity. `layers`: that many made now, for a
    pass that needs them all before it writes any (textgen's own, whose compiled form takes every layer's
    buffers at once: `SegmentedCache.open_lone`). `dtype`: what keys and values are stored in, if not the
    dtype they are computed in (textgen/model/attention.py `cache_dtype`)."""
    if layers is not None:
        return Cache(layers=[staggered_layer(i, prompt, staggered, dtype) for i in range(layers)])
    made = itertools.count()
    return Cache(layer_class_to_replicate=lambda: staggered_layer(next(made), prompt, staggered, dtype))


def staggered_layer(
    index: int, prompt: int = 0, staggered: bool = True, dtype: torch.dtype | None = None
) -> GrowingLayer:
    """The `index`-th layer of a cache; `staggered`: with its phase and how early it grows (PHASE_STRIDE);
    `dtype`: its keys' and values' storage (None: as computed)."""
    if not staggered:
        return GrowingLayer(prompt, dtype=dtype)
    early = index // (CAPACITY_STEP // PHASE_STRIDE) % PHASE_STRIDE
    return GrowingLayer(prompt, phase_of(index), early, dtype)


def phase_of(layer: int) -> int:
    """The residue of CAPACITY_STEP the `layer`-th layer keeps its capacity at (PHASE_STRIDE)."""
    return layer * PHASE_STRIDE % CAPACITY_STEP


def cache_layers(cache: Any) -> list[Any]:
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
        return cache_layers(self.cache)

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
            keys, values = spare_buffers(layer.keys, len(keep), width, capacity_for(width, layer.phase))
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
            keys, values = spare_buffers(a.keys, ours + len(other), width, capacity_for(width, a.phase))
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
        # A weak reference: the cache holds its layers, and a cycle would keep each pass's cache (and what it
        # references) until Python's rare full collection: 200-800 MB held by idle garbage after workload W.
        self.cache, self.index = weakref.proxy(cache), index
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

    def open_lone(self, tokens: int, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """For a pass of one row taking `tokens` new tokens (a lone stream's step, prompt or verification):
        make room for them in every layer and return each layer's whole key and value buffers [1, H, C, D],
        spare room included and zeroed. A lone row has no padding, so a token's position is its column, and
        each buffer's valid part is the columns up to it. `like` [1, H, 0, D]: the keys' shape and dtype, for
        the layers of a prompt's pass, which start empty. `close_lone` counts the tokens once the pass has
        written them. None for any other pass, or one whose layers are not plain growing buffers (they go
        through `update` and `parts`)."""
        if self.queries != [tokens] or len(self.segments[0]) != 1:
            return None
        (segment,) = self.segments
        layers = segment.layers()
        width = segment.width
        for layer in layers:
            if not isinstance(layer, GrowingLayer):
                return None
            # Columns that are not positions; a layer not made yet belongs to a prompt's first pass (a new
            # cache, `width` 0).
            made = layer.is_initialized
            if (made and layer.length != width) or (not made and width):
                return None
        if not bool(segment.mask.all()):
            return None
        for layer in layers:
            if not layer.is_initialized:
                layer.lazy_initialization(like, like)
            layer.make_room(tokens, like)
            # Garbage past the new tokens, in the room of a prompt computed in chunks that later chunks fill,
            # is masked but would still be read (0 x NaN): such a pass goes through `update` and `parts`,
            # which read the written part only.
            if layer.unwritten > layer.length + tokens:
                return None
        return [(layer._keys, layer._values) for layer in layers]

    def close_lone(self, tokens: int) -> None:
        """Count the `tokens` an `open_lone` pass wrote."""
        for layer in self.segments[0].layers():
            layer.advance(tokens)

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


def row_spans(segments: list[Segment]) -> list[tuple[int, int]]:
    """Each segment's rows in the batch, (first, end): segments hold consecutive rows, in order."""
    bounds = [0]
    for segment in segments:
        bounds.append(bounds[-1] + len(segment))
    return list(zip(bounds[:-1], bounds[1:]))
