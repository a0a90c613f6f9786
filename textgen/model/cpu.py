"""Which CPU textgen runs on: the instruction sets that decide which weight formats and kernels are fast.

The weight formats are not equally fast everywhere (issue #12): on an AVX2-only AMD EPYC (Zen 3) bfloat16
`linear` is emulated at 17 GFLOP/s at any batch while float32 reaches 144 GFLOP/s, and `torch._int_mm` runs
at 5 GOP/s without VNNI, so bfloat16 and int8 there are 2x slower than float32 at 32 clients. On CPUs with
AVX512_BF16 or AMX, bfloat16 is computed natively and is the faster format. Nothing can pick well without
knowing which of these machines it is on; this module tells it, from /proc/cpuinfo (cheap, start-up safe).
Choosing the format is textgen/model/formats.py; measuring the machine, textgen/model/probe.py.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from textgen.config import available_cores

log = logging.getLogger(__name__)
CPUINFO_PATH = Path("/proc/cpuinfo")

# The /proc/cpuinfo flags that change which format is fast; the rest (sse4_2, aes, ...) are kept out of
# CpuInfo so that it, its cache key and GET /info stay short.
X86_FLAGS = frozenset(
    {
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
        "avx512_vnni",
        "avx_vnni",
        "amx_bf16",
        "amx_int8",
        "amx_tile",
        "avx512_fp16",
    }
)
# aarch64 calls them "Features": bf16 (BFDOT/BFMMLA), i8mm (int8 matrix multiply), asimddp (int8 dot
# product), sve (torch has SVE kernels).
ARM_FEATURES = frozenset({"asimd", "asimddp", "i8mm", "bf16", "sve"})

ISA_CLASSES = (
    "baseline",  # x86 below AVX2+FMA: torch's DEFAULT kernels
    "avx2",
    "avx2-vnni",  # AVX-VNNI without AVX-512 (e.g. Sierra Forest, Alder Lake)
    "avx512",
    "avx512-vnni",  # Cascade Lake, Ice Lake: int8 dot products, bfloat16 still emulated
    "avx512-bf16",  # Cooper Lake, Zen 4/5: native bfloat16
    "amx",  # Sapphire Rapids and later: bfloat16/int8 tile matrix units
    "arm64",
    "arm64-dotprod",
    "arm64-i8mm",
    "arm64-bf16",
)

# Well-known aarch64 cores by (implementer, part), because their /proc/cpuinfo has no "model name".
_ARM_PARTS = {
    ("0x41", "0xd0c"): "ARM Neoverse-N1",
    ("0x41", "0xd40"): "ARM Neoverse-V1",
    ("0x41", "0xd49"): "ARM Neoverse-N2",
    ("0x41", "0xd4f"): "ARM Neoverse-V2",
    ("0x41", "0xd8e"): "ARM Neoverse-N3",
    ("0x41", "0xd84"): "ARM Neoverse-V3",
    ("0xc0", "0xac3"): "AmpereOne",
}
_ARM_IMPLEMENTERS = {
    "0x41": "ARM",
    "0x48": "HiSilicon",
    "0x61": "Apple",
    "0xc0": "Ampere",
    "0x51": "Qualcomm",
}


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as far as speed goes. `flags` holds only the flags in X86_FLAGS / ARM_FEATURES."""

    model: str
    vendor: str
    arch: str  # "x86_64", "aarch64", or whatever platform.machine() says
    flags: frozenset[str]
    cores: int  # usable by this process (affinity and cgroup quota), not the machine's count
    torch_capability: str | None = None  # torch.backends.cpu.get_cpu_capability(); None: not checked
    flags_known: bool = True  # False when the OS gave no flags (no /proc/cpuinfo): then assume nothing
    notes: tuple[str, ...] = ()  # disagreements worth a log line (torch capability vs flags, ...)

    @property
    def is_arm(self) -> bool:
        return self.arch in ("aarch64", "arm64")

    @property
    def native_bf16(self) -> bool:
        """bfloat16 products run on bfloat16 hardware (oneDNN uses it) rather than being emulated."""
        if self.is_arm:
            return "bf16" in self.flags
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def int8_dot(self) -> bool:
        """int8×int8 dot products in hardware; without them `torch._int_mm` crawls (5 GOP/s on Zen 3)."""
        if self.is_arm:
            return "asimddp" in self.flags or "i8mm" in self.flags
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    @property
    def isa_class(self) -> str:
        """A short name for the fastest instruction set that matters here, one of ISA_CLASSES."""
        f = self.flags
        if self.is_arm:
            if "bf16" in f:
                return "arm64-bf16"
            if "i8mm" in f:
                return "arm64-i8mm"
            return "arm64-dotprod" if "asimddp" in f else "arm64"
        if not self.flags_known:
            # No flags from the OS (not Linux): torch's own detection is the best remaining evidence.
            return {"AVX512": "avx512", "AVX2": "avx2"}.get(self.torch_capability or "", "baseline")
        if "amx_tile" in f and ({"amx_bf16", "amx_int8"} & f):
            return "amx"
        if "avx512f" in f:
            if "avx512_bf16" in f:
                return "avx512-bf16"
            return "avx512-vnni" if "avx512_vnni" in f else "avx512"
        if "avx2" in f and "fma" in f:  # torch's AVX2 kernels need both
            return "avx2-vnni" if "avx_vnni" in f else "avx2"
        return "baseline"

    @property
    def bf16_unit(self) -> str | None:
        """What computes bfloat16 natively, for log lines: "AMX", "AVX512_BF16", "BF16"; None: emulated."""
        if not self.native_bf16:
            return None
        if self.is_arm:
            return "BF16"
        return "AMX" if "amx_bf16" in self.flags else "AVX512_BF16"

    @property
    def int8_unit(self) -> str | None:
        """What computes int8 dot products: "AMX-INT8", "AVX512-VNNI", "AVX-VNNI", "I8MM", "DOTPROD"."""
        for flag, name in (
            ("amx_int8", "AMX-INT8"),
            ("avx512_vnni", "AVX512-VNNI"),
            ("avx_vnni", "AVX-VNNI"),
            ("i8mm", "I8MM"),
            ("asimddp", "DOTPROD"),
        ):
            if flag in self.flags:
                return name
        return None


