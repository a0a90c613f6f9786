"""Attention for decoding steps: one query token per row (or a few drafted ones, or a prompt's chunk).

Which kernel depends on the CPU and the shape (`sdpa_wins`, `compiled_attention_wins`, measured): torch's
`scaled_dot_product_attention` (its CPU flash kernel), `softmax(q @ kᵀ) @ v` with the query heads that
share a key head stacked, so keys and values are read once, or, for decoding rows of a model with textgen's
own pass, the same as elementwise products and sums compiled ahead of time (textgen/model/
compiled_attention.py). Prefill (many query tokens) goes to transformers' SDPA path.

Registered with transformers' AttentionInterface as "textgen", so the model's own attention modules call it;
masks are built exactly as for "sdpa". The matmul path takes scores in the model's dtype and the softmax
in float32.

It also takes textgen's running batch in segments (`kv_segments`, textgen/engine/batch.py): rows of very
different lengths are kept in separate left-padded caches, and each segment's rows attend over that
segment's width only, in the same forward pass (a decoding step, or a few drafted tokens to verify).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from textgen.model.compiled_attention import RowsAttention
from textgen.model.cpu import CpuInfo, this_cpu

log = logging.getLogger(__name__)

NAME = "textgen"
GROUPED_POSITIONS = 3072  # grouped heads: the compiled attention wins up to this many rows x columns


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    kv_segments: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Same contract as transformers' sdpa_attention_forward: [B, H, q, D] in, [B, q, H, D] out.

    `kv_segments` (a forward pass of textgen's batch, textgen/engine/kv_cache.py): the tokens come packed in
    one sequence [1, H, T, D], in parts of different widths, each with its own keys, values and mask;
    `kv_segments.parts(layer)` lists them as (first token, end token, tokens per row, keys [rows, KV, C, D],
    values, bool mask [rows, 1, q, C]). Each part attends over its own width only: short rows never read a
    long row's padding, and a chunk of a prompt being computed shares the pass with the decoding rows.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kv_segments is not None:
        return segmented_attention(query, kv_segments, module.layer_idx, scale), None
    if query.shape[2] != 1 or kwargs.get("position_bias") is not None or dropout:
        computed = query.dtype
        query, attention_mask = _as_stored(query, key, attention_mask)
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out.to(computed), None
    return _attend(query, key, value, attention_mask, scale), None


def segmented_attention(
    query: torch.Tensor,
    kv_segments: Any,
    layer: int,
    scale: float,
    rows_kernel: RowsAttention | None = None,
) -> torch.Tensor:
    """The packed tokens' queries [1, H, T, D] attend, each part over its own keys and values at `layer`
    (`kv_segments.parts`); returns [1, T, H, D]. `rows_kernel`: the model's compiled attention of decoding
    rows (textgen/model/compiled_attention.py RowsAttention), for the parts where it wins."""
    outs = []
    for start, stop, queries, keys, values, mask in kv_segments.parts(layer):
        part = query[0, :, start:stop].unflatten(1, (-1, queries)).transpose(0, 1)  # [rows, H, q, D]
        outs.append(_attend(part, keys, values, mask, scale, rows_kernel).flatten(0, 1))  # [rows * q, H, D]
    return (outs[0] if len(outs) == 1 else torch.cat(outs))[None]


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    rows_kernel: RowsAttention | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ) v for a few query tokens per row; mask [B, 1, q, L], bool or additive. [B, q, H, D],
    in the queries' dtype, whatever the cache stores keys and values in (`cache_dtype`)."""
    if key.dtype != query.dtype:
        computed = query.dtype
        narrow, narrow_mask = _as_stored(query, key, mask)
        out = _compiled_rows(rows_kernel, narrow, key, value, narrow_mask, scale)
        if out is None and key.dtype == torch.float16 and not this_cpu().native_fp16:
            # torch's float16 kernels compute one element at a time without AVX512-FP16 (`sdpa_wins`): the
            # keys and values widened to float32 first (until the compiled kernel is there, or where none is).
            return _attend(query, key.to(computed), value.to(computed), mask, scale)
        if out is None:
            out = _attend(narrow, key, value, narrow_mask, scale)
        return out.to(computed)
    out = _compiled_rows(rows_kernel, query, key, value, mask, scale)
    if out is not None:
        return out
    rows, heads = query.shape[:2]
    if sdpa_wins(this_cpu(), rows, heads, key.shape[1], query.dtype, key.shape[2]):
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale, enable_gqa=key.shape[1] != heads
        )
        return out.transpose(1, 2)
    return grouped_matmuls(query, key, value, mask, scale)


