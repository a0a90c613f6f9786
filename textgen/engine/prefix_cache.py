"""Automatic prefix caching: the KV of prompt prefixes kept across requests, in blocks, bounded, LRU.

Templates (`few_shot`, `assistant`), chat system prompts and repeated prompts share long beginnings; their
keys and values are the same whoever asks, so a prompt whose first blocks were computed before starts from
them and computes only the rest (vLLM's automatic prefix caching, llama.cpp's `cache_prompt`).

The cache is a tree of blocks of BLOCK tokens: a block is found by its parent block and its own tokens, so a
block stands for its whole prefix and prompts that share a beginning share its blocks. After the whole
blocks, a hit also takes the first positions of a cached next block as far as its tokens are the prompt's
(llama.cpp's `cache_prompt` and SGLang's radix tree reuse to the token, vLLM to the block): a 600-token
shared beginning is reused whole, not up to 592 with 8 tokens recomputed. A hit never covers a prompt's last
token: the step that computes it gives the logits of the first new token. Eviction is least
recently used among the leaves (a block whose children are cached is never dropped before them), so a
prefix stays usable as long as it stays cached. Every key starts from the cache's namespace (the model, its
weights' format): one cache never hands one model's KV to another.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

import torch

from textgen.engine.outputs import PrefixCacheStats

BLOCK = 16  # tokens per block: finer than vLLM's 16 would be is no gain here, coarser wastes a prompt's tail
# A partly shared block is looked for among this many of the last whole block's children, most recent first:
# a beginning many prompts share (a system prompt) has a child per different continuation.
PARTIAL_CANDIDATES = 32


@dataclass
class _Block:
    key: tuple[int | str, tuple[int, ...]]  # (parent block id or the root, its tokens)
    keys: torch.Tensor  # [layers, heads, BLOCK, head_dim]
    values: torch.Tensor


@dataclass
class CachedPrefix:
    """The cached beginning of a prompt, as found by `PrefixCache.lookup`: its blocks, first to last, of
    which the last is used up to position `tail`."""

    blocks: list[_Block]
    tail: int = BLOCK

    @property
    def tokens(self) -> int:
        return (len(self.blocks) - 1) * BLOCK + self.tail

    def buffers(self, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Key and value buffers for a one-row cache of `capacity` positions (per layer [1, heads, capacity,
        dim]; views of one allocation), the cached positions copied in and the rest zeroed.

        The blocks are concatenated straight into the buffers: concatenating them first and copying the
        result into the buffers made a 600-token hit (GPT-2, bfloat16) write 22 MB twice; it took 7-13 ms
        of a 47-56 ms time to first token on the AMX Xeon, and 2.6 against 3.5 ms by itself."""
        first = self.blocks[0].keys
        layers, heads, _, dim = first.shape
        both = first.new_empty(2, layers, 1, heads, capacity, dim)
        both[..., self.tokens :, :].zero_()
        *whole, last = self.blocks
        keys = [b.keys for b in whole] + [last.keys[:, :, : self.tail]]
        values = [b.values for b in whole] + [last.values[:, :, : self.tail]]
        torch.cat(keys, dim=2, out=both[0, :, 0, :, : self.tokens])
        torch.cat(values, dim=2, out=both[1, :, 0, :, : self.tokens])
        return list(both[0].unbind(0)), list(both[1].unbind(0))


