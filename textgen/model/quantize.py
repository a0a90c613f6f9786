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

FBGEMM quantizes a product's activations (8-bit) with one range for all its rows. A row much smaller than
the others would lose precision to them, so with several rows each is first shifted by the middle of its
range and divided by its half-width (and the output put back, `_int8_product`): every row then spans
exactly [-1, 1], quantized as if alone.

A few input channels of a transformer's linear layers carry values far larger than the rest, and a row's
8-bit range is spent on them. As SmoothQuant does (Xiao et al., 2023), each layer's inputs are divided per
channel by s = sqrt(largest input / largest weight) in that channel and its weight columns multiplied by
the same s before quantizing, which moves half the outliers' range into the weights; the largest inputs
come from one forward pass over CALIBRATION_TEXT at load (`input_peaks`). Token-by-token perplexity on
SmolLM2 (bench/results/quality.md, float32 17.53): 17.91 without smoothing, 17.68 with it (with
alpha 0.7 instead of 0.5: 17.85); weight-only int8, this module's kernel before, 17.70.

Where FBGEMM multiplies with AVX512-VNNI, weights use all of int8 (+-127). Its AVX2 and plain AVX-512
kernels add pairs of u8 x s8 products in 16 bits, which +-127 weights overflow (SmolLM2's perplexity: 5790
on a short text), so there weights are 7-bit (+-63: 2 x 255 x 63 = 32130 fits); PyTorch's own answer on
those kernels, 7-bit activations (`reduce_range`), cost 6% on that text. `weight_levels` asks the kernel
itself rather than the CPU flags.

