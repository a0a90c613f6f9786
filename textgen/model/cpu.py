"""Which CPU textgen runs on: the instruction sets that decide which weight formats and kernels are fast.

The weight formats are not equally fast everywhere (issue #12): on an AVX2-only AMD EPYC (Zen 3) bfloat16
`linear` is emulated at 17 GFLOP/s at any batch while float32 reaches 144 GFLOP/s, and `torch._int_mm` runs
at 5 GOP/s without VNNI, so bfloat16 and int8 there are 2x slower than float32 at 32 clients. On CPUs with
AVX512_BF16 or AMX, bfloat16 is computed natively and is the faster format. Nothing can pick well without
knowing which of these machines it is on; this module tells it, from /proc/cpuinfo (cheap, start-up safe).
Choosing the format is textgen/model/formats.py; measuring the machine, textgen/model/probe.py.

What the CPU has is not always what this process may use: the kernel libraries honour ISA caps set in the
environment (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY), and a format that is native on
the CPU is emulated under a cap below it. So CpuInfo keeps the raw flags and the effective ones (the raw flags
minus what the caps forbid), and the format choice reads the effective ones.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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


# ---------------------------------------------------------------------------------------------------------
# Kernel-library ISA caps
#
# Measured on the AMX Xeon (KVM, family 6 model 167, torch 2.13.0+cpu with oneDNN 3.12 and oneMKL 2024.2,
# 2 threads; bench/results/isa-caps.md): a 1024^3 GEMM in bfloat16 runs at 1343 GFLOP/s, 33 with
# ONEDNN_MAX_CPU_ISA=AVX2, 68 with AVX512_CORE, 199 with AVX512_CORE_BF16 (bfloat16 products are oneDNN's,
# and only oneDNN's cap makes them emulated); in float32 at 332, 199 with MKL_ENABLE_INSTRUCTIONS=AVX2
# (float32 products are oneMKL's); ATEN_CPU_CAPABILITY=avx2 turns torch.backends.cpu.get_cpu_capability() to
# AVX2 and the int8 weight-only kernel (_weight_int8pack_mm, ATen's own) from 75 to 57 GFLOP/s at one row.
# Neither the MKL nor the ATen cap slowed bfloat16 products (1326, 1353 GFLOP/s). Spellings, checked in their
# verbose logs: oneDNN takes any case and ignores unknown values, oneMKL takes upper case only, ATen lower
# case only (other spellings are ignored, by ATen with a warning).

# oneDNN: the flags each ONEDNN_MAX_CPU_ISA value leaves usable; None: no cap. Partial order from oneDNN's
# dispatcher docs: SSE41 < AVX < AVX2 < AVX2_VNNI < AVX2_VNNI_2; AVX2 < AVX512_CORE < AVX512_CORE_VNNI <
# AVX512_CORE_BF16 < AVX10_1_512 < AVX10_1_512_AMX < AVX10_1_512_AMX_FP16; AVX2_VNNI < AVX10_1_512.
_AVX2 = frozenset({"avx2", "fma"})
_AVX512 = _AVX2 | {"avx512f"}
_AVX10_1 = _AVX512 | {"avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni"}
_ONEDNN_ALLOWED: Mapping[str, frozenset[str] | None] = {
    "SSE41": frozenset(),
    "AVX": frozenset(),
    "AVX2": _AVX2,
    "AVX2_VNNI": _AVX2 | {"avx_vnni"},
    "AVX2_VNNI_2": _AVX2 | {"avx_vnni"},
    "AVX512_CORE": _AVX512,
    "AVX512_CORE_VNNI": _AVX512 | {"avx512_vnni"},
    "AVX512_CORE_BF16": _AVX512 | {"avx512_vnni", "avx512_bf16"},
    "AVX10_1_512": _AVX10_1,
    "AVX512_CORE_FP16": _AVX10_1,
    "AVX10_1_512_AMX": None,  # every flag textgen looks at
    "AVX512_CORE_AMX": None,
    "AVX10_1_512_AMX_FP16": None,
    "AVX512_CORE_AMX_FP16": None,
    "DEFAULT": None,
}
# oneMKL (MKL_ENABLE_INSTRUCTIONS; its docs: honoured on Intel CPUs only).
_MKL_ALLOWED: Mapping[str, frozenset[str] | None] = {
    "SSE4_2": frozenset(),
    "AVX": frozenset(),
    "AVX2": _AVX2,
    "AVX2_E1": _AVX2 | {"avx_vnni"},
    "AVX512": _AVX512,
    "AVX512_E1": _AVX512 | {"avx512_vnni"},
    "AVX512_E2": _AVX512 | {"avx512_vnni"},
    "AVX512_E3": _AVX512 | {"avx512_vnni", "avx512_bf16"},
    "AVX512_E4": None,  # AMX, FP16
}
# FBGEMM, int8 products (FBGEMM_ENABLE_INSTRUCTIONS; any case, unknown values ignored, checked in this torch
# build): "E1" is AVX512-VNNI, "_256" the same instructions on 256-bit registers.
_FBGEMM_ALLOWED: Mapping[str, frozenset[str] | None] = {
    "AVX2": _AVX2,
    "AVX512": _AVX512,
    "AVX512_256": _AVX512,
    "AVX512_E1": None,
    "AVX512_E1_256": None,
}
# torch's own vectorized kernels (ATEN_CPU_CAPABILITY; torch.backends.cpu.get_cpu_capability() names).
_ATEN_ALLOWED: Mapping[str, frozenset[str] | None] = {
    "DEFAULT": frozenset(),
    "AVX2": _AVX2,
    "AVX512": None,
}


@dataclass(frozen=True)
class IsaCap:
    """One environment variable that keeps a kernel library below what the CPU has."""

    variable: str  # as set: ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA), MKL_ENABLE_INSTRUCTIONS, ...
    value: str
    library: str  # "oneDNN", "oneMKL", "FBGEMM", "ATen"
    removed: frozenset[str]  # flags of this CPU that the library may not use

    def __str__(self) -> str:
        return f"{self.variable}={self.value}"


# What each library computes in textgen, for the notes.
_LIBRARY_WORK = {
    "oneDNN": "bfloat16 and float32-packed matrix products",
    "oneMKL": "float32 matrix products (F.linear)",
    "FBGEMM": "int8 matrix products",
    "ATen": "torch's own vectorized kernels: elementwise ops, int8 weight-only products on ARM",
}


def _caps(flags: frozenset[str], vendor: str, env: Mapping[str, str]) -> tuple[list[IsaCap], list[str]]:
    """The caps in `env` that apply to an x86 CPU with `flags`, and notes on values the libraries ignore."""
    caps: list[IsaCap] = []
    notes: list[str] = []

    def add(variable: str, value: str, library: str, allowed: frozenset[str] | None) -> None:
        removed = frozenset() if allowed is None else flags - allowed
        caps.append(IsaCap(variable, value, library, removed))

    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # DNNL_: oneDNN's older prefix
        value = env.get(variable, "").strip()
        if value:
            if value.upper() in _ONEDNN_ALLOWED:
                add(variable, value, "oneDNN", _ONEDNN_ALLOWED[value.upper()])
            else:
                notes.append(f"{variable}={value} is not a oneDNN ISA name; oneDNN ignores it")
            break  # oneDNN reads ONEDNN_ first
    value = env.get("MKL_ENABLE_INSTRUCTIONS", "").strip()
    if value:
        if vendor and vendor != "GenuineIntel":
            notes.append(f"MKL_ENABLE_INSTRUCTIONS={value} ignored: oneMKL honours it on Intel CPUs only")
        elif value in _MKL_ALLOWED:
            add("MKL_ENABLE_INSTRUCTIONS", value, "oneMKL", _MKL_ALLOWED[value])
        else:
            notes.append(
                f"MKL_ENABLE_INSTRUCTIONS={value} is not a oneMKL value (upper case); oneMKL ignores it"
            )
    value = env.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip()
    if value:
        if value.upper() in _FBGEMM_ALLOWED:
            add("FBGEMM_ENABLE_INSTRUCTIONS", value, "FBGEMM", _FBGEMM_ALLOWED[value.upper()])
        else:
            notes.append(f"FBGEMM_ENABLE_INSTRUCTIONS={value} is not an FBGEMM ISA name; FBGEMM ignores it")
    value = env.get("ATEN_CPU_CAPABILITY", "").strip()
    if value:
        if value in ("default", "avx2", "avx512"):
            add("ATEN_CPU_CAPABILITY", value, "ATen", _ATEN_ALLOWED[value.upper()])
        else:
            notes.append(
                f"ATEN_CPU_CAPABILITY={value} is not default, avx2 or avx512 (lower case); torch ignores it"
            )
    return caps, notes


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as far as speed goes, for this process. Flags are only those in X86_FLAGS / ARM_FEATURES.

    `flags` are the effective ones: what /proc/cpuinfo lists (`raw_flags`) minus what any kernel-library cap
    forbids; the ISA class comes from them. Each library is capped on its own (`usable_by`): bfloat16 and
    int8 matrix products are oneDNN's (measured above), so whether they are native reads oneDNN's flags.
    """

    model: str
    vendor: str
    arch: str  # "x86_64", "aarch64", or whatever platform.machine() says
    flags: frozenset[str]
    cores: int  # usable by this process (affinity and cgroup quota), not the machine's count
    torch_capability: str | None = None  # torch.backends.cpu.get_cpu_capability(); None: not checked
    flags_known: bool = True  # False when the OS gave no flags (no /proc/cpuinfo): then assume nothing
    notes: tuple[str, ...] = ()  # disagreements worth a log line (torch capability vs flags, caps, ...)
    raw_flags: frozenset[str] | None = None  # what /proc/cpuinfo lists; None: the same as `flags`
    caps: tuple[IsaCap, ...] = field(default=())  # the caps set for this process that apply to this CPU

    def __post_init__(self) -> None:
        if self.raw_flags is None:
            object.__setattr__(self, "raw_flags", self.flags)

    def usable_by(self, library: str) -> frozenset[str]:
        """The flags one kernel library ("oneDNN", "oneMKL", "FBGEMM", "ATen") may use here: the raw ones minus
        its caps."""
        assert self.raw_flags is not None
        return self.raw_flags.difference(*(cap.removed for cap in self.caps if cap.library == library))

    @property
    def capped(self) -> bool:
        """A cap keeps some library below this CPU's instruction sets."""
        return any(cap.removed for cap in self.caps)

    @functools.cached_property
    def raw_isa_class(self) -> str:
        """The ISA class of the CPU itself, whatever the caps. Cached: the attention asks it in every layer
        of every step (`compiled_attention_wins`), and each answer made a new CpuInfo (0.6% of the engine
        thread's samples at 8 streaming clients, Zen 4 EPYC)."""
        assert self.raw_flags is not None
        return replace(self, flags=self.raw_flags, caps=()).isa_class

    @property
    def bf16_capped_by(self) -> IsaCap | None:
        """The cap that makes bfloat16 emulated in this process although the CPU computes it natively."""
        if self.native_bf16 or self.is_arm:
            return None
        assert self.raw_flags is not None
        if not ({"avx512_bf16", "amx_bf16"} & self.raw_flags):
            return None
        return next((cap for cap in self.caps if cap.library == "oneDNN" and cap.removed), None)

    @property
    def is_arm(self) -> bool:
        return self.arch in ("aarch64", "arm64")

    @property
    def native_bf16(self) -> bool:
        """bfloat16 products run on bfloat16 hardware (oneDNN uses it) rather than being emulated."""
        if self.is_arm:
            return "bf16" in self.flags
        return bool({"avx512_bf16", "amx_bf16"} & self.usable_by("oneDNN"))

    @property
    def native_fp16(self) -> bool:
        """float16 arithmetic in hardware (AVX512-FP16, Sapphire Rapids and later), which torch's float16
        attention and products use. Read from the raw flags: torch's kernels check the CPU itself, not the
        libraries' caps (under AVX2 caps on the AMX Xeon its float16 attention stayed fast, session 28).
        Without it they compute through float32 one element at a time: on an AVX2 EPYC (Zen 3), GPT-2's
        12 heads, SDPA in float16 took 5-14x its time in float32 (textgen/model/attention.py)."""
        assert self.raw_flags is not None
        return not self.is_arm and "avx512_fp16" in self.raw_flags

    @property
    def int8_dot(self) -> bool:
        """int8 dot products summed in 32 bits in hardware, as textgen's int8 products use them: on x86
        FBGEMM's AVX512-VNNI kernel (textgen/model/quantize.py; FBGEMM has none for AVX-VNNI or AMX)."""
        if self.is_arm:
            return "asimddp" in self.flags or "i8mm" in self.flags
        return "avx512_vnni" in self.usable_by("FBGEMM")

    @property
    def int8_weight_bits(self) -> int:
        """Bits of textgen's int8 weights on this CPU (textgen/model/quantize.py): 8 where FBGEMM multiplies
        with VNNI (and on ARM, where int8 is weight-only); 7 with FBGEMM's AVX2 and AVX-512 kernels, which
        add pairs of u8 x s8 products in 16 bits that 8-bit weights overflow."""
        return 8 if self.is_arm or self.int8_dot else 7

    def avx2_for(self, library: str) -> bool:
        """Whether `library` ("oneDNN", "FBGEMM", ...) may use AVX2 and FMA on this x86 CPU (its caps apply)."""
        return not self.is_arm and self.flags_known and _AVX2 <= self.usable_by(library)

    @property
    def fbgemm_kernels(self) -> bool:
        """FBGEMM has kernels for this CPU (it needs AVX2 and FMA): textgen's int8 products run on them."""
        return self.avx2_for("FBGEMM")

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
        return "AMX" if "amx_bf16" in self.usable_by("oneDNN") else "AVX512_BF16"

    @property
    def int8_unit(self) -> str | None:
        """What computes textgen's int8 dot products: "AVX512-VNNI", "I8MM", "DOTPROD"; None: none."""
        usable = self.flags if self.is_arm else self.usable_by("FBGEMM")
        for flag, name in (
            ("avx512_vnni", "AVX512-VNNI"),
            ("i8mm", "I8MM"),
            ("asimddp", "DOTPROD"),
        ):
            if flag in usable:
                return name
        return None


