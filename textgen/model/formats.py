"""Choosing the weight format for the CPU at hand (TEXTGEN_DTYPE=auto), and saying when a choice is slow.

`auto` takes the fastest format this CPU runs natively whose quality cost stays within 1% token-by-token
perplexity of float32; it never picks a format the CPU emulates. "Natively" is for this process: under a
kernel-library cap (ONEDNN_MAX_CPU_ISA=AVX2 on an AMX Xeon, textgen/model/cpu.py) bfloat16 is emulated, so the
choice and the warning read CpuInfo's effective picture, not the raw /proc/cpuinfo flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from textgen.model.cpu import CpuInfo
from textgen.model.quantize import onednn_output_layer

# ---------------------------------------------------------------------------------------------------------
# Choosing the weight format

# Relative increase of token-by-token perplexity against float32, measured on SmolLM2-135M-Instruct through
# the serving path: bench/results/quality.md (tests/test_cpu.py checks that no entry is below that file's).
# The worst of the measurements so far: they move by a few tenths of a percent with the attention's rounding
# (KV capacities at other lengths: bfloat16 +0.06% to +0.65%, int8 +0.86% to +1.87%; bfloat16 with its
# MLP activation inside the product, textgen/model/linear.py, +0.53% against +0.09% apart, although each
# fused product is closer to float32: one rounding instead of two), and int8 at +0.86%
# still changed the offline default's answer to the README question (9 of 20 name Paris at its preset,
# French answers otherwise; bfloat16 passes the 18-of-20 test, tests/test_real_model.py), so int8 stays over
# the limit.
# int8 is per-channel int8 weights with activations quantized per row to 8 bits as they are multiplied
# (FBGEMM, textgen/model/quantize.py); "int8-7bit" is the same with 7-bit weights, as on x86 CPUs without
# AVX512-VNNI. Re-measure (python bench/quality.py) and update when a format's implementation changes.
# "bfloat16-int8head" is bfloat16 with the output layer int8 (textgen/model/quantize.py quantize_output_layer):
# bfloat16's worst plus what the int8 output layer added on top of bfloat16 in the same run.
# "float32-int8head" is float32 with the output layer int8: +0.05% with 8-bit weights (VNNI) and -0.39% with
# 7-bit ones (FBGEMM capped to AVX2) on the AMX Xeon (session 28); counted at +0.23%, the most an int8 output
# layer has added. With its tied input embeddings int8 rows too (2026-12-06): +0.11% and -0.34%; with its
# KV cache in float16 too (CACHE_DTYPES, session 33): +0.06% and -0.40%, the same answers.
# "float32-packed" is float32 with oneDNN's products: the same perplexity and answers (Zen 4, session 21).
# "float16-int8head" is float32-int8head with its layers' weights rounded to float16 (FBGEMM's products,
# float32 arithmetic): with 7-bit output weights on an AVX2 EPYC (Zen 3, session 45) 17.48 token by token
# against float32-int8head's 17.47 and float32's 17.53 (bench/results/2026-12-07-quality-avx2-session45.md),
# 17.47 and 17.50 in one pass: float16 weights added +0.06% at most; counted at float32-int8head's +0.23%
# plus that.
QUALITY_COST: Mapping[str, float] = {
    "float32": 0.0,
    "float32-packed": 0.0,
    "bfloat16": 0.0053,
    "bfloat16-int8head": 0.0076,
    "int8": 0.0103,
    "int8-7bit": 0.0320,  # +2.80% on the AMX Xeon, +3.20% on the Zen 4 (session 21)
    "float32-int8head": 0.0023,
    "float32-int8head-7bit": 0.0023,
    "float16-int8head": 0.0029,
    "float16-int8head-7bit": 0.0029,
}
MAX_QUALITY_COST = 0.01  # `auto` accepts at most +1% token-by-token perplexity (issue #12)

# Fastest first, when each runs natively: decoding streams the weights from memory, and int8 reads half the
# bytes of bfloat16, which reads half of float32; bfloat16-int8head reads GPT-2's output layer (31% of it)
# in int8; float32-int8head reads 23% fewer bytes than float32 (GPT-2). On Intel's CPUs its layers are
# float32's (oneMKL): under AVX2 caps on the AMX Xeon, random GPT-2 in-process, one stream 46.9-48.6 tok/s
# against float32's 40.1-40.6, 32 streams 377-382 against 327-328 (session 28). On AMD's they are packed for
# oneDNN (`packs_float32`), float32-packed's kernels, so it beats float32-packed by its fewer bytes: the
# same caps with float32_packing answering as on AMD, in-process, alternating, one stream 37.7-38.7 tok/s
# against 32.1-32.2, 32 streams 354.7-359.6 against 316.0-319.4, peak RSS 1203-1245 MiB against 1644-1674
# (session 34; with that Xeon's AVX-512 kernels 43.0-43.3 against 37.1-37.3 and 461.5-461.7 against
# 404.2-404.9; an AMD EPYC Zen 3's own figures are in README "Performance"). float32-packed: float32's
# bytes, oneDNN's packed kernels where they are faster (float32_packing).
# A format this CPU emulates never gets this far.
# float16-int8head reads half of float32-int8head's layers' bytes and computes as float32 does
# (`float16_weights`).
SPEED_ORDER = (
    "int8",
    "bfloat16-int8head",
    "bfloat16",
    "float16-int8head",
    "float32-int8head",
    "float32-packed",
    "float32",
)
BFLOAT16_LAYERS = ("bfloat16", "bfloat16-int8head")  # formats whose layers compute in bfloat16
# int8 output layer, the others as named (float16-int8head's in float16 weights)
INT8_OUTPUT_LAYER = ("bfloat16-int8head", "float32-int8head", "float16-int8head")
FBGEMM_PRODUCTS = ("int8", *INT8_OUTPUT_LAYER)  # formats with FBGEMM's int8 products


# What textgen's KV cache stores keys and values in, per format, where not in the dtype the layers compute
# (textgen/model/attention.py `cache_dtype`). float32-int8head and float16-int8head, `auto` on CPUs without
# native bfloat16:
# float16 halves what float32 keys and values take, and every x86 CPU with AVX2 widens float16 in hardware
# (F16C) as attention reads it; bfloat16 would round 8x coarser. W's 32 streams keep 32 rows of up to 160
# positions: 377 MB of GPT-2's keys and values in float32, 189 in float16. Attention reads them through
# inductor's compiled loops, which widen as they read, where the CPU has no float16 arithmetic (torch's own
# float16 kernels are 5-14x slower there: `compiled_attention_wins`), and through SDPA where it has
# (`sdpa_wins`). float32 and float32-packed keep float32: they promise Hugging Face's numbers.
CACHE_DTYPES: Mapping[str, torch.dtype] = {
    "float32-int8head": torch.float16,
    "float16-int8head": torch.float16,
}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # one of textgen.config.DTYPES
    reason: str  # a sentence for logs and GET /info
    warning: str | None = None  # set when an explicit format is emulated or measured slow on this CPU


def _not_native(dtype: str, cpu: CpuInfo) -> str | None:
    """Why this CPU would emulate `dtype` (a clause), or None when it runs natively."""
    if dtype not in SPEED_ORDER:
        raise ValueError(f"unknown weight format {dtype!r}; expected one of {', '.join(SPEED_ORDER)}")
    # int8 products are FBGEMM's integer ones, and its dense copy for large batches is bfloat16 only where
    # the CPU has it natively, else float32 (int8_dense_dtype): nothing of it is emulated anywhere.
    if dtype not in BFLOAT16_LAYERS or cpu.native_bf16:
        return None
    cap = cpu.bf16_capped_by
    if cap is not None:  # the CPU has the units, but this process may not use them
        return (
            f"{cap} keeps oneDNN off this CPU's bfloat16 units ({cpu.raw_isa_class}), so this process "
            f"({cpu.isa_class}) emulates bfloat16"
        )
    missing = "no BF16" if cpu.is_arm else "no AVX512_BF16 or AMX"
    return f"this CPU ({cpu.isa_class}, {missing}) emulates bfloat16"


def float32_packing(cpu: CpuInfo) -> str | None:
    """Why float32-packed is not for this CPU (a clause), or None where it is.

    Its products are oneDNN's, on weights packed once for its kernels; float32's are F.linear's, whose float32
    GEMM is oneMKL's, Intel's library. On AMD CPUs oneMKL ran GPT-2's block products 1.6-2.3x slower than the
    packed kernel at one row and 1.8-2.7x at 4-32 rows, its output layer 2.2-2.9x (Zen 4 EPYC, 2 threads,
    with its AVX-512 and capped to AVX2); the engine ran nearly twice as fast (in-process, random GPT-2: one
    stream 44.5-46.7 tok/s against 22.4-25.5, 32 streams 450-453 against 237-251). On Intel's, oneMKL is at
    home: packed block products lost at one row there (AMX Xeon: 20.2 against 16.5 ms a step), and
    float32-int8head's lone row compiles with oneMKL's products, which a packed (opaque) weight cannot join.
    Under AVX2 caps on that Xeon, in-process, packed float32-int8head decoded one stream at 37.4-38.8 tok/s
    against 54.3-55.5 compiled, its batches level (8 streams 184.8-188.0 against 189.3-190.1, 32 streams
    355.1-359.6 against 354.7-359.5; session 34). With the Xeon's AVX-512 kernels its batches ran faster (8
    streams 238-244 against 172-175, 32 streams 458-464 against 396-405) but one stream as slowly (43.0-44.5
    against 57.0-58.9); having both would take two copies of the weights (+327 MiB for GPT-2). Other vendors
    are unmeasured."""
    if cpu.arch != "x86_64":
        return "measured on x86 only"
    if cpu.vendor != "AuthenticAMD":
        return (
            "oneMKL multiplies float32 at full speed on Intel's CPUs (the packed kernel was slower there)"
            if cpu.vendor == "GenuineIntel"
            else f"measured on AMD's CPUs only (this one: {cpu.vendor or 'unknown vendor'})"
        )
    if not cpu.avx2_for("oneDNN"):
        return f"oneDNN's packed float32 kernels were measured with AVX2 and up (this CPU: {cpu.isa_class})"
    return None


def float16_weights(cpu: CpuInfo) -> str | None:
    """Why float16-int8head is not for this CPU (a clause), or None where it is.

    Its layers' weights are float16 and FBGEMM's products widen them to float32 as they read them (F16C),
    so a decoding step streams half of float32's bytes for them and computes as float32 does. Where
    float32-int8head's layers are oneDNN's packed ones (`float32_packing`: AMD's CPUs) FBGEMM's float16
    products were faster at every size (AVX2 EPYC Zen 3, 2 threads, GPT-2's 48 block products: 1 row 10.5
    against 20.4 ms, 32 rows 53.6 against 63.0, 256 rows 289 against 320; textgen/model/linear.py) and take
    half the memory. On Intel's CPUs float32-int8head's lone row compiles with oneMKL's products, which
    FBGEMM's would leave: unmeasured there."""
    packing = float32_packing(cpu)
    return (
        None
        if packing is None
        else f"measured only where it replaces packed float32 products; here {packing}"
    )


def packs_float32(dtype: str, cpu: CpuInfo) -> bool:
    """Whether `dtype`'s float32 layers multiply with oneDNN's packed kernels on `cpu`
    (textgen/model/linear.py `pack_float32`) rather than oneMKL's: float32-packed's everywhere,
    float32-int8head's where float32-packed is for the CPU (`float32_packing`: AMD's, where oneMKL's float32
    GEMM is slow). float32 keeps F.linear."""
    return dtype == "float32-packed" or (dtype == "float32-int8head" and float32_packing(cpu) is None)


def choose_dtype(cpu: CpuInfo, quality: Mapping[str, float] | None = None) -> DtypeChoice:
    """The weight format for TEXTGEN_DTYPE=auto: the fastest one that this CPU runs natively and that costs
    at most MAX_QUALITY_COST of token-by-token perplexity against float32 (per `quality`, default
    QUALITY_COST). A format without a quality measurement is not chosen; float32 is the reference and
    always allowed.

    int8 is chosen on x86 CPUs FBGEMM has kernels for (AVX2 and up), where it was measured faster than
    float32 (an AMX Xeon, and the same under AVX2 caps) at the cost of "int8" (AVX512-VNNI) or "int8-7bit"
    (without it). On ARM, int8 is weight-only and unmeasured; TEXTGEN_DTYPE=int8 selects it explicitly.
    """
    table = QUALITY_COST if quality is None else quality
    passed: list[str] = []
    for dtype in SPEED_ORDER:
        if dtype == "float32":
            break
        why = _not_native(dtype, cpu)
        if why is None and dtype == "float32-packed":
            why = float32_packing(cpu)
        if why is None and dtype == "float16-int8head":
            why = float16_weights(cpu)
        if why is None and dtype in FBGEMM_PRODUCTS and not cpu.fbgemm_kernels:
            why = (
                "measured on x86 only, where FBGEMM multiplies it"
                if cpu.is_arm
                else f"FBGEMM, which multiplies it, needs AVX2 and FMA (this CPU: {cpu.isa_class})"
            )
        cost = table.get(quality_key(dtype, cpu))
        if why is None:
            if cost is None:
                why = "its quality cost has not been measured"
            elif cost > MAX_QUALITY_COST:
                why = f"perplexity +{cost:.2%} against float32, over the {MAX_QUALITY_COST:.0%} limit"
        if why is not None:
            passed.append(f"{dtype} not chosen: {why}")
            continue
        assert cost is not None
        if dtype == "int8":
            native = f"runs FBGEMM's int8 products natively ({_int8_kernel(cpu)})"
        elif dtype == "float32-int8head":
            layers = (
                f"float32's layers with oneDNN's packed kernels ({cpu.vendor}: oneMKL's float32 GEMM is slow "
                "here)"
                if packs_float32(dtype, cpu)
                else "float32's layers"
            )
            native = (
                f"runs {layers} and its output layer with FBGEMM's int8 products natively "
                f"({_int8_kernel(cpu)})"
            )
        elif dtype == "float16-int8head":
            native = (
                "runs float32's layers from float16 weights with FBGEMM's products (half the bytes, widened "
                f"as they are read) and its output layer with FBGEMM's int8 products natively "
                f"({_int8_kernel(cpu)})"
            )
        elif dtype == "float32-packed":
            native = (
                f"({cpu.isa_class}, {cpu.vendor}) multiplies float32 faster with oneDNN's packed kernels than "
                "with oneMKL's (float32's); the same weights, a row's last bits may vary with its batch size"
            )
        else:
            native = f"computes bfloat16 natively ({cpu.bf16_unit})"
            if dtype == "bfloat16-int8head" and onednn_output_layer(cpu):
                native += " and its output layer with oneDNN's int8 products (AMX)"
            elif dtype == "bfloat16-int8head":
                native += (
                    f" and its output layer with FBGEMM's int8 products ({cpu.int8_unit or cpu.isa_class})"
                )
        reason = (
            f"{dtype}: this CPU {native}; quality within {MAX_QUALITY_COST:.0%} of float32 "
            f"(perplexity +{cost:.2%})"
        )
        return DtypeChoice(dtype, "; ".join([reason, *passed]))
    reason = f"float32: the fastest format this CPU ({cpu.isa_class}) runs natively within quality bounds"
    return DtypeChoice("float32", "; ".join([reason, *passed]))


def _int8_kernel(cpu: CpuInfo) -> str:
    """FBGEMM's int8 kernel on `cpu`, for a reason: its VNNI unit, or the 7-bit weights it takes without."""
    return cpu.int8_unit or f"{cpu.isa_class}: 7-bit weights, its pairs of products add in 16 bits"


def emulated(dtype: str, cpu: CpuInfo) -> str | None:
    """A warning sentence when an explicitly chosen TEXTGEN_DTYPE is emulated on this CPU, else None."""
    why = _not_native(dtype, cpu)
    if why is None:
        return None
    return (
        f"TEXTGEN_DTYPE={dtype} is emulated here: {why}; expect it to be slower than float32 "
        "(at 32 clients 2x slower on an AVX2-only EPYC, 3x under ONEDNN_MAX_CPU_ISA=AVX2 on an AMX Xeon)"
    )


def quality_key(dtype: str, cpu: CpuInfo) -> str:
    """The QUALITY_COST entry of `dtype` on this CPU: int8's weights are 7-bit on x86 CPUs without VNNI, and
    so are an int8 output layer's (bfloat16-int8head's unmeasured, so `auto` does not choose it there)."""
    if dtype in FBGEMM_PRODUCTS and cpu.int8_weight_bits == 7:
        return f"{dtype}-7bit"
    return dtype


def costly(dtype: str, cpu: CpuInfo) -> str | None:
    """A warning sentence when an explicitly chosen TEXTGEN_DTYPE costs more quality on this CPU than `auto`
    accepts (QUALITY_COST over MAX_QUALITY_COST), else None."""
    key = quality_key(dtype, cpu)
    cost = QUALITY_COST.get(key)
    if cost is None or cost <= MAX_QUALITY_COST:
        return None
    why = (
        " (7-bit weights: this CPU's FBGEMM kernel adds pairs of products in 16 bits)"
        if key == "int8-7bit"
        else ""
    )
    return (
        f"TEXTGEN_DTYPE={dtype} costs +{cost:.2%} token-by-token perplexity against float32 here{why}, over "
        f"the {MAX_QUALITY_COST:.0%} `auto` accepts (SmolLM2, bench/results/quality.md)"
    )


def serving_dtype(requested: str, cpu: CpuInfo) -> DtypeChoice:
    """TEXTGEN_DTYPE resolved for this CPU: `auto` chooses (choose_dtype); an explicit format is kept, with
    the reason saying so and, when this CPU emulates it or it costs over 1% quality here, why."""
    if requested == "auto":
        return choose_dtype(cpu)
    warning = emulated(requested, cpu) or costly(requested, cpu)
    reason = f"{requested}: set by TEXTGEN_DTYPE" + (f"; {warning}" if warning else "")
    return DtypeChoice(requested, reason, warning)


def int8_dense_dtype(cpu: CpuInfo) -> torch.dtype:
    """The dtype for the dense copy int8 layers use at large batches (textgen.model.quantize.DENSE_ROWS).

    That copy exists because at large batches a plain GEMM beats the int8 kernel; the GEMM is only fast in
    bfloat16 where bfloat16 is native, elsewhere float32 is 8x faster than emulated bfloat16.
    """
    return torch.bfloat16 if cpu.native_bf16 else torch.float32