From a few rows up a plain product is faster than the int8 one, so each layer also keeps its weight in
the compute dtype (a `Linear`): the dtype the model was loaded in, bfloat16 where the CPU has it natively,
float32 elsewhere (textgen/model/formats.py `int8_dense_dtype`). With F.linear's weights that was from
DENSE_ROWS (64 rows: 19.7 ms against bfloat16's 18.8 without the output layer; 512 rows: 108 against 49.5);
bfloat16 weights packed for oneDNN (textgen/model/linear.py) are faster from PACKED_DENSE_ROWS (GPT-2's 48
block products on the AMX Xeon, int8 against packed bfloat16: 8.8 / 11.9 ms at 1 row, 10.1 / 11.9 at 2,
11.7 / 11.5 at 4, 17.3 / 12.4 at 16, 25.7 / 15.4 at 32).

Where torch has no FBGEMM (ARM builds), the one-row product falls back to `_weight_int8pack_mm` and larger
ones go to the dense copy.

The output layer is the exception where the CPU has AMX's int8 unit: FBGEMM has no AMX kernel, and oneDNN's
(`torch.ops.onednn.qlinear_pointwise`, which inductor's int8 passes call) multiplies a matrix that large
faster from a few rows up and as fast at one (`onednn_output_layer`); its activations are quantized here with
FBGEMM's scale and zero point (`_onednn_product`), so the numbers are FBGEMM's up to the last bits. GPT-2's
[50257, 768] int8 output layer on the AMX Xeon (family 6 model 167), 2 threads, cold from memory, oneDNN
against FBGEMM: 1 row level (2.51 against 2.33 ms, 2.52 against 2.58, alternating), 8 rows 1.8-2.2 against
2.6-3.0, 32 rows 2.4-4.3 against 4.5-6.8, 64 rows 3.1-4.4 against 7.4-7.8. Not for the blocks' smaller
matrices, where oneDNN's per-call cost loses (GPT-2's 48 block products: 1 row 11.8 against 8.6 ms, 32 rows
22.2 against 16.6), nor without AMX: capped to AVX512-VNNI it was only level (32 rows 4.0 against 4.7 ms), and
to AVX2 4x slower. In the engine (random GPT-2 bfloat16-int8head, W's sampled streams in-process, alternating
processes): 32 streams 823-877 tok/s against 797-845, one stream level (89-109 against 91-105).
"""

from __future__ import annotations

import functools
import logging
import struct
import warnings
from typing import Any

import torch
from torch import nn

from textgen.model.cpu import CpuInfo, this_cpu
from textgen.model.linear import Linear, replace_projections

log = logging.getLogger(__name__)


def _float32(value: float) -> float:
    """`value` rounded to the nearest float32, as C++ stores a double in a float."""
    return struct.unpack("f", struct.pack("f", value))[0]


DENSE_ROWS = 64  # from this many rows (tokens) per product, the dense copy is faster
PACKED_DENSE_ROWS = 4  # the same where the dense copy is bfloat16 packed for oneDNN
CHUNK_ROWS = 4096  # rows quantized at a time
HAS_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines
# oneDNN's packed layout is chosen for products of this many rows (decoding batches; one row is as fast)
ONEDNN_PACK_ROWS = 8
# torch's SMALL_SCALE_THRESHOLD, a float32: FBGEMM quantizes activations with no finer step
SMALL_SCALE = _float32(6.1e-5)
SMOOTHING = 0.5  # SmoothQuant's alpha: the share of each input channel's range moved into the weights
CALIBRATION_TOKENS = 256
# Varied on purpose (story, code, dates, science, dialogue), and not the text bench/quality.py measures on.
CALIBRATION_TEXT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. Every "
    "morning he rowed out before sunrise and came back at noon with whatever the nets had caught.\n"
    "Q: How do I sort a list in Python?\nA: Use sorted(items) or items.sort(); both accept a key function, "
    "for example sorted(words, key=len).\n"
    "The meeting is scheduled for 3:30 pm on Tuesday, 14 March 2023, in room 204. Please bring the "
    "quarterly report, the budget spreadsheet and your laptop.\n"
    "The mitochondria is the powerhouse of the cell, producing ATP through oxidative phosphorylation; "
    "enzymes in its inner membrane pass electrons along a chain and pump protons across it.\n"
    "User: Can you recommend a good book about the history of science?\nAssistant: Certainly! You might "
    "enjoy 'A Short History of Nearly Everything' by Bill Bryson, which explains big ideas with humour."
)


def _fbgemm_pack(quantized: torch.Tensor, scales: torch.Tensor) -> Any:
    """FBGEMM's packed form of int8 weights [out, in] with per-row scales (for quantized::linear_dynamic)."""
    zero_points = torch.zeros(quantized.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch 2.13 warns that quantized tensor types will go; FBGEMM's packing still takes one.
        warnings.filterwarnings("ignore", message=".*quantized tensor", category=UserWarning)
        weight = torch._make_per_channel_quantized_tensor(quantized, scales.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(weight, None)


def onednn_output_layer(cpu: CpuInfo | None = None) -> bool:
    """Whether the output layer's int8 products are oneDNN's rather than FBGEMM's: where oneDNN may use
    this CPU's AMX int8 unit (not capped by ONEDNN_MAX_CPU_ISA) and torch has its int8 product."""
    cpu = cpu or this_cpu()
    return not cpu.is_arm and {"amx_tile", "amx_int8"} <= cpu.usable_by("oneDNN") and _has_onednn_int8()


@functools.cache
def _has_onednn_int8() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def weight_levels() -> int:
    """The largest int8 weight FBGEMM's kernel in this process takes: 127 where it sums products in 32 bits
    (VNNI), 63 where it adds pairs of u8 x s8 products in 16 bits (no VNNI, or capped by
    FBGEMM_ENABLE_INSTRUCTIONS). Asked with a product that overflows the pairs: every weight and
    activation at its largest, each pair 2 x 255 x 127 = 64770 > 32767."""
    if not HAS_FBGEMM:
        return 127  # torch's weight-only kernel multiplies in floating point
    packed = _fbgemm_pack(torch.full((8, 64), 127, dtype=torch.int8), torch.full((8,), 1 / 127))
    out = torch.ops.quantized.linear_dynamic(torch.ones(1, 64), packed, False)
    return 127 if torch.allclose(out, torch.full_like(out, 64.0)) else 63


class Int8Linear(nn.Module):
    """y = x Wᵀ + b, with W as int8 rows and one scale per row (plus W dense for large batches)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        levels: int | None = None,
        input_peaks: torch.Tensor | None = None,
        pack: bool = True,
        out_dtype: torch.dtype | None = None,
        dense: bool = True,
        onednn: bool = False,
    ) -> None:
        """`levels`: the largest int8 weight (default: weight_levels()); `input_peaks`: the largest |input|
        per channel seen in calibration, to smooth the int8 product with (none: no smoothing); `pack`: the
        dense copy may be packed (not when it is also the input embeddings: linear.replace_projections);
        `out_dtype`: of the outputs (none: the inputs'); `dense`: keep W dense for large products (without
        it FBGEMM multiplies every product; where torch has no FBGEMM, W stays dense whatever it says);
        `onednn`: oneDNN multiplies the int8 weights instead of FBGEMM, all of int8 by default (for AMX,
        `onednn_output_layer`: its AVX2 and AVX-512 kernels add pairs of products in 16 bits, as FBGEMM's)."""
        super().__init__()
        self.out_dtype = out_dtype
        weight = weight.detach()  # [out, in]
        self.out_features, self.in_features = weight.shape
        if levels is None:  # oneDNN's AMX kernel sums in 32 bits: all of int8
            levels = 127 if onednn else weight_levels()
        compute = weight.dtype
        smoothing = torch.ones(self.in_features)
        if input_peaks is not None and HAS_FBGEMM:
            column_peaks = weight.abs().amax(dim=0).float().clamp(min=1e-5)
            smoothing = (
                input_peaks.float().clamp(min=1e-5) ** SMOOTHING / column_peaks ** (1 - SMOOTHING)
            ).clamp(min=1e-5)
        self.register_buffer("input_scale", (1 / smoothing).float())  # inputs x this, weight columns / it
        quantized, scales = int8_rows(weight, levels, columns=smoothing)
        self.packed: Any = None  # FBGEMM's
        self.onednn_packed: Any = None
        if onednn:
            # oneDNN's own copy, in its blocked layout: the int8 tensor can go
            self.onednn_packed = torch.ops.onednn.qlinear_prepack(
                quantized, [ONEDNN_PACK_ROWS, self.in_features]
            )
            self.register_buffer("scales", scales)
            self.register_buffer("zero_points", torch.zeros(self.out_features, dtype=torch.long))
        elif HAS_FBGEMM:
            self.packed = _fbgemm_pack(quantized, scales)  # FBGEMM's own copy: the int8 tensor can go
        if self.onednn_packed is not None or HAS_FBGEMM:
            # 1 W' per output: what a constant row contributes through the int8 weights (_int8_product)
            self.register_buffer("column_sums", quantized.sum(dim=1, dtype=torch.float32) * scales)
        else:
            self.register_buffer("weight_int8", quantized)
            self.register_buffer("scales", scales.to(compute))  # _weight_int8pack_mm: the activations' dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute), requires_grad=False)
        self.dense: Linear | None = None
        if dense or not HAS_FBGEMM:
            self.dense = Linear(weight.contiguous(), self.bias, pack=pack)
            self.dense_rows = PACKED_DENSE_ROWS if self.dense.packed else DENSE_ROWS

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, for model code that reads a layer's `.weight` (T5 casts to its dtype)."""
        if self.dense is None:
            raise AttributeError("this int8 layer keeps no dense weight (dense=False)")
        return self.dense.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if self.dense is not None and (rows >= self.dense_rows or (rows > 1 and not HAS_FBGEMM)):
            out = self.dense(flat)
        else:
            out = self._int8_product(flat)
            if self.bias is not None:
                out = out + self.bias
        return out.to(self.out_dtype or flat.dtype).view(*x.shape[:-1], self.out_features)

    def _int8_product(self, flat: torch.Tensor) -> torch.Tensor:
        if self.onednn_packed is None and not HAS_FBGEMM:
            return torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        activations = flat * self.input_scale  # float32, as FBGEMM takes them (type promotion)
        if flat.shape[0] == 1:  # a lone row is quantized on its own range
            if self.onednn_packed is not None:
                return self._onednn_product(activations)
            return torch.ops.quantized.linear_dynamic(activations, self.packed, False)  # float32
        # Several rows share one range in FBGEMM's quantization (and oneDNN's here). Each row x is taken as
        # its range's middle m plus its half-width h times u, u spanning exactly [-1, 1]: every row's u then
        # quantizes on its own range, as the row would alone, and x W' = h (u W') + m (1 W'). Scaled by its
        # largest |x| alone, a row whose values lean to one side lost up to half its steps to the others:
        # SmolLM2's int8 output layer, 32 rows at a time, 17.67 perplexity in one pass against 17.55 one row
        # at a time.
        low, high = activations.aminmax(dim=1, keepdim=True)
        middle, half = (high + low) / 2, ((high - low) / 2).clamp_(min=1e-12)
        if self.onednn_packed is not None:
            out = self._onednn_product((activations - middle) / half)
        else:
            out = torch.ops.quantized.linear_dynamic((activations - middle) / half, self.packed, False)
        return out.mul_(half).addr_(middle.squeeze(1), self.column_sums)  # a fresh tensor: scaled in place

    def _onednn_product(self, activations: torch.Tensor) -> torch.Tensor:
        """x W' through oneDNN, in float32, x quantized to uint8 on one range for all its rows as FBGEMM's
        linear_dynamic quantizes it (`fbgemm_input_quantization`): FBGEMM's numbers up to the last bits."""
        low, high = activations.aminmax()
        scale, zero = fbgemm_input_quantization(float(low), float(high))
        # round(x / scale) + zero as FBGEMM computes it: x times the float32 inverse, to the nearest even
        codes = activations.mul(_float32(1 / scale)).round_().add_(zero).clamp_(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(
            codes, scale, zero, self.onednn_packed, self.scales, self.zero_points,
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip


def fbgemm_input_quantization(low: float, high: float) -> tuple[float, int]:
    """The uint8 scale and zero point FBGEMM's linear_dynamic quantizes activations spanning [low, high] with
    (torch's quant_utils::ChooseQuantizationParams, full range): the span widened to take 0 and to at least
    255 steps of SMALL_SCALE, the scale a float32, the zero point the one whose end loses less, rounded to the
    nearest even."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255
    if _float32(scale) <= 2.0**-128:  # 0 as a float32, or its float32 inverse infinite
        scale = 0.1
    if scale < SMALL_SCALE:
        if low == 0.0:
            high = _float32(SMALL_SCALE * 255)
        elif high == 0.0:
            low = _float32(-SMALL_SCALE * 255)
        else:
            amplifier = _float32(SMALL_SCALE / _float32(scale))
            low, high = _float32(low * amplifier), _float32(high * amplifier)
        scale = SMALL_SCALE
    from_min, from_max = -low / scale, 255 - high / scale
    zero = from_min if abs(low / scale) > 255 - abs(high / scale) else from_max
    zero = min(max(round(zero), 0), 255)  # Python rounds halves to even, as nearbyint does
    return _float32(scale), zero


def int8_rows(
    weight: torch.Tensor, levels: int, columns: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [out, in], its columns multiplied by `columns` (float32) if given, as int8 rows of at most
    `levels` and one float32 scale per row (symmetric), a block of rows at a time: a float32 copy of GPT-2's
    whole output layer would be 154 MB."""
    weight = weight.detach()  # a parameter's rows must not keep it alive in an autograd graph
    scales = torch.empty(weight.shape[0])
    rows = torch.empty(weight.shape, dtype=torch.int8)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        block = slice(start, start + CHUNK_ROWS)
        part = weight[block].float() if columns is None else weight[block].float() * columns
        scales[block] = part.abs().amax(dim=1).clamp(min=1e-12) / levels
        rows[block] = torch.round(part / scales[block, None]).clamp(-levels, levels)
    return rows, scales


class Int8Embedding(nn.Module):
    """Input embeddings as int8 rows with one scale each (all of int8: the lookup multiplies in floating
    point, whatever FBGEMM's products take), widened to the table's dtype as they are looked up: what a
    float32 model whose tied output layer is int8 keeps instead of the float32 matrix
    (quantize_output_layer)."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        rows, scales = int8_rows(weight, 127)
        self.register_buffer("rows", rows)
        self.register_buffer("scales", scales)
        self.dtype = weight.dtype
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.rows[ids].float() * self.scales[ids].unsqueeze(-1)).to(self.dtype)


def input_peaks(model: Any, tokenizer: Any) -> dict[nn.Module, torch.Tensor]:
    """The largest |input| per channel of every linear layer (GPT-2's Conv1D too) over CALIBRATION_TEXT, in
    one forward pass of the model as loaded. Empty if the model cannot run it (then nothing is smoothed)."""
    from transformers.pytorch_utils import Conv1D

    peaks: dict[nn.Module, torch.Tensor] = {}

    def record(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
        peaks[layer] = torch.maximum(peaks[layer], seen) if layer in peaks else seen

    layers = [m for m in model.modules() if isinstance(m, (Conv1D, nn.Linear))]
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        ids = tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids[:, :CALIBRATION_TOKENS]
        extra = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
        with torch.inference_mode():
            model(input_ids=ids, **extra)
    except Exception as exc:  # an unusual model: int8 without smoothing still works
        log.warning(
            "int8: no calibration pass (%s: %s); activations are not smoothed", type(exc).__name__, exc
        )
        return {}
    finally:
        for hook in hooks:
            hook.remove()
    return peaks


def quantize_int8(model: Any, tokenizer: Any = None) -> Any:
    """Replace the linear layers of a model (GPT-2's Conv1D included) with Int8Linear, in place; with a
    tokenizer, each layer's int8 product is smoothed by the inputs of a calibration pass (input_peaks)."""
    peaks = input_peaks(model, tokenizer) if tokenizer is not None and HAS_FBGEMM else {}

    head = model.get_output_embeddings()
    onednn = onednn_output_layer()

    def make(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> Int8Linear:
        if layer is not head:
            return Int8Linear(weight, bias, input_peaks=peaks.get(layer), pack=pack)
        return Int8Linear(  # logits in float32: see quantize_output_layer
            weight, bias, input_peaks=peaks.get(layer), pack=pack, out_dtype=torch.float32, onednn=onednn
        )

    replace_projections(model, make)
    return model


def quantize_output_layer(model: Any) -> Any:
    """Replace the model's output layer (the vocabulary projection) with Int8Linear, in place, and leave every
    other layer as it is: TEXTGEN_DTYPE=bfloat16-int8head and float32-int8head, before `use_linear` lays out
    the others.

    The output layer is the largest single matrix of a small model (GPT-2: 50257 x 768, 31% of its
    weights; SmolLM2: 21%), read whole at every decoding step. GPT-2, AMX Xeon, in the engine with the
    compiled step (one stream): 3.2 ms a step for it in bfloat16, 1.85 in int8; alone, at 32 rows, 3.38
    against 3.30 (from DENSE_ROWS rows bfloat16's dense copy multiplies; float32's has none: FBGEMM at
    every size). Beside float32 layers, with every kernel capped to AVX2 (7-bit weights): one stream
    46.9-48.6 tok/s against 40.1-40.6 all float32, 32 streams 377-382 against 327-328 (session 28).
    Unsmoothed (no calibration pass at load).
    Quality (SmolLM2, bench/results/quality.md; float32's input embeddings int8 rows too): token by token
    17.55 against float32's 17.53 (+0.11%), 17.47 with 7-bit weights; in one pass (every position's logits
    in one product) 17.57 and 17.50. An int8 output layer alone has added up to +0.23% on top of
    bfloat16's."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        log.warning(
            "int8 output layer: %s has no linear output layer (%s); it stays as loaded",
            type(model).__name__,
            type(head).__name__,
        )
        return model
    embeddings = model.get_input_embeddings()
    tied = head.weight is getattr(embeddings, "weight", None)
    # Logits in float32, as FBGEMM computes them and as the engine samples them: rounded to bfloat16 and
    # back they cost two copies of [rows, vocabulary] a step (32 rows of GPT-2: 6.4 MB each) and precision.
    # float32's dense copy goes: FBGEMM multiplies every product (per-row ranges keep many rows as precise
    # as one, `_int8_product`), and a tied float32 model's input embeddings become int8 rows too, so its
    # float matrix goes (GPT-2: 154 MB become 39). bfloat16's stays: tied, it is the lookup's own table
    # (int8 rows there saved nothing measurable, 716-723 MB after loading against 722, and moved the offline
    # default's README answer through the compiled bfloat16 pass, where "The" and "L'Étoile" start a few
    # hundredths of a nat apart: 15 of 20 answers named Paris, not 20), and from a few rows up oneDNN's
    # bfloat16 products beat FBGEMM's (PACKED_DENSE_ROWS); for all of a prompt's positions at once, SmolLM2
    # 17.64 perplexity in one pass against 17.73 through FBGEMM.
    float32 = head.weight.dtype == torch.float32
    layer = Int8Linear(
        head.weight,
        head.bias,
        pack=not tied,
        out_dtype=torch.float32,
        dense=not float32,
        onednn=onednn_output_layer(),
    )
    model.set_output_embeddings(layer)
    if tied and float32 and layer.dense is None:
        model.set_input_embeddings(Int8Embedding(embeddings.weight, getattr(embeddings, "padding_idx", None)))
    return model
