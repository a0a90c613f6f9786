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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("rows", [1, 3])
def test_both_kernels_attend_alike(dtype, heads, kv_heads, rows):
    """The grouped matmuls and torch's SDPA, each of which serves some CPUs and shapes (`sdpa_wins`), give
    the same attention on this machine, in both dtypes that decode."""
    import torch.nn.functional as F

    from textgen.model.attention import grouped_matmuls

    torch.manual_seed(0)
    length, dim = 41, 16
    query = torch.randn(rows, heads, 1, dim, dtype=dtype)
    key, value = (torch.randn(rows, kv_heads, length, dim, dtype=dtype) for _ in range(2))
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    mask[:, ..., -6:] = False  # spare cache room
    ours = grouped_matmuls(query, key, value, mask, 0.25)
    reference = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=0.25, enable_gqa=kv_heads != heads
    ).transpose(1, 2)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(ours, reference, atol=tolerance, rtol=tolerance)


def test_the_attention_kernel_follows_the_cpu():
    """SDPA's bfloat16 flash kernel is fast only on AMX (measured: 4-6x slower than the matmuls on a Zen 4
    EPYC at 32 rows); one row over few columns goes to SDPA everywhere, in float32 as before."""
    from tests.test_cpu import MACHINES
    from textgen.model.attention import sdpa_wins
    from textgen.model.cpu import detect_cpu

    amx, zen4, zen3 = (detect_cpu(MACHINES[n]) for n in ("sapphire-rapids", "epyc-zen4", "epyc-zen3"))
    bf16, f32 = torch.bfloat16, torch.float32
    # bfloat16 batches: SDPA only where AMX runs it; with GQA the matmuls everywhere (keys read once).
    assert sdpa_wins(amx, 32, 12, 12, bf16, 160)
    assert not any(sdpa_wins(cpu, 32, 12, 12, bf16, 160) for cpu in (zen4, zen3))
    assert not any(sdpa_wins(cpu, 32, 9, 3, bf16, 160) for cpu in (amx, zen4, zen3))
    # One row: SDPA everywhere over few columns; in bfloat16 without AMX not over many, nor compiled.
    assert all(sdpa_wins(cpu, 1, 12, 12, dt, 64) for cpu in (amx, zen4, zen3) for dt in (bf16, f32))
    assert sdpa_wins(amx, 1, 12, 12, bf16, 512) and sdpa_wins(amx, 1, 12, 12, bf16, None)
    assert not sdpa_wins(zen4, 1, 12, 12, bf16, 512) and not sdpa_wins(zen4, 1, 12, 12, bf16, None)
    assert sdpa_wins(zen4, 1, 12, 12, f32, 512) and sdpa_wins(zen4, 1, 12, 12, f32, None)
    # float32 batches: the matmuls, on every CPU.
    assert not any(sdpa_wins(cpu, 32, 12, 12, f32, 160) for cpu in (amx, zen4, zen3))


@pytest.mark.parametrize("machine", ["epyc-zen3", "sapphire-rapids"])
def test_float16_keys_reach_torchs_float16_kernels_only_where_the_cpu_has_float16_arithmetic(
    machine, monkeypatch
):
    """float32-int8head's cache stores keys and values in float16. Without AVX512-FP16 torch's float16 SDPA
    computes one element at a time (an AVX2 EPYC: 5-14x its float32 time), so before the compiled kernel is
    there (or where there is none) they are widened to float32; with it, SDPA takes them as stored. Either
    way the attention is the float32 one over the stored values."""
    import torch.nn.functional as F

    from tests.test_cpu import MACHINES
    from textgen.model import attention
    from textgen.model.cpu import detect_cpu

    monkeypatch.setattr(attention, "this_cpu", lambda: detect_cpu(MACHINES[machine]))
    seen: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def spied(query, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(query.dtype)
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spied)
    torch.manual_seed(0)
    for rows, width in ((1, 40), (5, 40)):
        query = torch.randn(rows, 4, 1, 16)
        key, value = (torch.randn(rows, 4, width, 16).half() for _ in range(2))
        mask = torch.ones(rows, 1, 1, width, dtype=torch.bool)
        mask[0, ..., :7] = False
        ours = attention._attend(query, key, value, mask, 0.25)
        reference = sdpa(query, key.float(), value.float(), attn_mask=mask, scale=0.25).transpose(1, 2)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, reference, atol=2e-3, rtol=2e-3)
    wanted = torch.float32 if machine == "epyc-zen3" else torch.float16
    assert seen and set(seen) == {wanted}  # (five rows of float32 go to the matmuls)
