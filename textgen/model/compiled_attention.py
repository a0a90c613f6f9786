"""The attention of a batch's decoding rows, compiled ahead of time: one query token per row over its
segment's key and value buffers, as elementwise products and sums in float32 that inductor fuses into loops
over the buffers, with no product kernel at all (`summed_attention`). One program for every number of rows
and every width (both dynamic), per model geometry (heads, key heads, head size) and CPU, cached on disk and
compiled apart as a lone stream's pass is (textgen/model/compiled.py).

Why: a decoding row's attention is a [1, head size] x [head size, width] product per head, too small for a
product kernel to be anything but overhead, and oneDNN keeps a kernel (and ideep its state) for each of
those shapes, which a batch's changing rows and widths keep making (textgen/model/allocator.py). On the Zen 4
EPYC (AVX512_BF16, no AMX), bfloat16, per layer, 2 threads, GPT-2's 12 heads, against the two matmuls
(textgen/model/attention.py `grouped_matmuls`): 32 rows over 160 columns 0.49 against 0.63-0.86 ms (~30
GB/s: it reads the keys and values about once), 8 rows 0.13 against 0.23-0.31, one row over 64 0.023
against 0.10 (SDPA 0.058). In-process, random GPT-2 bfloat16-int8head, alternating runs: 8 streams 472-489
tok/s against 434-471, 32 streams 740-788 against 672-713. Where it wins (grouped heads and float32 differ)
is `compiled_attention_wins` (textgen/model/attention.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.export import Dim

from textgen.model.compiled import AheadOfTime
from textgen.model.cpu import CpuInfo

EXAMPLE_ROWS, EXAMPLE_WIDTH = 3, 37  # traced with: sizes no other dimension has, so both stay symbolic


def summed_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: Any
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v in float32, as elementwise products and sums: query [B, heads, q, D] over keys
    and values [B, kv_heads, C, D] where `visible` [B, 1, q, C] (bool), the heads sharing a key head grouped
    so each key is read once; [B, heads, q, D] in the query's dtype. Compiled, inductor fuses it into loops.
    """
    rows, heads, queries, dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, queries, 1, dim).float()
    scores = (grouped * keys[:, :, None, None].float()).sum(-1) * scale  # [B, KV, group, q, C]
    probs = torch.softmax(scores.masked_fill(~visible[:, :, None], float("-inf")), dim=-1)
    out = (probs[..., None] * values[:, :, None, None].float()).sum(-2)  # [B, KV, group, q, D]
    return out.to(query.dtype).reshape(rows, heads, queries, dim)


class _Rows(torch.nn.Module):
    """`summed_attention` of one query token per row, as a module for torch.export: [B, 1, heads, D] out, as
    textgen/model/attention.py's kernels return it."""

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: Any
    ) -> torch.Tensor:
        return summed_attention(query, keys, values, visible, scale).transpose(1, 2)


class RowsAttention(AheadOfTime):
    """The compiled `summed_attention` of decoding rows for a model's `heads`, `kv_heads` and `head_dim`."""

    kind = "attention"
    about = "the batch's decoding attention"

    def __init__(self, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.calls = 0  # how many times it ran (tests check the path was taken)
        self._scales: dict[float, torch.Tensor] = {}

    def example(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        query = torch.zeros(EXAMPLE_ROWS, self.heads, 1, self.head_dim, dtype=dtype)
        keys = torch.zeros(EXAMPLE_ROWS, self.kv_heads, EXAMPLE_WIDTH, self.head_dim, dtype=dtype)
        visible = torch.ones(EXAMPLE_ROWS, 1, 1, EXAMPLE_WIDTH, dtype=torch.bool)
        return query, keys, keys.clone(), visible, torch.ones(())

    def makings(self, dtype: torch.dtype) -> tuple[dict[str, Any], Iterable[tuple[str, torch.Tensor]]]:
        return {
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype": str(dtype),
        }, ()

    def export(self, dtype: torch.dtype) -> Any:
        rows, width = Dim("rows", min=1), Dim("width", min=1)
        program = torch.export.export(
            _Rows(),
            self.example(dtype),
            dynamic_shapes=({0: rows}, {0: rows, 2: width}, {0: rows, 2: width}, {0: rows, 3: width}, None),
        )
        return program

    def options(self, cpu: CpuInfo, dtype: torch.dtype) -> dict[str, Any]:
        # No weights, so no freezing; one compile job at a time, in this thread (as the step's).
        return {"compile_threads": 1}

    def run(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor | None:
        """The attention [B, 1, heads, D] of `query` [B, heads, 1, D] over `keys` and `values` [B, kv_heads,
        C, D] where `mask` [B, 1, 1, C] (bool), or None: not compiled (yet), or tensors the program cannot
        take. It reads its inputs as laid out when exported and checks none of it (no guards), so: whole
        contiguous tensors of its dtype (the query is made so: it comes as a view of the packed batch)."""
        if (
            self.compiled is None
            or query.shape[2] != 1
            or query.dtype != self.dtype
            or keys.dtype != self.dtype
            or values.dtype != self.dtype
            or mask.dtype != torch.bool
            or not (keys.is_contiguous() and values.is_contiguous() and mask.is_contiguous())
        ):
            return None
        factor = self._scales.get(scale)
        if factor is None:
            factor = self._scales[scale] = torch.tensor(scale, dtype=torch.float32)
        self.calls += 1
        return self.compiled(query.contiguous(), keys, values, mask, factor)