def detect_cpu(
    cpuinfo_text: str | None = None,
    *,
    torch_capability: str | None = None,
    env: Mapping[str, str] | None = None,
) -> CpuInfo:
    """The CPU this process runs on, from /proc/cpuinfo (or `cpuinfo_text`, so tests can fake a machine).

    When reading the real machine, torch's own capability check is recorded and cross-checked against the
    flags, and the kernel-library caps come from this process's environment. With injected text neither
    is (the real torch and environment say nothing about a faked CPU) unless `torch_capability` or `env`
    is passed too.
    """
    real = cpuinfo_text is None
    if env is None:
        env = os.environ if real else {}
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
            [],
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
    caps, cap_notes = _caps(flags, vendor, env) if arch == "x86_64" else ([], [])
    return _with_notes(
        CpuInfo(
            model=" ".join(model.split()),
            vendor=vendor,
            arch=arch,
            flags=flags - frozenset().union(*(c.removed for c in caps)),
            cores=cores,
            torch_capability=torch_capability,
            flags_known=bool(raw.strip()),
            raw_flags=flags,
            caps=tuple(caps),
        ),
        real,
        cap_notes,
    )


@functools.cache
def this_cpu() -> CpuInfo:
    """The CPU this process runs on, detected once: for choices made at every step (attention's kernel,
    textgen/model/attention.py)."""
    return detect_cpu()


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


