"""Decode attention (two matmuls) against transformers' SDPA path, on the shapes a decoding step has."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from textgen.model.attention import decode_attention


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])  # plain and grouped-query attention
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_one_query_token_matches_sdpa(heads, kv_heads, mask_kind):
    torch.manual_seed(0)
    rows, length, dim = 3, 37, 16
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    query = torch.randn(rows, heads, 1, dim)
    key, value = torch.randn(rows, kv_heads, length, dim), torch.randn(rows, kv_heads, length, dim)
    attend = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    attend[0, ..., :5] = False  # left padding
    attend[:, ..., -4:] = False  # spare cache room
    mask = {"bool": attend, "additive": torch.zeros(attend.shape).masked_fill(~attend, -1e9), "none": None}[
        mask_kind
    ]
    ours, _ = decode_attention(module, query, key, value, mask, scaling=0.3)
    reference, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert ours.shape == reference.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_prompts_still_go_to_sdpa():
    torch.manual_seed(0)
    module = types.SimpleNamespace(num_key_value_groups=1, is_causal=True)
    query, key, value = (torch.randn(2, 4, 5, 8) for _ in range(3))
    ours, _ = decode_attention(module, query, key, value, None)
    reference, _ = sdpa_attention_forward(module, query, key, value, None)
    torch.testing.assert_close(ours, reference)


def test_a_model_whose_attention_has_no_layer_index_keeps_its_own_attention():
    """Segments are found by layer index; a model without one keeps its attention (one padded cache)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from textgen.model.attention import decodes_with_segments, use_decode_attention

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    model.transformer.h[1].attn.layer_idx = None
    assert not use_decode_attention(model) and not decodes_with_segments(model)
    model.transformer.h[1].attn.layer_idx = 1
    assert use_decode_attention(model) and decodes_with_segments(model)