class PrefixCache:
    def __init__(self, budget_bytes: int, namespace: str) -> None:
        """`budget_bytes`: the most the cached blocks may hold; `namespace`: what the KV belongs to (model id
        and format): blocks of different namespaces never match."""
        self.budget_bytes = budget_bytes
        self.root: int | str = f"root of {namespace}"  # the parent of every first block; block ids are ints
        self._ids = itertools.count(1)
        self._index: dict[tuple[int | str, tuple[int, ...]], int] = {}  # block key -> block id
        self._blocks: dict[int, _Block] = {}
        self._children: dict[int | str, dict[int, None]] = {}  # block id (or the root) -> its children's ids
        # Blocks without cached children, least recently used first: the eviction candidates, kept apart so
        # that eviction does not scan the whole cache (it did: workload W fell from 460 to 365 tok/s once the
        # cache was full, 2-core Xeon).
        self._leaves: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.stats = PrefixCacheStats()

    def match(self, prompt: list[int]) -> list[int]:
        """Ids of the cached blocks that begin `prompt`, longest run first to last, never its last token."""
        found: list[int] = []
        parent: int | str = self.root
        for start in range(0, len(prompt) - 1 - BLOCK + 1, BLOCK):
            block_id = self._index.get((parent, tuple(prompt[start : start + BLOCK])))
            if block_id is None:
                break
            found.append(block_id)
            parent = block_id
        return found

    def cached_tokens(self, prompt: list[int]) -> int:
        """How many of `prompt`'s first tokens a lookup would find cached (never its last one)."""
        blocks, tail = self._find(prompt)
        return (len(blocks) - 1) * BLOCK + tail if blocks else 0

    def lookup(self, prompt: list[int], min_tokens: int = 1) -> CachedPrefix | None:
        """The longest cached beginning of `prompt`, or None when fewer than `min_tokens` are cached. Counts
        the query, and marks the blocks used."""
        blocks, tail = self._find(prompt)
        self.stats.queried_tokens += len(prompt)
        found = CachedPrefix([self._blocks[b] for b in blocks], tail) if blocks else None
        if found is None or found.tokens < min_tokens:
            return None
        self.stats.hit_tokens += found.tokens
        if blocks[-1] in self._leaves:
            self._leaves.move_to_end(blocks[-1])
        return found

    def _find(self, prompt: list[int]) -> tuple[list[int], int]:
        """Ids of the cached blocks that begin `prompt` and how many positions of the last one it shares: the
        whole blocks (`match`), then the child of the last one whose tokens begin the prompt's next ones the
        furthest, if any (never its last token)."""
        found = self.match(prompt)
        if not found:  # a partly shared first block is fewer tokens than any hit is worth
            return found, BLOCK
        start = len(found) * BLOCK
        following = prompt[start : min(start + BLOCK, len(prompt) - 1)]
        best, shared = None, 0
        for child in itertools.islice(reversed(self._children.get(found[-1], {})), PARTIAL_CANDIDATES):
            common = _shared_length(self._blocks[child].key[1], following)
            if common > shared:
                best, shared = child, common
        return (found, BLOCK) if best is None else (found + [best], shared)

    def insert(self, prompt: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep the full blocks of `prompt` not cached yet. keys/values: per layer, [heads, >= tokens, dim],
        position 0 being the prompt's first token (views are fine: blocks are copied)."""
        parent: int | str = self.root
        per_block = 0
        for start in range(0, len(prompt) - BLOCK + 1, BLOCK):
            key = (parent, tuple(prompt[start : start + BLOCK]))
            block_id = self._index.get(key)
            if block_id is None:
                block_keys = torch.stack([k[:, start : start + BLOCK] for k in keys])
                block_values = torch.stack([v[:, start : start + BLOCK] for v in values])
                per_block = per_block or block_keys.nbytes + block_values.nbytes
                if not self._make_room(per_block, keep=parent):
                    return
                block_id = next(self._ids)
                self._blocks[block_id] = _Block(key, block_keys, block_values)
                self._index[key] = block_id
                self._leaves[block_id] = None
                self._children.setdefault(parent, {})[block_id] = None
                self._leaves.pop(parent, None)  # type: ignore[arg-type]
                self.stats.cached_blocks += 1
                self.stats.cached_bytes += per_block
            elif block_id in self._leaves:
                self._leaves.move_to_end(block_id)
            parent = block_id

    def clear(self) -> None:
        self._index.clear()
        self._blocks.clear()
        self._children.clear()
        self._leaves.clear()
        self.stats.cached_blocks = self.stats.cached_bytes = 0

    def _make_room(self, nbytes: int, keep: int | str) -> bool:
        """Evict least recently used leaves (never `keep`, the parent of the block to come) until `nbytes`
        more fit; False if they cannot."""
        if nbytes > self.budget_bytes:
            return False
        while self.stats.cached_bytes + nbytes > self.budget_bytes:
            victim = next((i for i in self._leaves if i != keep), None)
            if victim is None:
                return False
            del self._leaves[victim]
            block = self._blocks.pop(victim)
            del self._index[block.key]
            parent_id = block.key[0]
            siblings = self._children[parent_id]
            del siblings[victim]
            if not siblings:
                del self._children[parent_id]
                if parent_id in self._blocks:  # a leaf now, as old as the child it outlived
                    self._leaves[parent_id] = None  # type: ignore[index]
                    self._leaves.move_to_end(parent_id, last=False)  # type: ignore[arg-type]
            self.stats.cached_blocks -= 1
            self.stats.cached_bytes -= block.keys.nbytes + block.values.nbytes
            self.stats.evicted_blocks += 1
        return True


def _shared_length(a: tuple[int, ...], b: list[int]) -> int:
    """How many first tokens `a` and `b` have in common."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))
