"""int8 weights: every linear layer's weights as int8 rows with one scale each, multiplied by FBGEMM.

A decoding step at small batch reads every weight once to multiply it by a handful of rows, so its time is
the time to stream the weights from memory; int8 halves that against bfloat16. Each output row keeps its own
scale (symmetric, per channel). The product is FBGEMM's dynamic int8 linear (torch's
`quantized::linear_dynamic`, the kernel behind `torch.ao.quantization.quantize_dynamic`): it quantizes the
activations to 8 bits as it goes and multiplies int8 by int8, with VNNI where the CPU has it and AVX2
otherwise. Measured with GPT-2's 49 products cycled as in a decoding step (AVX-512/AMX Xeon, 2 threads):
at 1 row 4.9 ms against 10.2 with torch's weight-only `_weight_int8pack_mm` (this module's kernel before)
and 12.6 with bfloat16 torch.mv; at 8 rows 10.4 against bfloat16 F.linear's 18.1; at 32, 16.9 against 20.4;
with FBGEMM held to its AVX2 kernels (FBGEMM_ENABLE_INSTRUCTIONS=AVX2) 7.6 / 9.4 / 26.0 against float32's
18.2 / 47.7 / 58.8. Quality: bench/results/quality.md.

FBGEMM quantizes a product's activations with one range for all its rows. A row much smaller than the
others would lose precision to them, so with several rows each is first divided by its own largest value
(and the output multiplied back): every row then spans the same range, as if quantized alone. Activations
are 8-bit where FBGEMM multiplies with AVX512-VNNI (SmolLM2's token-by-token perplexity 22.39 against
float32's 22.34) and 7-bit elsewhere (`reduce_range`; 23.67): FBGEMM's AVX2 and plain AVX-512 kernels add
pairs of u8 x s8 products in 16 bits, which 8-bit activations overflow (perplexity 5790).
`activations_need_7_bits` asks the kernel itself rather than the CPU flags.

From DENSE_ROWS rows up (a prompt's prefill, a big mixed step) a plain GEMM is faster than the int8 one
(64 rows: 19.7 ms against bfloat16's 18.8 without the output layer; 512 rows: 108 against 49.5), so each
layer also keeps its weight in the compute dtype: the dtype the model was loaded in, bfloat16 where the CPU
has it natively, float32 elsewhere (textgen/model/formats.py `int8_dense_dtype`).

Where torch has no FBGEMM (ARM builds), the one-row product falls back to `_weight_int8pack_mm` and larger
ones go to the dense copy.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DENSE_ROWS = 64  # from this many rows (tokens) per product, the dense copy is faster
CHUNK_ROWS = 4096  # rows quantized at a time
HAS_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines


def _fbgemm_pack(quantized: torch.Tensor, scales: torch.Tensor) -> Any:
    """FBGEMM's packed form of int8 weights [out, in] with per-row scales (for quantized::linear_dynamic)."""
    zero_points = torch.zeros(quantized.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch 2.13 warns that quantized tensor types will go; FBGEMM's packing still takes one.
        warnings.filterwarnings("ignore", message=".*quantized tensor", category=UserWarning)
        weight = torch._make_per_channel_quantized_tensor(quantized, scales.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(weight, None)


@functools.cache
def activations_need_7_bits() -> bool:
    """FBGEMM's kernel in this process adds pairs of u8 x s8 products in 16 bits (no VNNI, or capped by
    FBGEMM_ENABLE_INSTRUCTIONS), so 8-bit activations would overflow it. Asked with a product that does:
    every weight and activation at its largest, each pair 2 x 255 x 127 = 64770 > 32767."""
    packed = _fbgemm_pack(torch.full((8, 64), 127, dtype=torch.int8), torch.full((8,), 1 / 127))
    out = torch.ops.quantized.linear_dynamic(torch.ones(1, 64), packed, False)
    return not torch.allclose(out, torch.full_like(out, 64.0))


class Int8Linear(nn.Module):
    """y = x Wᵀ + b, with W as int8 rows and one scale per row (plus W dense for large batches)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach()  # [out, in]
        self.out_features, self.in_features = weight.shape
        scales = weight.abs().amax(dim=1).float().clamp(min=1e-12) / 127
        quantized = torch.empty(weight.shape, dtype=torch.int8)
        # In chunks of rows: a float32 copy of GPT-2's whole output layer would be 154 MB.
        for start in range(0, self.out_features, CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            quantized[rows] = torch.round(weight[rows].float() / scales[rows, None]).clamp(-127, 127)
        compute = weight.dtype
        if HAS_FBGEMM:
            self.packed = _fbgemm_pack(quantized, scales)  # FBGEMM's own copy: the int8 tensor can go
            self.reduce_range = activations_need_7_bits()
        else:
            self.register_buffer("weight_int8", quantized)
            self.register_buffer("scales", scales.to(compute))  # _weight_int8pack_mm: the activations' dtype
        self.register_buffer("weight_dense", weight.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, for model code that reads a layer's `.weight` (T5 casts to its dtype)."""
        return self.weight_dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if rows >= DENSE_ROWS or (rows > 1 and not HAS_FBGEMM):
            out = F.linear(flat, self.weight_dense, self.bias)
        else:
            out = self._int8_product(flat)
            if self.bias is not None:
                out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _int8_product(self, flat: torch.Tensor) -> torch.Tensor:
        if not HAS_FBGEMM:
            return torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        activations, peaks = flat.float(), None
        if flat.shape[0] > 1:  # every row on the same range: each quantized as finely as it would be alone
            peaks = activations.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
            activations = activations / peaks
        out = torch.ops.quantized.linear_dynamic(activations, self.packed, self.reduce_range)
        return (out if peaks is None else out * peaks).to(flat.dtype)


def quantize_int8(model: Any) -> Any:
    """Replace the linear layers of a model (GPT-2's Conv1D included) with Int8Linear, in place."""
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):  # a transposed linear layer: weight is [in, out]
                setattr(module, name, Int8Linear(child.weight.t(), child.bias))
            elif isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight, child.bias))
    return model