def _compiled_rows(
    rows_kernel: RowsAttention | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor | None:
    """`_attend` by the compiled attention of decoding rows where it is compiled and wins, else None."""
    rows, heads = query.shape[:2]
    if (
        rows_kernel is None
        or mask is None
        or query.shape[2] != 1
        or not compiled_attention_wins(this_cpu(), rows, heads, key.shape[1], query.dtype, key.shape[2])
    ):
        return None
    return rows_kernel.run(query, key, value, mask, scale)


def grouped_matmuls(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """`_attend` as two matmuls: the query heads that share a key/value head become that head's query rows
    (grouped-query attention), so keys and values are read once and never repeated. Scores in the model's
    dtype, the softmax in float32."""
    rows, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    grouped = query.reshape(rows, kv_heads, group * queries, dim)
    scores = torch.matmul(grouped * scale, key.transpose(-1, -2))  # [B, KV, group * q, L]
    if mask is not None:
        scores = scores.view(rows, kv_heads, group, queries, -1)
        mask = mask[:, :, None]  # [B, 1, 1, q, L]: the same for every head
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
        scores = scores.view(rows, kv_heads, group * queries, -1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, KV, group * q, D]
    return out.reshape(rows, heads, queries, dim).transpose(1, 2)


def _as_stored(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The queries, and an additive mask, in the dtype the cache stores keys in (`cache_dtype`): torch's
    attention kernels take one dtype; they widen what they read to float32 and add in it."""
    if mask is not None and mask.is_floating_point():
        mask = mask.to(key.dtype)
    return query.to(key.dtype), mask


def sdpa_wins(
    cpu: CpuInfo, rows: int, heads: int, kv_heads: int, dtype: torch.dtype, width: int | None
) -> bool:
    """Whether torch's SDPA is the faster kernel for `rows` query tokens of `heads` heads over `width` cached
    columns of `kv_heads` heads on `cpu`, rather than `grouped_matmuls`. `width` None: a lone row's compiled
    pass (textgen/model/native.py `_attend_lone`), whose program takes any width.

    torch 2.13, per layer, 2 threads. On the AMX Xeon: at one row (one stream, or one long prompt's chunk)
    SDPA is 2.5-5x faster (64 cached tokens: 21 against 104 us in bfloat16, 15 against 47 in float32; GQA
    alike); in bfloat16 without GQA faster at every size (32 rows of 160: 0.78 against 1.11 ms; 16 of 1000:
    1.5 against 2.9). With GQA at many rows the grouped matmuls read each key once and win (32 rows of 160:
    0.38 against 0.45 ms), as do plain float32 ones (16 rows of 1000: 4.2 against 4.6 ms).
    Without AMX its bfloat16 flash kernel is slow: on the Zen 4 EPYC (AVX512_BF16), GPT-2's 12 heads, SDPA
    against the matmuls: 32 rows of 160 4.14 against 0.78 ms (at 32 clients it was 55% of the step), 8 of
    160 0.94 against 0.30, 1 of 512 0.37 against 0.19; only one row over few columns is faster (1 of 48:
    0.059 against 0.115; of 160 0.126 against 0.134); SmolLM2's GQA (9 heads, 3 key heads) alike. float32
    there as on the Xeon (1 of 160: 0.024 against 0.055; 32 of 160: 1.27 against 0.87). A lone row's
    compiled step is faster without SDPA there at every width (textgen/model/native.py `_summed_attention`).
    """
    if dtype == torch.bfloat16 and cpu.bf16_unit != "AMX":
        return rows == 1 and width is not None and width <= 160
    if dtype == torch.float16:
        # Keys and values stored in float16 (`cache_dtype`). Where the CPU has float16 arithmetic
        # (AVX512-FP16: the AMX Xeon, whose float16 kernels stayed fast under AVX2 caps), torch's float16
        # matmuls are slow and its SDPA is not (GPT-2's 12 layers, 32 rows of 160 columns: the grouped
        # matmuls 72 ms against 26 in float32; SDPA 21 against float32's 23). Without it (an AVX2 EPYC, Zen 3,
        # per layer) SDPA in float16 is slow too, 14.8 ms against 2.7 in float32 at 32 rows of 160, 0.49
        # against 0.07 at one row: `_attend` takes the compiled kernel or widens to float32 before it gets
        # here. A lone row's compiled pass takes the elementwise products and sums, which inductor fuses with
        # the widening to float32: its program 14.2-15.9 ms a token in four runs against 16.5 in one with SDPA
        # (random GPT-2, AVX2 caps on the AMX Xeon).
        return width is not None
    return rows == 1 or (kv_heads == heads and dtype == torch.bfloat16)


def compiled_attention_wins(
    cpu: CpuInfo, rows: int, heads: int, kv_heads: int, dtype: torch.dtype, width: int
) -> bool:
    """Whether the compiled attention of decoding rows (textgen/model/compiled_attention.py) beats the
    kernels above for `rows` rows of one query token over `width` columns (with 1 and 1: whether to compile
    it at all).

    Measured on the Zen 4 EPYC (AVX512_BF16 without AMX), in bfloat16, per layer, against the matmuls: GPT-2's
    12 heads at every size (1 row of 400 0.067 against 0.16 ms, 8 of 100 0.11 against 0.25, 32 of 400 1.23
    against 1.88, 64 of 1000 8.1 against 9.7); SmolLM2's grouped heads (9 over 3), whose matmuls read a key
    once for 3 query heads, up to about 3000 cached positions in all (8 of 400 0.28 against 0.32, 32 of 64
    0.20 against 0.38; 12 of 400 0.40 against 0.31, 24 of 160 0.34 against 0.30). Not float32, which
    promises a row computes the same alone and in a batch (and where the matmuls read as fast: 32 rows of
    160 0.87 against 0.96 ms), and not on AMX, where it gained nothing: on an Intel Xeon (family 6 model
    167), random GPT-2 bfloat16-int8head in-process, W's sampled streams, two pairs of processes, 32 streams
    949-950 tok/s compiled against 915-948, 8 streams 459-474 against 463-465.
    Keys and values stored in float16 (float32-int8head's cache) wherever the CPU has no float16 arithmetic
    (`CpuInfo.native_fp16`), whose own float16 kernels are slow there: on an AVX2 EPYC (Zen 3), GPT-2's 12
    heads, per layer, against SDPA in float16 and in float32 over the same keys widened (and before the
    widening's own cost): 32 rows of 160 2.3 against 14.8 and 2.9 ms, 64 rows of 160 3.1 against 29.6 and
    4.9, 8 of 160 0.36 against 3.7 and 0.28, one of 160 0.13 against 0.49 and 0.07 (torch.compile's
    program: its call costs more than AOTInductor's).
    """
    if dtype == torch.float16:
        return not cpu.native_fp16
    if dtype != torch.bfloat16 or cpu.bf16_unit != "AVX512_BF16" or cpu.raw_isa_class == "amx":
        return False
    return kv_heads == heads or rows * width <= GROUPED_POSITIONS


def cache_dtype(model: Any) -> torch.dtype | None:
    """What textgen's KV cache stores `model`'s keys and values in, if not the dtype they are computed in
    (None): its format's choice (`store_keys_as`), where the model decodes with textgen's attention, which
    reads them in that dtype."""
    return getattr(model, _CACHE_DTYPE, None)


def kv_dtype(model: Any) -> torch.dtype:
    """What the KV cache of `model` holds keys and values in: its cache's own dtype (`cache_dtype`), else the
    dtype the model computes in (int8 weights compute in their dense copy's)."""
    return cache_dtype(model) or getattr(model, "dtype", None) or torch.float32


def store_keys_as(model: Any, dtype: torch.dtype | None) -> bool:
    """Have textgen's KV cache store `model`'s keys and values in `dtype` (None: as computed), where the model
    can decode with textgen's attention (switched to it here: `use_decode_attention`); whether it was set."""
    if dtype is None or not use_decode_attention(model):
        return False
    setattr(model, _CACHE_DTYPE, dtype)
    return True


_CACHE_DTYPE = "textgen_cache_dtype"


def decodes_with_segments(model: Any) -> bool:
    """Whether the model's attention is decode_attention, which takes a batch in segments."""
    return getattr(model.config, "_attn_implementation", None) == NAME


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_decode_attention(model: Any) -> bool:
    """Switch a decoder-only model to decode_attention; keep its own attention if it cannot take it."""
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    # The batch's segments are found by each attention module's layer index (`kv_segments.parts`).
    unindexed = [
        type(m).__name__
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and getattr(m, "layer_idx", None) is None
    ]
    if unindexed:
        log.info("keeping %s's own attention: %s has no layer index", type(model).__name__, unindexed[0])
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError, AttributeError) as exc:
        log.info("keeping %s's own attention: %s", type(model).__name__, exc)
        return False
    return True
