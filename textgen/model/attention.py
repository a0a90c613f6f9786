"""Attention for decoding steps: one query token per row, computed with two plain matmuls.

PyTorch's CPU `scaled_dot_product_attention` runs a flash kernel built for long queries; with the single
query of a decoding step it is slow: measured here on GPT-2's shapes (12 heads of 64), 2.9 ms per layer for
32 rows of 160 cached tokens against 0.36 ms for `softmax(q @ kᵀ) @ v`. At batch 32 SDPA took almost half of
every decoding step. Prefill (many query tokens) still goes to SDPA, which is good at that.

Registered with transformers' AttentionInterface as "textgen", so the model's own attention modules call it;
masks are built exactly as for "sdpa". Scores are taken in the model's dtype and the softmax in float32.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

NAME = "textgen"


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Same contract as transformers' sdpa_attention_forward: [B, H, q, D] in, [B, q, H, D] out."""
    if query.shape[2] != 1 or kwargs.get("position_bias") is not None or dropout:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # Grouped-query attention: the query heads that share a key/value head become that head's query rows,
    # so keys and values are read once and never repeated.
    query = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scale = scaling if scaling is not None else dim**-0.5
    scores = torch.matmul(query * scale, key.transpose(-1, -2))  # [B, KV, group, L]
    if attention_mask is not None:
        if attention_mask.shape[1] != 1:  # one mask per query head: group it like the queries
            attention_mask = attention_mask.reshape(rows, kv_heads, heads // kv_heads, -1)
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, KV, group, D]
    return out.reshape(rows, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_decode_attention(model: Any) -> bool:
    """Switch a decoder-only model to decode_attention; keep its own attention if it cannot take it."""
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError, AttributeError) as exc:
        log.info("keeping %s's own attention: %s", type(model).__name__, exc)
        return False
    return True
