"""Which memory allocator the serving processes use: tcmalloc where the system has it; and how many
per-shape kernels oneDNN keeps for them (`bound_kernel_caches`).

A decoding step allocates and frees the same few-MB tensors (logits, activations, KV buffers) over and
over. torch asks for them 64-byte aligned (posix_memalign), and glibc 2.36 (Debian 12) often places such a
block on fresh pages although one of the same size was just freed (with its per-thread cache off, a loop of
them reused the block), so the kernel faults them in again. On the 2-core Xeon VM, 16 streams decoding:
steps faulted 280-340 pages each on average against 50-90 with tcmalloc, and a step carrying a prompt's
chunk faulted in all 834 pages of its [17, 50257] float32 logits 40% of the time (5-6 ms each time).
`bench/run.py` on that VM, bfloat16, three alternating runs each (bench/results/2026-12-04-amx-tcmalloc*.md
against -glibc*.md, and one pair before them): one sampled stream 68.8-72.0 tok/s against 59.7-69.1, 32
clients 675-695 against 617-628, 64 clients 713-744 against 671-702, peak RSS 1197-1199 MB against
1314-1490, time to first token 20-23 against 26-27 ms. vLLM's and Intel's CPU guides preload tcmalloc too.

An allocator is chosen when a process starts (LD_PRELOAD), so `bentoml serve`'s own process sets it for
the workers it starts (service.py calls `preload_for_workers`); each worker reports what it got
(`in_use`, in GET /info and the start-up log). No torch here: `bentoml serve`'s process never imports it.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

TCMALLOC = "libtcmalloc_minimal.so.4"  # gperftools' tcmalloc (Debian, Ubuntu: libtcmalloc-minimal4)
INSTALL_HINT = "apt-get install libtcmalloc-minimal4"
KNOWN = ("tcmalloc", "jemalloc", "mimalloc")  # allocators recognised in LD_PRELOAD and a process's libraries


def named_in(libraries: str) -> str | None:
    """The allocator a list of shared libraries (LD_PRELOAD, /proc/self/maps) names, if any."""
    return next((name for name in KNOWN if f"lib{name}" in libraries), None)


def preload_for_workers(choice: str, environ: MutableMapping[str, str] = os.environ) -> str:
    """Make the processes started from here on allocate with tcmalloc: with TEXTGEN_ALLOCATOR=auto when the
    system has it, with tcmalloc or else an error (RuntimeError, saying what to install); system keeps the C
    library's. An LD_PRELOAD already naming an allocator is left as it is. Returns what was done, for the
    log."""
    if choice == "system":
        return "the C library's malloc (TEXTGEN_ALLOCATOR=system)"
    if not sys.platform.startswith("linux"):  # LD_PRELOAD is the Linux loader's
        return f"the C library's malloc (tcmalloc is preloaded on Linux only, this is {sys.platform})"
    preloaded = environ.get("LD_PRELOAD", "")
    if named_in(preloaded):
        return f"LD_PRELOAD={preloaded}, as set"
    if ctypes.util.find_library("tcmalloc_minimal") is None:
        if choice == "tcmalloc":
            raise RuntimeError(
                f"TEXTGEN_ALLOCATOR=tcmalloc, but {TCMALLOC} is not installed: {INSTALL_HINT} "
                "(or set TEXTGEN_ALLOCATOR=system)"
            )
        return (
            "the C library's malloc: tcmalloc is not installed "
            f"({INSTALL_HINT}: 4-11% more tokens/s at 8-64 clients in textgen's benchmark)"
        )
    environ["LD_PRELOAD"] = f"{TCMALLOC}:{preloaded}" if preloaded else TCMALLOC
    # tcmalloc reports every allocation over 1 GB on stderr; a large model's weights are not news.
    environ.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return f"tcmalloc for the workers (LD_PRELOAD={environ['LD_PRELOAD']})"


# oneDNN compiles a kernel (a "primitive") per product shape and keeps the last 1024; PyTorch's oneDNN
# bindings (ideep) keep as many of their own per-shape state (LRU_CACHE_CAPACITY). A decoding batch meets a
# new shape whenever its rows or its KV width change, in its projections and its attention's matmuls
# (textgen/model/attention.py), and the memory they kept only grew: a probe of bfloat16 attention matmuls
# over 576 (rows, width) shapes kept 315 MB more allocated. Workload W on the Zen 4 EPYC (`auto`'s server,
# 1-8-32-64 clients): peak RSS 1.40-1.59 GB in five runs with both bounded to 256 (32 and 64 clients at
# 498-640 tok/s), 1.82-1.87 in five without (470-606 tok/s); the oneDNN cache alone bounded: 1.41 GB twice,
# 1.69-1.72 four times. A step uses a handful of shapes: its projections' and its attention's.
KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": 256, "LRU_CACHE_CAPACITY": 256}
_SPELLINGS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ("DNNL_PRIMITIVE_CACHE_CAPACITY",)}


def bound_kernel_caches(environ: MutableMapping[str, str] = os.environ) -> str:
    """Bound oneDNN's and ideep's per-shape caches for the processes started from here on, and for this one
    if it has not used oneDNN yet (both read the setting once); a value already in the environment is kept.
    Returns what was done, for the log."""
    done = []
    for name, size in KERNEL_CACHES.items():
        given = next((n for n in (name, *_SPELLINGS.get(name, ())) if n in environ), None)
        if given is None:
            environ[name] = str(size)
            done.append(f"{name}={size}")
        else:
            done.append(f"{given}={environ[given]} (as set)")
    return "kernel caches " + ", ".join(done)


def in_use(maps: Path = Path("/proc/self/maps")) -> str:
    """The allocator this process runs with: one of KNOWN when it is loaded, else the C library's
    ("system")."""
    try:
        return named_in(maps.read_text()) or "system"
    except OSError:
        return "system"
