"""int8 weights: dynamic quantization of every linear layer (activations stay float32).

GPT-2 implements its projections as `Conv1D` (a transposed linear layer), which torch's dynamic
quantization does not recognise, so those are turned into `nn.Linear` first.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def to_linear(module: nn.Module) -> nn.Module:
    """Replace transformers' Conv1D layers with equivalent nn.Linear layers, in place."""
    from transformers.pytorch_utils import Conv1D

    for name, child in module.named_children():
        if isinstance(child, Conv1D):
            linear = nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=child.bias is not None)
            linear.weight.data = child.weight.data.t().contiguous()
            if child.bias is not None:
                linear.bias.data = child.bias.data
            setattr(module, name, linear)
        else:
            to_linear(child)
    return module


def quantize_int8(model: Any) -> Any:
    """Quantize the transformer body's linear layers; the output layer stays in float."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao's eager API still works in 2.13
        warnings.simplefilter("ignore", UserWarning)
        # Per output channel: one scale per row keeps outlier rows from crushing the rest.
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        body = to_linear(model).base_model  # the transformer without its output layer
        torch.ao.quantization.quantize_dynamic(body, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    return model
