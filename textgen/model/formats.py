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

# ---------------------------------------------------------------------------------------------------------
# Choosing the weight format

# Relative increase of token-by-token perplexity against float32, measured on SmolLM2-135M-Instruct through
# the serving path: bench/results/quality.md (tests/test_cpu.py reads that file and checks these numbers).
# int8 is per-channel int8 weights with activations quantized per row as they are multiplied (FBGEMM,
# textgen/model/quantize.py): to 8 bits with AVX512-VNNI, to 7 bits on other x86 CPUs, whose cost is
# INT8_7BIT_COST. Re-measure (python bench/quality.py) and update when a format's implementation changes.
QUALITY_COST: Mapping[str, float] = {"float32": 0.0, "bfloat16": 0.0018, "int8": 0.0022}
INT8_7BIT_COST = 0.0595
MAX_QUALITY_COST = 0.01  # `auto` accepts at most +1% token-by-token perplexity (issue #12)

# Fastest first, when each runs natively: decoding streams the weights from memory, and int8 reads half the
# bytes of bfloat16, which reads half of float32. A format this CPU emulates never gets this far.
SPEED_ORDER = ("int8", "bfloat16", "float32")


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
    if dtype != "bfloat16" or cpu.native_bf16:
        return None
    cap = cpu.bf16_capped_by
    if cap is not None:  # the CPU has the units, but this process may not use them
        return (
            f"{cap} keeps oneDNN off this CPU's bfloat16 units ({cpu.raw_isa_class}), so this process "
            f"({cpu.isa_class}) emulates bfloat16"
        )
    missing = "no BF16" if cpu.is_arm else "no AVX512_BF16 or AMX"
    return f"this CPU ({cpu.isa_class}, {missing}) emulates bfloat16"


def choose_dtype(cpu: CpuInfo, quality: Mapping[str, float] | None = None) -> DtypeChoice:
    """The weight format for TEXTGEN_DTYPE=auto: the fastest one that this CPU runs natively and that costs
    at most MAX_QUALITY_COST of token-by-token perplexity against float32 (per `quality`, default
    QUALITY_COST). A format without a quality measurement is not chosen; float32 is the reference and
    always allowed.

    int8 is chosen only where it was measured faster: on x86 CPUs with native bfloat16 and AVX512-VNNI
    (which every such CPU has), where its activations are 8-bit. Without VNNI they are 7-bit, which costs
    over 1%; on ARM int8 is unmeasured. TEXTGEN_DTYPE=int8 selects it explicitly.
    """
    table = QUALITY_COST if quality is None else quality
    passed: list[str] = []
    for dtype in SPEED_ORDER:
        if dtype == "float32":
            break
        why = _not_native(dtype, cpu)
        if why is None and dtype == "int8" and (cpu.is_arm or not (cpu.native_bf16 and cpu.int8_dot)):
            why = (
                "measured faster only on x86 CPUs with native bfloat16 and int8 dot products, "
                f"not on this {cpu.isa_class} one"
            )
        cost = table.get(dtype)
        if why is None:
            if cost is None:
                why = "its quality cost has not been measured"
            elif cost > MAX_QUALITY_COST:
                why = f"perplexity +{cost:.1%} against float32, over the {MAX_QUALITY_COST:.0%} limit"
        if why is not None:
            passed.append(f"{dtype} not chosen: {why}")
            continue
        assert cost is not None
        if dtype == "int8":
            native = f"runs bfloat16 ({cpu.bf16_unit}) and int8 dot products ({cpu.int8_unit}) natively"
        else:
            native = f"computes bfloat16 natively ({cpu.bf16_unit})"
        reason = (
            f"{dtype}: this CPU {native}; quality within {MAX_QUALITY_COST:.0%} of float32 "
            f"(perplexity +{cost:.1%})"
        )
        return DtypeChoice(dtype, "; ".join([reason, *passed]))
    reason = f"float32: the fastest format this CPU ({cpu.isa_class}) runs natively within quality bounds"
    return DtypeChoice("float32", "; ".join([reason, *passed]))


def emulated(dtype: str, cpu: CpuInfo) -> str | None:
    """A warning sentence when an explicitly chosen TEXTGEN_DTYPE is emulated on this CPU, else None."""
    why = _not_native(dtype, cpu)
    if why is None:
        return None
    return (
        f"TEXTGEN_DTYPE={dtype} is emulated here: {why}; expect it to be slower than float32 "
        "(at 32 clients 2x slower on an AVX2-only EPYC, 3x under ONEDNN_MAX_CPU_ISA=AVX2 on an AMX Xeon)"
    )


def costly(dtype: str, cpu: CpuInfo) -> str | None:
    """A warning sentence when an explicitly chosen TEXTGEN_DTYPE costs this CPU more than 1% perplexity,
    else None: int8 on x86 CPUs without AVX512-VNNI, where its activations are 7-bit."""
    if dtype != "int8" or cpu.int8_activation_bits != 7:
        return None
    return (
        f"TEXTGEN_DTYPE=int8 quantizes activations to 7 bits on this CPU ({cpu.isa_class}, FBGEMM without "
        f"AVX512-VNNI): perplexity +{INT8_7BIT_COST:.1%} against float32 (+{QUALITY_COST['int8']:.1%} with "
        "VNNI; bench/results/quality.md), for about twice float32's speed at few clients"
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
