"""A short, cached hardware probe: memory bandwidth (1-row products) and GEMM peak per weight format.

It measures the machine instead of trusting its flags. It takes a few seconds, so it is cached on disk and
never runs on the server start-up path; benchmarks (bench/run.py: the roofline) and GET /info read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from textgen.model.cpu import CpuInfo, detect_cpu
from textgen.model.formats import int8_dense_dtype
from textgen.model import float16_op
from textgen.model.linear import Linear, fbgemm_float16
from textgen.model.quantize import Int8Linear

log = logging.getLogger(__name__)
CACHE_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")
# ---------------------------------------------------------------------------------------------------------
# Hardware probe

PROBE_VERSION = 8  # bump when what or how the probe measures changes: old cache files stop matching
GEMV_SHAPE = (8192, 4096)  # [out, in]: 128 MB in float32, beyond the cache of most (not all) CPUs
GEMM_SHAPE = (1024, 1024, 1024)  # rows, in, out: 2.1 GFLOP per product
BUDGET_S = 0.25  # timing per measurement, after one warm-up call


@dataclass(frozen=True)
class Probe:
    """What this machine measured, with the sizes used (so a cache-resident "bandwidth" is recognizable)."""

    cpu_model: str
    isa_class: str
    threads: int
    torch_version: str
    gemv_shape: tuple[int, int]  # weight [out, in] of the 1-row products
    gemv_bytes: int  # of that weight in float32 (half in bfloat16, a quarter in int8)
    l3_bytes: int | None  # last-level cache the OS reports; when above gemv_bytes, bandwidth is cache speed
    # float32 / bfloat16 / int8: weight bytes read per second by a 1-row product; "read": by a plain sum of
    # the same bytes, the memory's own rate where a format's product kernel streams slower than it
    bandwidth_gbs: Mapping[str, float | None]
    gemm_shape: tuple[int, int, int]  # rows, in, out
    gemm_gflops: Mapping[str, float | None]  # float32 / bfloat16
    seconds: float  # time the measurement took
    measured_at: str  # ISO 8601, UTC
    cached: bool = False  # True when read back from the cache file instead of measured now
    errors: Mapping[str, str] = field(default_factory=dict)  # format → why it could not be measured

    @property
    def gemv_exceeds_l3(self) -> bool | None:
        return None if self.l3_bytes is None else self.gemv_bytes > self.l3_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gemv_exceeds_l3"] = self.gemv_exceeds_l3
        return data


def _probe_key(
    cpu: CpuInfo, threads: int, gemv_shape: tuple[int, int], gemm_shape: tuple[int, int, int]
) -> dict[str, Any]:
    return {
        "version": PROBE_VERSION,
        "cpu_model": cpu.model,
        "flags": sorted(cpu.flags),
        # The same CPU under ONEDNN_MAX_CPU_ISA=AVX2 (or another cap) measures something else (bfloat16
        # GEMM 33 instead of 1343 GFLOP/s on the AMX Xeon): a capped measurement is its own cache entry.
        "raw_flags": sorted(cpu.raw_flags or ()),
        "caps": [str(cap) for cap in cpu.caps],
        "torch_version": torch.__version__,
        "threads": threads,
        "gemv_shape": list(gemv_shape),
        "gemm_shape": list(gemm_shape),
    }


def _probe_path(cache_dir: Path, key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"cpu-probe-{digest}.json"


def load_probe(
    cache_dir: Path,
    threads: int,
    *,
    cpu: CpuInfo | None = None,
    gemv_shape: tuple[int, int] = GEMV_SHAPE,
    gemm_shape: tuple[int, int, int] = GEMM_SHAPE,
) -> Probe | None:
    """The cached probe for this machine, or None, without measuring: cheap enough for GET /info."""
    cpu = detect_cpu() if cpu is None else cpu
    key = _probe_key(cpu, threads, gemv_shape, gemm_shape)
    try:
        data = json.loads(_probe_path(cache_dir, key).read_text())
        if data.get("key") != key:
            return None
        result = data["result"]
        return Probe(
            **{
                **result,
                "gemv_shape": tuple(result["gemv_shape"]),
                "gemm_shape": tuple(result["gemm_shape"]),
                "cached": True,
            }
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("ignoring unreadable CPU probe cache in %s: %s", cache_dir, exc)
        return None


def probe(
    cache_dir: Path,
    threads: int,
    *,
    cpu: CpuInfo | None = None,
    gemv_shape: tuple[int, int] = GEMV_SHAPE,
    gemm_shape: tuple[int, int, int] = GEMM_SHAPE,
    budget_s: float = BUDGET_S,
) -> Probe:
    """Memory bandwidth and GEMM peak per format on `threads` threads, measured once per machine and cached.

    The cache file is keyed by CPU model, flags, torch version, threads and sizes; a later call on the same
    machine reads it back. Measuring takes ~2-3 s at the default sizes, so keep it off the start-up path.
    """
    cpu = detect_cpu() if cpu is None else cpu
    cached = load_probe(cache_dir, threads, cpu=cpu, gemv_shape=gemv_shape, gemm_shape=gemm_shape)
    if cached is not None:
        return cached
    started = time.perf_counter()
    if fbgemm_float16():  # float16-int8head's products as its layers run them: on every thread
        float16_op.prepare(cache_dir, background=False)
    int8_compute = int8_dense_dtype(cpu)  # what textgen's int8 layers multiply in on this CPU
    bandwidth, gflops, errors = _measure(threads, gemv_shape, gemm_shape, budget_s, int8_compute)
    result = Probe(
        cpu_model=cpu.model,
        isa_class=cpu.isa_class,
        threads=threads,
        torch_version=torch.__version__,
        gemv_shape=gemv_shape,
        gemv_bytes=gemv_shape[0] * gemv_shape[1] * 4,
        l3_bytes=_l3_bytes(),
        bandwidth_gbs=bandwidth,
        gemm_shape=gemm_shape,
        gemm_gflops=gflops,
        seconds=round(time.perf_counter() - started, 3),
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        errors=errors,
    )
    key = _probe_key(cpu, threads, gemv_shape, gemm_shape)
    data = {"key": key, "result": {k: v for k, v in asdict(result).items() if k != "cached"}}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader never sees half a file.
        with tempfile.NamedTemporaryFile("w", dir=cache_dir, suffix=".tmp", delete=False) as tmp:
            json.dump(data, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, _probe_path(cache_dir, key))
    except OSError as exc:  # a read-only cache is no reason to lose the measurement
        log.warning("could not cache the CPU probe in %s: %s", cache_dir, exc)
    return result


def _measure(
    threads: int,
    gemv_shape: tuple[int, int],
    gemm_shape: tuple[int, int, int],
    budget_s: float,
    int8_compute: torch.dtype = torch.bfloat16,
) -> tuple[dict[str, float | None], dict[str, float | None], dict[str, str]]:
    """(GB/s per format for 1-row products, GFLOP/s per format for `gemm_shape`, errors per format)."""
    bandwidth: dict[str, float | None] = {}
    gflops: dict[str, float | None] = {}
    errors: dict[str, str] = {}

    def record(table: dict[str, float | None], name: str, work: float, fn: Callable[[], Any]) -> None:
        try:
            table[name] = _per_second(work, _best_time(fn, budget_s))
        except Exception as exc:  # e.g. a torch build without FBGEMM: report the rest
            table[name] = None
            errors[name] = f"{type(exc).__name__}: {exc}"

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out_f, in_f = gemv_shape
            w32 = torch.empty(out_f, in_f).uniform_(-1, 1)
            x32 = torch.randn(1, in_f)
            # Each call bound to its tensors now (partial), not by name: the weights are deleted once read.
            record(bandwidth, "float32", w32.nbytes, partial(F.linear, x32, w32))
            if torch.backends.mkldnn.is_available():  # float32-packed's product (textgen/model/linear.py)
                packed = Linear(w32, None, pack_float32=True)
                record(bandwidth, "float32-packed", w32.nbytes, partial(packed, x32))
                del packed
            if fbgemm_float16():  # float16-int8head's layers' product: float16 weights, FBGEMM's
                half = Linear(w32, None, float16=True)
                record(bandwidth, "float16", w32.nbytes // 2, partial(half, x32))
                del half
            reads: dict[str, float | None] = {}  # plain sums of the same bytes
            record(reads, "read float32", w32.nbytes, w32.sum)
            w16, x16 = w32.to(torch.bfloat16), x32.to(torch.bfloat16)
            del w32  # 128 MB at the default size: keep the peak down
            record(bandwidth, "bfloat16", w16.nbytes, partial(F.linear, x16, w16))
            record(reads, "read bfloat16", w16.nbytes, w16.sum)
            # A plain read beat oneDNN's 1-row bfloat16 product on an AMD EPYC (Zen 4): 37.5-45 against
            # 18.6-21.2 GB/s, and inductor's GEMM template streamed at 32.5 (textgen/model/compiled.py).
            # The faster of two sums stands for the memory's rate: a roofline below a kernel's rate is no
            # roof.
            bandwidth["read"] = max((r for r in reads.values() if r is not None), default=None)
            # textgen's int8 path (textgen.model.quantize): FBGEMM's int8 product at one row.
            int8 = Int8Linear(w16.to(int8_compute), None)
            x8 = x32.to(int8_compute)
            del w16
            record(bandwidth, "int8", out_f * in_f + 4 * out_f, partial(int8, x8))
            del int8
            rows, in_g, out_g = gemm_shape
            work = 2.0 * rows * in_g * out_g
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                w = torch.empty(out_g, in_g, dtype=dtype).uniform_(-1, 1)
                x = torch.empty(rows, in_g, dtype=dtype).uniform_(-1, 1)
                record(gflops, name, work, lambda: F.linear(x, w))
                if dtype == torch.float32 and torch.backends.mkldnn.is_available():
                    packed = Linear(w, None, pack_float32=True)
                    record(gflops, "float32-packed", work, lambda: packed(x))
                if dtype == torch.float32 and fbgemm_float16():
                    half = Linear(w, None, float16=True)
                    record(gflops, "float16", work, lambda: half(x))
    finally:
        torch.set_num_threads(previous)
    return bandwidth, gflops, errors


def _per_second(work: float, seconds: float) -> float:
    """`work` per second in billions, to 4 significant digits: a real rate never reads as 0 (to 2 decimals,
    a tiny probe's one call slowed by a busy host did: 2 KB in 0.5 ms, 0.004 GB/s, recorded as 0.0)."""
    return float(f"{work / seconds / 1e9:.4g}")


def _best_time(fn: Callable[[], Any], budget_s: float, max_reps: int = 200) -> float:
    """Fastest of repeated calls within `budget_s` (at least one after a warm-up): the machine's capability,
    not its noise from other processes."""
    fn()  # warm-up: oneDNN primitive creation, page faults of the output
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    for _ in range(max_reps):
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        best = min(best, end - start)
        if end >= deadline:
            break
    return max(best, 1e-9)


def _l3_bytes() -> int | None:
    """Size of the largest cache level the OS reports for cpu0, or None (not Linux)."""
    sizes: list[int] = []
    for index in CACHE_SYSFS.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)\s*([KMG]?)", text, re.IGNORECASE)
        if match:
            sizes.append(int(match[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match[2].upper()])
    return max(sizes) if sizes else None
