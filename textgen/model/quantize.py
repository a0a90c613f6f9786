"""int8 weights: weight-only quantization of every linear layer, activations in the model's compute dtype.

A decoding step at small batch reads every weight once to multiply it by a handful of rows, so its time is
the time to stream the weights from memory; int8 halves that against bfloat16. Each output row keeps its own
scale (symmetric, per channel), which costs far less quality than quantizing activations too (measured on
SmolLM2 in bench/results/quality.md). The matrix product is torch's `_weight_int8pack_mm`, which dequantizes
inside the kernel.

Beyond one row the same kernel loses to a dense GEMM, so each layer also keeps its weight in the compute dtype
and uses it from DENSE_ROWS rows up. Measured on an AVX-512/AMX Xeon on GPT-2 (a whole decoding step): at
1 row 16.6 ms with int8 against 17.8 in bfloat16 (itself a matrix-vector product, textgen/model/linear.py),
but at 8 rows 35.9 against 27.4, and at 32 rows the dense path takes 38.6 either way. (An earlier version,
before bfloat16 single rows went through torch.mv, measured int8 ahead up to 11 rows.)

The compute dtype is the dtype the model was loaded in: bfloat16 where the CPU has it natively, float32
elsewhere (textgen/model/formats.py `int8_dense_dtype`), since emulated bfloat16 GEMM is 8x slower than float32
on an AVX2-only CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DENSE_ROWS = 2  # from this many rows (tokens) per product, the dense copy is faster
CHUNK_ROWS = 4096  # rows quantized at a time


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
        self.register_buffer("weight_int8", quantized)
        compute = weight.dtype  # _weight_int8pack_mm wants scales in the activations' dtype
        self.register_buffer("scales", scales.to(compute))
        self.register_buffer("weight_dense", weight.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, for model code that reads a layer's `.weight` (T5 casts to its dtype)."""
        return self.weight_dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] >= DENSE_ROWS:
            out = F.linear(flat, self.weight_dense, self.bias)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
            if self.bias is not None:
                out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


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