def detect_cpu(cpuinfo_text: str | None = None, *, torch_capability: str | None = None) -> CpuInfo:
    """The CPU this process runs on, from /proc/cpuinfo (or `cpuinfo_text`, so tests can fake a machine).

    When reading the real machine, torch's own capability check is recorded and cross-checked against the
    flags. With injected text it is not (the real torch says nothing about a faked CPU) unless
    `torch_capability` is passed too.
    """
    real = cpuinfo_text is None
    if real:
        try:
            cpuinfo_text = CPUINFO_PATH.read_text(errors="replace")
        except OSError:  # not Linux (macOS, Windows): platform info only, no flags
            cpuinfo_text = None
        if torch_capability is None:
            torch_capability = _torch_capability()
    cores = available_cores()
    if cpuinfo_text is None:
        machine = platform.machine() or "unknown"
        return _with_notes(
            CpuInfo(
                model=platform.processor() or machine,
                vendor="",
                arch=_normalize_arch(machine),
                flags=frozenset(),
                cores=cores,
                torch_capability=torch_capability,
                flags_known=False,
            ),
            real,
        )

    fields = _first_block(cpuinfo_text)
    if "flags" in fields or "vendor_id" in fields:
        arch = "x86_64"
    elif "Features" in fields or "CPU implementer" in fields:
        arch = "aarch64"
    else:
        arch = _normalize_arch(platform.machine())
    if arch == "aarch64":
        raw = fields.get("Features", "")
        flags = frozenset(raw.split()) & ARM_FEATURES
        implementer = fields.get("CPU implementer", "").lower()
        part = fields.get("CPU part", "").lower()
        vendor = _ARM_IMPLEMENTERS.get(implementer, implementer)
        model = fields.get("model name") or _ARM_PARTS.get((implementer, part), "")
        if not model:
            model = f"{vendor or 'unknown'} part {part}" if part else (platform.processor() or "aarch64")
    else:
        raw = fields.get("flags", "")
        flags = frozenset(raw.split()) & X86_FLAGS
        vendor = fields.get("vendor_id", "")
        model = fields.get("model name", "") or platform.processor() or arch
    return _with_notes(
        CpuInfo(
            model=" ".join(model.split()),
            vendor=vendor,
            arch=arch,
            flags=flags,
            cores=cores,
            torch_capability=torch_capability,
            flags_known=bool(raw.strip()),
        ),
        real,
    )


def _first_block(text: str) -> dict[str, str]:
    """Key → value of the first processor's block (every core of one machine lists the same flags)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields.get("flags") or fields.get("Features"):
                break  # end of the first complete block
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _normalize_arch(machine: str) -> str:
    machine = machine.lower()
    if machine in ("amd64", "x86_64", "x64"):
        return "x86_64"
    if machine in ("arm64", "aarch64"):
        return "aarch64"
    return machine or "unknown"


def _torch_capability() -> str | None:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch, exotic builds: the flags still decide
        return None


def _with_notes(cpu: CpuInfo, real: bool) -> CpuInfo:
    """Attach the reasons to distrust part of the picture: torch kernels below the flags, no oneDNN."""
    notes: list[str] = []
    cap = cpu.torch_capability
    if cap and cpu.flags_known and not cpu.is_arm:
        expected = (
            "AVX512" if "avx512f" in cpu.flags else ("AVX2" if cpu.isa_class.startswith("avx2") else None)
        )
        rank = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
        if expected and cap in rank and rank[cap] < rank[expected]:
            why = (
                f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} caps it"
                if real and os.environ.get("ATEN_CPU_CAPABILITY")
                else "this torch build may lack the kernels, or the CPU lacks AVX-512 BW/VL/DQ"
            )
            notes.append(
                f"torch vectorizes with {cap} although the CPU flags allow {expected} ({why}); "
                "matrix products still go through oneDNN/MKL, which detect the CPU themselves"
            )
        elif cap in rank and expected is None and rank[cap] > 0:
            notes.append(f"torch reports {cap} although /proc/cpuinfo lists no AVX2+FMA")
    if real and cpu.native_bf16 and not torch.backends.mkldnn.is_available():
        notes.append("this torch has no oneDNN, so bfloat16 products may not use the CPU's bfloat16 units")
    return replace(cpu, notes=tuple(notes)) if notes else cpu


def describe(cpu: CpuInfo | None = None) -> dict[str, Any]:
    """The CPU for GET /info and benchmark reports (JSON-ready)."""
    cpu = detect_cpu() if cpu is None else cpu
    return {
        "model": cpu.model,
        "vendor": cpu.vendor,
        "arch": cpu.arch,
        "isa_class": cpu.isa_class,
        "flags": sorted(cpu.flags),
        "cores": cpu.cores,
        "torch_capability": cpu.torch_capability,
        "native_bf16": cpu.native_bf16,
        "int8_dot": cpu.int8_dot,
        "notes": list(cpu.notes),
    }
