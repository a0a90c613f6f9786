"""Dense projections laid out for CPU kernels: bfloat16 weights packed once for oneDNN.

GPT-2 stores its projections as transformers' Conv1D, weight [in, out]. Every projection here becomes a
plain `Linear` with weight [out, in] (nn.Linear's layout): oneDNN's bfloat16 kernels multiply that layout
much faster (on an AVX-512/AMX Xeon a decoding step took 12.3 ms instead of 17.3 at batch 1, 39 instead of
48 at batch 32), and on an AVX2-only EPYC the [in, out] layout cost 29 ms of a 54 ms float32 step (issue
#12).

In bfloat16, F.linear hands oneDNN a plain weight, which it re-lays into its blocked format at every call.
Where oneDNN computes bfloat16 (`torch.ops.mkldnn._is_mkldnn_bf16_supported`: AVX-512 and up), the weight
is re-laid once at load (`_reorder_linear_weight`, the packing torch.compile's freezing does) and every
product calls `_linear_pointwise` on it. Measured on the AVX-512/AMX Xeon with GPT-2's 48 block products:
at 1 row 12.4-12.6 ms against F.linear's 17.5-17.9 and torch.mv's 12.2-13.4 (this module's one-row kernel
before); at 2-32 rows 11.6-14.8 against 17.5-22.2; at 128-256 rows 22-35 against 32-44. The packed weight
replaces the plain one: no second copy. Elsewhere a one-row bfloat16 product goes to torch.mv (F.linear read
the weights at ~15 GB/s at one row on that Xeon, torch.mv at ~25).

float32 keeps F.linear at every batch size, and with it the exact batch invariance its tests check (a row
computes the same thing alone and in a batch): on the AMX Xeon the packed kernel lost at one row (20.2
against 16.5 ms) and F.linear and torch.mv were equal. TEXTGEN_DTYPE=float32-packed packs float32 weights
for oneDNN too (`pack_float32`), and so does float32-int8head (`auto` there) on AMD CPUs, where F.linear's
float32 GEMM (oneMKL's) is slow (textgen/model/formats.py packs_float32); oneDNN picks its kernel by the
number of rows, so a row's last bits can differ between batch sizes (GPT-2's [768, 3072] product: at every
size from 2 rows).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from textgen.model import float16_op


@functools.cache
def onednn_bfloat16() -> bool:
    """Whether oneDNN computes bfloat16 on this CPU (AVX-512 BW/VL/DQ at least; AVX512_BF16/AMX natively)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Up to this many rows a plain bfloat16 weight multiplies as W·xᵀ (Linear.forward): the most measured.
TRANSPOSED_ROWS = 96