def _with_notes(cpu: CpuInfo, real: bool, cap_notes: list[str]) -> CpuInfo:
    """Attach the reasons to distrust part of the picture: kernel-library caps, torch kernels below the
    flags, no oneDNN."""
    notes = list(cap_notes)
    for cap in cpu.caps:
        if not cap.removed:
            continue
        note = (
            f"{cap} keeps {cap.library} ({_LIBRARY_WORK[cap.library]}) off {', '.join(sorted(cap.removed))}"
        )
        if cap is cpu.bf16_capped_by:
            note += ": bfloat16 products are emulated in this process"
        notes.append(note)
    torch_cap = cpu.torch_capability
    aten_capped = any(c.library == "ATen" for c in cpu.caps)
    if torch_cap and cpu.flags_known and not cpu.is_arm and not aten_capped:
        raw = cpu.raw_flags or frozenset()
        expected = "AVX512" if "avx512f" in raw else ("AVX2" if _AVX2 <= raw else None)
        rank = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
        if expected and torch_cap in rank and rank[torch_cap] < rank[expected]:
            notes.append(
                f"torch vectorizes with {torch_cap} although the CPU flags allow {expected} (this torch build "
                "may lack the kernels, or the CPU lacks AVX-512 BW/VL/DQ); matrix products still go through "
                "oneDNN/MKL, which detect the CPU themselves"
            )
        elif torch_cap in rank and expected is None and rank[torch_cap] > 0:
            notes.append(f"torch reports {torch_cap} although /proc/cpuinfo lists no AVX2+FMA")
    if real and cpu.native_bf16 and not torch.backends.mkldnn.is_available():
        notes.append("this torch has no oneDNN, so bfloat16 products may not use the CPU's bfloat16 units")
    return replace(cpu, notes=tuple(notes)) if notes else cpu


def describe(cpu: CpuInfo | None = None) -> dict[str, Any]:
    """The CPU for GET /info and benchmark reports (JSON-ready): the effective picture (`isa_class`,
    `flags`), the CPU's own (`raw_isa_class`, `raw_flags`) and the caps set for this process."""
    cpu = detect_cpu() if cpu is None else cpu
    return {
        "model": cpu.model,
        "vendor": cpu.vendor,
        "arch": cpu.arch,
        "isa_class": cpu.isa_class,
        "flags": sorted(cpu.flags),
        "raw_isa_class": cpu.raw_isa_class,
        "raw_flags": sorted(cpu.raw_flags or ()),
        "caps": [str(cap) for cap in cpu.caps],
        "capped": cpu.capped,
        "cores": cpu.cores,
        "torch_capability": cpu.torch_capability,
        "native_bf16": cpu.native_bf16,
        "int8_dot": cpu.int8_dot,
        "int8_weight_bits": cpu.int8_weight_bits,
        "notes": list(cpu.notes),
    }
