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

from textgen.engine.kv_cache import Segment, SegmentedCache, cache_layers, new_cache, row_spans
from textgen.engine.prefix_cache import CachedPrefix
from textgen.model.attention import cache_dtype, decodes_with_segments
from textgen.model.native import native_decoding

# A new segment rather than a merge when merging would pad more than this many positions (rows x columns),
# about what costs a step as much as one more segment does. Measured on a 2-core Xeon (AMX), GPT-2 int8:
# 32 rows of 64 positions step in 45.7 ms as one segment, 48.0 as two, 50.6 as four (about 1.2 ms a
# segment); 16 rows padded by 1920 and 7680 positions take 5.5 and 26 ms longer (about 3 us a position).
MERGE_PADDING = 384
MAX_SEGMENTS = 4  # beyond, the two segments cheapest to merge are merged


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
        segmented = decodes_with_segments(model)
        decoding = native_decoding(model) if segmented else None
        stored = cache_dtype(model)
        if decoding is not None and not all_logits and all(len(p) == width for p in prompts):
            return cls._prefill_natively(decoding, rows, prompts, vocab_size, count_prompt, stored)
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
            past_key_values=new_cache(staggered=segmented, dtype=stored),
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        # Padding rows attend to nothing; zero their keys/values so no NaN can ever leak into real rows.
        # Prompts of one length have none: 24 passes over GPT-2's cache for nothing were 0.44 ms of a
        # 32-token prompt's 23.8 ms (Zen 4 EPYC, bfloat16).
        if not bool(mask.all()):
            pad = (mask == 0)[:, None, :, None]
            for layer in cache_layers(out.past_key_values):
                layer.keys.masked_fill_(pad, 0.0)
                layer.values.masked_fill_(pad, 0.0)
        seen = _prompt_seen(input_ids, mask.bool(), count_prompt, vocab_size)
        batch = cls(rows, [Segment(out.past_key_values, mask)], seen)
        return batch, (out.logits if all_logits else out.logits[:, -1, :].float())

    @classmethod
    def _prefill_natively(
        cls,
        decoding: Any,
        rows: list[Any],
        prompts: list[list[int]],
        vocab_size: int,
        count_prompt: list[bool] | None,
        stored: torch.dtype | None = None,
    ) -> tuple["DecodeBatch", torch.Tensor]:
        """`prefill` of prompts of one length through textgen's own pass: no padding, so every row's tokens
        are one part of a segmented pass (as a chunk of a prompt is, `extend`), each attending causally over
        its own. Hugging Face's forward around the same kernels cost ~1.3 ms more a pass (random GPT-2,
        bfloat16-int8head, 32-token prompts, AMX Xeon, alternating: 1 / 8 / 32 prompts 14.95 / 37.56 /
        116.74 ms against 16.20 / 38.87 / 117.99; a one-token request in the engine 15.5-15.9 against
        16.8-17.1 ms). A lone prompt goes through the lone row's compiled pass, once there is one
        (textgen/model/compiled.py)."""
        count, width = len(prompts), len(prompts[0])
        cache = new_cache(staggered=True, layers=len(decoding.layers), dtype=stored)
        segment = Segment(cache, torch.zeros(count, 0, dtype=torch.long))
        input_ids = torch.tensor(prompts, dtype=torch.long)
        positions = torch.arange(width).repeat(count)
        last = torch.arange(width - 1, count * width, width)
        logits = decoding(input_ids.reshape(-1), positions, SegmentedCache([(segment, width)]), last)
        segment.mask = torch.ones(count, width, dtype=torch.long)
        seen = _prompt_seen(input_ids, segment.mask.bool(), count_prompt, vocab_size)
        return cls(rows, [segment], seen), logits.float()

    @classmethod
    def start(
        cls,
        row: Any,
        prompt: list[int],
        vocab_size: int,
        count_prompt: bool,
        cached: CachedPrefix | None = None,
        staggered: bool = False,
        stored: torch.dtype | None = None,
    ) -> "DecodeBatch":
        """A one-row batch whose prompt is computed piece by piece (`extend`): chunked prefill, or the rest of
        a prompt whose beginning came from the prefix cache (`cached`).
        `staggered`: its layers grow at different steps (the model decodes with textgen's attention;
        kv_cache.new_cache); `stored`: the dtype its cache keeps keys and values in (attention.py
        `cache_dtype`)."""
        cache = new_cache(len(prompt), staggered, dtype=stored)  # each layer has room for the whole prompt
        done = 0
        if cached is not None:
            done = cached.tokens
            cache = new_cache(len(prompt), staggered, layers=len(cached.blocks[0].keys), dtype=stored)
            # Room for the whole prompt at once, the most any layer reserves: the cached beginning is copied
            # once, not again at the first chunk to make room.
            room = max(layer.room for layer in cache.layers)
            for layer, k, v in zip(cache.layers, *cached.buffers(room)):
                layer.dtype, layer.device = k.dtype, k.device
                layer.adopt(k, v, done)
        seen = torch.zeros(1, vocab_size, dtype=torch.bool)
        if count_prompt:
            seen[0, torch.tensor(prompt).clamp(max=vocab_size - 1)] = True
        return cls([row], [Segment(cache, torch.ones(1, done, dtype=torch.long))], seen)

    def extend(self, model: Any, ids: list[int]) -> torch.Tensor:
        """Feed a one-row batch the next tokens of its prompt; return the logits after the last [1, V]."""
        assert len(self.rows) == 1 and self.next_tokens is None
        (segment,) = self.segments
        done = segment.width
        positions = torch.arange(done, done + len(ids))
        # textgen's own pass once the cache has its layers (Hugging Face's forward makes them, at the first
        # chunk); its segmented cache reads the mask of the positions before the chunk, so that grows after.
        decoding = native_decoding(model) if done and decodes_with_segments(model) else None
        if decoding is not None:
            cache = SegmentedCache([(segment, len(ids))])
            logits = decoding(torch.tensor(ids), positions, cache, torch.tensor([len(ids) - 1]))
            segment.mask = F.pad(segment.mask, (0, len(ids)), value=1)
            return logits.float()
        segment.mask = F.pad(segment.mask, (0, len(ids)), value=1)
        out = model(
            input_ids=torch.tensor([ids], dtype=torch.long),
            attention_mask=segment.mask,
            position_ids=positions[None],
            past_key_values=segment.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        segment.cache = out.past_key_values
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
            keep: torch.Tensor | None = None  # every position's logits
            if chunk is not None:  # the decoded rows', and the chunk's last position's only
                keep = torch.cat([torch.arange(decoded), torch.tensor([decoded + len(chunk[1]) - 1])])
            decoding = native_decoding(model)
            if decoding is not None:
                logits = decoding(torch.cat(ids), torch.cat(places), cache, keep).float()
            else:
                out = model(
                    input_ids=torch.cat(ids)[None],
                    position_ids=torch.cat(places)[None],
                    past_key_values=cache,
                    use_cache=True,
                    kv_segments=cache,
                    logits_to_keep=0 if keep is None else keep,
                )
                logits = out.logits[0].float()
            for segment, q in parts:
                segment.mask = F.pad(segment.mask, (0, q), value=1)
            if chunk is None:
                return logits.view(*input_ids.shape, -1), None
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
        for segment, (start, stop) in zip(other.segments, row_spans(other.segments)):
            at = self._place(segment, segmented)
            if at is None:
                end = len(rows)
                self.segments.append(segment)
            else:
                end = row_spans(self.segments)[at][1]  # the new rows follow that segment's
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
        bounds = row_spans(self.segments)
        (_, a_stop), (b_start, b_stop) = bounds[a], bounds[b]
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
        for segment, (start, stop) in zip(self.segments, row_spans(self.segments)):
            if row < stop:
                return segment, row - start
        raise IndexError(row)

    def _split(self, keep: list[int]) -> list[list[int]]:
        """`keep` (batch rows, in order) as each segment's local row indices."""
        return [[i - start for i in keep if start <= i < stop] for start, stop in row_spans(self.segments)]


def _prompt_seen(
    input_ids: torch.Tensor, real: torch.Tensor, count_prompt: list[bool] | None, vocab_size: int
) -> torch.Tensor:
    """[B, V]: the tokens of each row's prompt `input_ids` [B, L] at its real positions `real` (not its left
    padding), unless `count_prompt` says the row does not count its prompt as seen."""
    if count_prompt is not None:
        real = real & torch.tensor(count_prompt)[:, None]
    seen = torch.zeros(len(input_ids), vocab_size, dtype=torch.bool)
    return seen.scatter_(1, input_ids.clamp(max=vocab_size - 1), real)