@functools.cache
def fbgemm_float16() -> bool:
    """Whether torch has FBGEMM's float16-weight products (x86 builds; FBGEMM itself needs AVX2).

    Linear holds them by a tensor handle (`_quantized.wrapped_fbgemm_pack_gemm_matrix_fp16`), the one form a
    compiled program can take (quantized::linear_dynamic_fp16 takes an object, not a tensor), and multiplies
    with textgen::float16_linear (textgen/model/float16_op.py: every thread) or, until it is built, torch's
    op on the handle (one thread). torch 2.13 calls its handle ops deprecated, in two log lines printed once
    per process."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class Linear(nn.Module):
    """y = x Wᵀ + b with W [out, in]. bfloat16: W packed for oneDNN where it can, else one-row products as W·x
    and products of a few rows as W·xᵀ (a weight left plain: the output layer tied to the embeddings).
    float32: F.linear, or W packed for oneDNN with `pack_float32`, or W rounded to float16 and packed for
    FBGEMM with `float16` (the arithmetic stays float32).

    A packed weight is opaque (oneDNN's tensor, FBGEMM's behind its handle): `weight` still answers its dtype
    and shape (model code reads them), but not its values.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        pack: bool = True,
        pack_float32: bool = False,
        float16: bool = False,
    ) -> None:
        """`pack`: the weight may be packed (not when it is also the input embeddings); `pack_float32`: a
        float32 weight is packed too (TEXTGEN_DTYPE=float32-packed); `float16`: a float32 weight is kept in
        float16 for FBGEMM's products instead (TEXTGEN_DTYPE=float16-int8head)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # FBGEMM's float16 products: W is widened to float32 in registers (F16C) as it is read, so a product
        # streams half of float32's bytes and computes float32's way. On an AVX2 AMD EPYC (Zen 3, 2 threads,
        # GPT-2's 48 block products from memory, session 45) they beat oneDNN's packed float32 kernel at
        # every size: 1 row 10.5 against 20.4 ms, 8 rows 16.2 against 29.9, 32 rows 53.6 against 63.0, 256
        # rows 289 against 320 (FBGEMM on both threads: textgen/model/float16_op.py). W's float16 copy is
        # FBGEMM's own, held by `float16`, a uint8 tensor of a few bytes (torch's handle to it: a tensor,
        # unlike linear_prepack_fp16's object, so the compiled pass takes it as an input,
        # textgen/model/compiled.py); the float32 tensor goes.
        self.float16: torch.Tensor | None = None
        self.activation: tuple[str, list[Any], str] = ("none", [], "")  # oneDNN's, applied to the output
        if float16 and pack and weight.dtype == torch.float32 and fbgemm_float16():
            self.float16 = torch.ops._quantized.wrapped_fbgemm_pack_gemm_matrix_fp16(
                weight.detach().contiguous()
            )
            self.weight = torch.zeros((), dtype=weight.dtype).expand(weight.shape)  # dtype and shape only
            self.packed = self.gemv = self.transposed = False
            return
        bfloat16 = weight.dtype == torch.bfloat16
        float32 = weight.dtype == torch.float32 and pack_float32 and torch.backends.mkldnn.is_available()
        self.packed = pack and (bfloat16 and onednn_bfloat16() or float32)
        self.gemv = bfloat16 and not self.packed
        self.transposed = self.gemv and onednn_bfloat16()  # a few rows as W·xᵀ (forward)
        if self.packed:
            # bfloat16: one row is the common call (a single stream's step); a layout for it measured 1-14%
            # faster than the generic one at 1-64 rows, 8-10% slower at 128-256, faster at 512 (one noisy
            # run). float32: a layout for 32 rows was as fast or faster at every size (Zen 4, GPT-2's block
            # products: 1 row 0.81 against 0.98 ms, 32 rows 2.45 against 3.03, 128 rows 8.6 against 9.5).
            rows = 1 if bfloat16 else 32
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)
        elif isinstance(weight, nn.Parameter):
            self.weight = weight
        else:
            self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float16 is not None:
            flat = x.reshape(-1, self.in_features)
            if float16_op.loaded():  # every thread
                out = torch.ops.textgen.float16_linear(flat, self.float16, self.bias, self.out_features)
            else:  # one thread, until textgen's op is built (textgen/model/float16_op.py)
                out = torch.ops._quantized.wrapped_fbgemm_linear_fp16_weight(
                    flat, self.float16, self.bias, self.out_features
                )
            return out.view(*x.shape[:-1], self.out_features)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, *self.activation)
        if self.gemv and x.numel() == self.in_features:
            out = torch.mv(self.weight, x.reshape(-1))
            if self.bias is not None:
                out += self.bias
            return out.view(*x.shape[:-1], self.out_features)
        rows = x.numel() // self.in_features
        if self.transposed and rows <= TRANSPOSED_ROWS:
            # W·xᵀ, transposed back: oneDNN streams the plain weight as it lies, where F.linear (x·Wᵀ) re-lays
            # all of it at every call. GPT-2's tied output layer (77 MB, not packed) on the AMX Xeon, alone:
            # 2.1-2.6 against 3.6 ms at 2-16 rows, the same values; in the batch's decoding step (interleaved
            # A/B) 1.3-2.4 ms less a step at every size from 2 to 96 rows.
            out = torch.matmul(self.weight, x.reshape(rows, -1).t()).t().contiguous()
            if self.bias is not None:
                out += self.bias
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def replace_projections(
    model: Any, make: Callable[[nn.Module, torch.Tensor, torch.Tensor | None, bool], nn.Module]
) -> None:
    """Replace every Conv1D and nn.Linear layer of `model`, in place, by make(layer, weight [out, in], bias,
    pack). `pack` is False for a layer whose weight is also the input embeddings (GPT-2's tied output layer):
    the embedding lookup reads its values, and a packed copy would cost the matrix again."""
    from transformers.pytorch_utils import Conv1D

    embeddings = getattr(model.get_input_embeddings(), "weight", None)  # none where the lookup is int8
    # The layers' places, not the layers: a list of the layers themselves would keep every replaced weight
    # alive until the last is replaced, all of them at once beside their new layouts (random GPT-2 in
    # float32: +324 MB at the peak of loading). Replaced one by one, each old weight goes as the next comes.
    places = [
        (module, name)
        for module in model.modules()
        for name, child in module.named_children()
        if isinstance(child, (Conv1D, nn.Linear))
    ]
    for module, name in places:
        child = getattr(module, name)
        if isinstance(child, Conv1D):  # a transposed linear layer: weight is [in, out]
            weight = child.weight.detach().t()  # a view: each maker lays it out as it needs
        else:
            weight = child.weight
        pack = child.weight is not embeddings
        setattr(module, name, make(child, weight, child.bias, pack))
        del child, weight


def use_linear(model: Any, pack_float32: bool = False, float16: bool = False) -> Any:
    """Replace the model's Conv1D and nn.Linear layers with Linear, in place (tied weights stay tied, but for
    `pack_float32`).

    `float16`: float32 weights are kept in float16 for FBGEMM's products (Linear), but for one that is also
    the input embeddings (the lookup reads its values).

    `pack_float32`: float32 weights are packed for oneDNN too (TEXTGEN_DTYPE=float32-packed), the output
    layer tied to the embeddings included, as a copy of its own: GPT-2's float32 output layer (154 MB) took
    10.0-10.3 ms at one row and 36 at 32 rows through F.linear, 4.1-4.7 and 12.6-15.2 packed (Zen 4, with its
    AVX-512 and capped to AVX2), the most of any product in a float32 step, for the matrix's bytes again in
    memory."""

    def make(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> Linear:
        return Linear(weight, bias, pack=pack or pack_float32, pack_float32=pack_float32, float16=float16)

    replace_projections(model, make)
    return fuse_activations(model)


# transformers' MLPs whose first product goes through an activation and nothing else: (product, activation)
ACTIVATED = {"GPT2MLP": ("c_fc", "act"), "LlamaMLP": ("gate_proj", "act_fn")}
# transformers' activation modules that oneDNN applies to a product's output as it writes it:
# `_linear_pointwise`'s (attr, scalars, algorithm)
ONEDNN_ACTIVATIONS = {
    "NewGELUActivation": ("gelu", [], "tanh"),
    "GELUTanh": ("gelu", [], "tanh"),
    "GELUActivation": ("gelu", [], "none"),
    "SiLUActivation": ("swish", [], ""),
    "SiLU": ("swish", [], ""),
    "ReLU": ("relu", [], ""),
}


class TanhGELU(nn.Module):
    """GPT-2's tanh GELU (transformers' NewGELUActivation) as torch's one kernel (F.gelu's tanh
    approximation): the same function, within 2.4e-7 of NewGELUActivation's seven elementwise ops, each of
    which reads and writes the [tokens, 3072] activations. AMD EPYC Zen 3, 2 threads, per call: 32 rows 224
    against 493 µs, 8 rows 57 against 204, 1 row 18 against 105 (session 47); twelve calls a pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def fuse_activations(model: Any) -> Any:
    """Move each MLP's activation into its packed product, in place: oneDNN applies it to the float32
    result (before rounding it to bfloat16), in the same pass. GPT-2's tanh GELU is seven elementwise ops
    otherwise, each reading and writing the [tokens, 3072] activations: on the AMX Xeon a 20-token pass over
    600 cached positions took 40.0-44.1 ms fused against 44.5-54.6, a one-row step 22.6-28.6 against
    28.5-32.4 (a noisy host: medians 42 / 47 and 27 / 29.6).

    After FBGEMM's float16 products, whose layers already round the weights (float16-int8head), that GELU
    becomes torch's one kernel (`TanhGELU`). float32's keeps transformers' ops: its logits are Hugging
    Face's, bit for bit, which its tests check."""
    for module in model.modules():
        names = ACTIVATED.get(type(module).__name__)
        if names is None:
            continue
        product, activation = (getattr(module, name, None) for name in names)
        fused = ONEDNN_ACTIVATIONS.get(type(activation).__name__)
        if isinstance(product, Linear) and product.packed and fused is not None:
            product.activation = fused
            setattr(module, names[1], nn.Identity())
        elif isinstance(product, Linear) and product.float16 is not None and fused == ("gelu", [], "tanh"):
            setattr(module, names[1], TanhGELU())
    return model
