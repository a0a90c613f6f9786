"""The compiled attention of a batch's decoding rows (textgen/model/compiled_attention.py): one program
attends as the matmuls do for any number of rows and any width, with grouped heads or not; it declines what
it cannot take; a segmented batch decoding through it gets the logits it gets without; where it is used
follows the CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from textgen.engine import batch as batch_module
from textgen.model import attention
from textgen.model.attention import compiled_attention_wins, grouped_matmuls
from textgen.model.compiled_attention import RowsAttention, summed_attention
from textgen.model.native import native_decoding

from .test_segments import Decoder, prompt

Kernels = Callable[[int, int, torch.dtype], RowsAttention]
DIM = 16


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's compile cache: each geometry and dtype compiles once (the tiny GPT-2's and Llama's are
    the ones below in float32)."""
    return tmp_path_factory.mktemp("attention-cache")


@pytest.fixture(scope="module")
def kernels(packages: Path) -> Kernels:
    """RowsAttention for (heads, kv_heads, dtype), compiled once for the module."""
    made: dict[tuple[int, int, torch.dtype], RowsAttention] = {}

    def kernel(heads: int, kv_heads: int, dtype: torch.dtype) -> RowsAttention:
        if (heads, kv_heads, dtype) not in made:
            made[heads, kv_heads, dtype] = RowsAttention(heads, kv_heads, DIM)
            assert made[heads, kv_heads, dtype].compile(dtype, packages), made[heads, kv_heads, dtype].state
        return made[heads, kv_heads, dtype]

    return kernel


