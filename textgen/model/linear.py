"""Dense projections laid out for CPU kernels, with single-row products as matrix-vector products.

GPT-2 stores its projections as transformers' Conv1D, weight [in, out]. Every projection here becomes a
plain `Linear` with weight [out, in] (nn.Linear's layout): oneDNN's bfloat16 kernels multiply that layout
much faster (on an AVX-512/AMX Xeon a decoding step took 12.3 ms instead of 17.3 at batch 1, 39 instead of
48 at batch 32), and on an AVX2-only EPYC the [in, out] layout cost 29 ms of a 54 ms float32 step (issue
#12).

In bfloat16, a product with one row (a single stream's decoding step) goes to `torch.mv`: measured on the
AVX-512/AMX Xeon with GPT-2's shapes, F.linear reads the weights at about 15 GB/s at one row while torch.mv
reads them at about 25, and a whole decoding step took 17.9 ms instead of 22.3. In float32 the two were
equal (23.7 and 24.1 ms), so float32 keeps F.linear at every batch size, and with it the exact batch
invariance its tests check (a row computes the same thing alone and in a batch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x Wᵀ + b with W [out, in]; one-row products as W·x when `gemv` (bfloat16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gemv: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = (
            weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.gemv = gemv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv and x.numel() == self.in_features:
            out = torch.mv(self.weight, x.reshape(-1))
            if self.bias is not None:
                out += self.bias
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_linear(model: Any) -> Any:
    """Replace the model's Conv1D and nn.Linear layers with Linear, in place (tied weights stay tied)."""
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):  # a transposed linear layer: weight is [in, out]
                weight = child.weight.detach().t().contiguous()
                setattr(module, name, Linear(weight, child.bias, gemv=weight.dtype == torch.bfloat16))
            elif isinstance(child, nn.Linear):
                gemv = child.weight.dtype == torch.bfloat16
                setattr(module, name, Linear(child.weight, child.bias, gemv=gemv))
    return model