def rows_of(rows: int, heads: int, kv_heads: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Queries, keys, values and a mask as a segment has them: left padding, then spare room."""
    query = torch.randn(rows, heads, 1, DIM, dtype=dtype)
    keys, values = (torch.randn(rows, kv_heads, width, DIM, dtype=dtype) for _ in range(2))
    mask = torch.ones(rows, 1, 1, width, dtype=torch.bool)
    mask[0, ..., : width // 3] = False  # the first row's left padding
    mask[..., width - width // 4 :] = False  # spare room
    mask[..., width // 3] = True
    return query, keys, values, mask


@pytest.mark.parametrize(
    "dtype,heads,kv_heads", [(torch.float32, 4, 2), (torch.bfloat16, 4, 4), (torch.float16, 4, 4)]
)
def test_one_program_attends_as_the_matmuls_at_every_size(kernels, dtype, heads, kv_heads):
    """In float16 (float32-int8head's cache) against the matmuls over the same values widened to float32:
    the program widens them as it reads them."""
    torch.manual_seed(0)
    kernel = kernels(heads, kv_heads, dtype)
    tolerance = {torch.bfloat16: 2e-2, torch.float16: 2e-3}.get(dtype, 1e-5)
    for rows, width in ((1, 1), (1, 50), (5, 37), (17, 130)):
        query, keys, values, mask = rows_of(rows, heads, kv_heads, width, dtype)
        ours = kernel.run(query, keys, values, mask, 0.3)
        assert ours is not None and ours.shape == (rows, 1, heads, DIM) and ours.dtype == dtype
        wide = torch.float32 if dtype == torch.float16 else dtype
        reference = grouped_matmuls(query.to(wide), keys.to(wide), values.to(wide), mask, 0.3)
        torch.testing.assert_close(ours.to(wide), reference, atol=tolerance, rtol=tolerance)
    assert kernel.calls == 4


def test_the_query_may_be_a_view_of_the_packed_batch(kernels):
    """The batch's queries are a transposed slice of its packed tokens (attention.segmented_attention): the
    program, which checks no strides, is given them laid out as it was traced."""
    torch.manual_seed(0)
    kernel = kernels(4, 2, torch.float32)
    _, keys, values, mask = rows_of(3, 4, 2, 20, torch.float32)
    # As textgen/model/native.py makes them: queries, keys and values of 3 tokens from one product.
    packed = torch.randn(3, 3, 4, DIM).permute(1, 2, 0, 3)[:1]  # [1, heads, 3 tokens, D]
    view = packed[0, :, 0:3].unflatten(1, (-1, 1)).transpose(0, 1)  # [3 rows, heads, 1, D]
    assert not view.is_contiguous()
    torch.testing.assert_close(
        kernel.run(view, keys, values, mask, 0.3), grouped_matmuls(view.contiguous(), keys, values, mask, 0.3)
    )


def test_it_declines_what_it_cannot_take(kernels):
    kernel = kernels(4, 2, torch.float32)
    query, keys, values, mask = rows_of(2, 4, 2, 20, torch.float32)
    assert kernel.run(query, keys, values, mask, 0.3) is not None
    assert (
        kernel.run(query.repeat(1, 1, 2, 1), keys, values, mask.repeat(1, 1, 2, 1), 0.3) is None
    )  # 2 tokens
    assert kernel.run(query, keys, values, torch.zeros(mask.shape), 0.3) is None  # an additive mask
    assert kernel.run(query.bfloat16(), keys.bfloat16(), values.bfloat16(), mask, 0.3) is None  # its dtype
    strided = keys.transpose(2, 3).contiguous().transpose(2, 3)
    assert kernel.run(query, strided, values, mask, 0.3) is None  # keys laid out otherwise
    assert RowsAttention(4, 2, DIM).run(query, keys, values, mask, 0.3) is None  # not compiled


@torch.inference_mode()
def test_a_segmented_batch_decodes_through_it_with_the_eager_logits(model, packages, monkeypatch):
    """Rows of different lengths in two segments, one joining and one leaving, every step through the
    compiled attention (allowed on any CPU here), against the same batch without it."""
    kernel = native_decoding(model).attention
    assert kernel.compile(torch.float32, packages), kernel.state
    monkeypatch.setattr(attention, "compiled_attention_wins", lambda *args: True)
    monkeypatch.setattr(batch_module, "MERGE_PADDING", 64)  # the long row in a segment of its own
    prompts = {0: prompt(5, 0), 1: prompt(9, 1), 2: prompt(150, 2), 3: prompt(12, 3)}
    try:
        ours = decode(model, prompts)
        assert kernel.calls > 0
        calls, kernel.compiled = kernel.calls, None
        eager = decode(model, prompts)
        assert kernel.calls == calls
    finally:
        kernel.compiled, kernel.state = None, "off"
    assert ours.tokens == eager.tokens
    for row in prompts:
        torch.testing.assert_close(
            torch.stack(ours.logits[row]), torch.stack(eager.logits[row]), rtol=1e-4, atol=1e-4
        )


def decode(model, prompts: dict[int, list[int]]) -> Decoder:  # type: ignore[no-untyped-def]
    decoder = Decoder(model)
    decoder.join([0, 1], [prompts[0], prompts[1]])
    decoder.step(2)
    decoder.join(2, prompts[2])
    assert len(decoder.batch.segments) == 2
    decoder.step(3)
    decoder.join(3, prompts[3])
    decoder.step(3)
    decoder.leave(2)
    decoder.step(2)
    return decoder


def test_where_it_is_used_follows_the_cpu():
    """Measured faster in bfloat16 where it is native without AMX (Zen 4): at every size without grouped
    heads, with them up to GROUPED_POSITIONS rows x columns; never in float32 (a row computes the same alone
    and in a batch there), nor in bfloat16 on AMX or AVX2 CPUs. Over float16 keys and values
    (float32-int8head's cache) wherever the CPU has no float16 arithmetic (AVX512-FP16), whose own float16
    kernels are slow."""
    from tests.test_cpu import MACHINES
    from textgen.model.cpu import detect_cpu

    amx, zen4, zen3 = (detect_cpu(MACHINES[n]) for n in ("sapphire-rapids", "epyc-zen4", "epyc-zen3"))
    skylake = detect_cpu(MACHINES["skylake"])
    f16 = torch.float16
    assert all(compiled_attention_wins(cpu, 32, 12, 12, f16, 160) for cpu in (zen3, zen4, skylake))
    assert compiled_attention_wins(zen3, 1, 12, 12, f16, 1) and compiled_attention_wins(
        zen3, 8, 9, 3, f16, 999
    )
    assert not compiled_attention_wins(amx, 32, 12, 12, f16, 160)  # AVX512-FP16: torch's own kernels
    bf16 = torch.bfloat16
    assert compiled_attention_wins(zen4, 1, 12, 12, bf16, 1)  # compiled for GPT-2 there
    assert compiled_attention_wins(zen4, 64, 12, 12, bf16, 1000)
    assert compiled_attention_wins(zen4, 8, 9, 3, bf16, 160) and compiled_attention_wins(
        zen4, 32, 9, 3, bf16, 64
    )
    assert not compiled_attention_wins(zen4, 32, 9, 3, bf16, 160)
    assert not compiled_attention_wins(zen4, 8, 12, 12, torch.float32, 160)
    assert not any(
        compiled_attention_wins(cpu, 8, 12, 12, dt, 160)
        for cpu in (amx, zen3)
        for dt in (bf16, torch.float32)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_a_lone_rows_summed_attention_is_sdpas(dtype, heads, kv_heads):
    """The same math serves a lone row's compiled step where SDPA is slow (textgen/model/native.py): it
    attends as SDPA does, over the columns up to its position, none of the spare room after it."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    capacity, position, dim = 48, 30, 16
    query = torch.randn(1, heads, 1, dim, dtype=dtype)
    keys, values = (torch.randn(1, kv_heads, capacity, dim, dtype=dtype) for _ in range(2))
    visible = (torch.arange(capacity) <= position).view(1, 1, 1, -1)
    ours = summed_attention(query, keys, values, visible, 0.25)
    reference = F.scaled_dot_product_attention(
        query,
        keys[:, :, : position + 1],
        values[:, :, : position + 1],
        scale=0.25,
        enable_gqa=kv_heads != heads,
    )
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(ours, reference, atol=tolerance, rtol=tolerance)
