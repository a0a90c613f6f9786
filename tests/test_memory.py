"""The serving process keeps the memory its steps free for the next steps (textgen/model/memory.py)."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from textgen.config import ConfigError, Settings
from textgen.model import allocator

ROOT = Path(__file__).resolve().parents[1]

# Frees a 16 MB block (the size of a KV buffer of a batch) and prints what glibc's heaps hold free after.
FREE_A_BLOCK = """
import ctypes
import torch
from textgen.model.memory import keep_freed_memory

print(keep_freed_memory())
fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in fields]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
block = torch.ones(16 << 20, dtype=torch.uint8)
del block
print(mallinfo2().fordblks)
"""


def free_a_block(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", FREE_A_BLOCK],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    return out[0], int(out[1])


def glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


@pytest.mark.skipif(not glibc(), reason="glibc's malloc only")
def test_a_freed_block_stays_for_reuse_unless_the_environment_says_otherwise() -> None:
    said, kept = free_a_block()
    assert said.startswith("glibc malloc keeps freed memory")
    assert kept >= 16 << 20  # reused by the next buffer, not faulted in anew

    said, kept = free_a_block(MALLOC_TRIM_THRESHOLD_=str(128 << 10))  # glibc's default, set by the user
    assert said == "glibc malloc settings left as set in the environment"
    assert kept < 16 << 20  # glibc's own behaviour: the block was unmapped


def test_a_buffer_faulted_in_ahead_is_written_without_page_faults() -> None:
    """fault_in maps a new buffer's pages in one system call, so torch's threads writing it do not stop at
    every page (on a VM, ~6 us each: a KV buffer's growth was most of a decoding step)."""
    import resource

    import torch

    from textgen.model import memory

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    buffer = torch.empty(64 << 20, dtype=torch.uint8)  # past glibc's mmap threshold: fresh pages
    memory.fault_in(buffer)
    if not memory._populating:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14 and later)")
    before = faults()
    buffer.fill_(1)
    pages = buffer.nbytes // memory.PAGE_BYTES
    assert faults() - before < pages // 100


# textgen/model/allocator.py: the allocator `bentoml serve` hands its workers.


def test_the_workers_get_tcmalloc_when_the_system_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libtcmalloc_minimal.so.4")
    environ = {"LD_PRELOAD": "libfoo.so"}
    assert "tcmalloc" in allocator.preload_for_workers("auto", environ)
    assert environ["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:libfoo.so"  # the user's preload kept
    environ = {}
    allocator.preload_for_workers("tcmalloc", environ)
    assert environ["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    # Asked for the system's, or another allocator already preloaded: left alone.
    for choice, preloaded in (("system", ""), ("auto", "/usr/lib/libjemalloc.so.2")):
        environ = {"LD_PRELOAD": preloaded} if preloaded else {}
        allocator.preload_for_workers(choice, environ)
        assert environ.get("LD_PRELOAD", "") == preloaded


def test_tcmalloc_is_preloaded_on_linux_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libtcmalloc_minimal.dylib")
    monkeypatch.setattr(sys, "platform", "darwin")
    environ: dict[str, str] = {}
    assert "Linux only" in allocator.preload_for_workers("auto", environ) and environ == {}


def test_without_tcmalloc_auto_keeps_the_system_allocator_and_tcmalloc_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    environ: dict[str, str] = {}
    assert "apt-get install libtcmalloc-minimal4" in allocator.preload_for_workers("auto", environ)
    assert environ == {}
    with pytest.raises(RuntimeError, match="apt-get install libtcmalloc-minimal4"):
        allocator.preload_for_workers("tcmalloc", environ)
    with pytest.raises(ConfigError, match="TEXTGEN_ALLOCATOR must be one of auto, tcmalloc, system"):
        Settings.from_env({"TEXTGEN_ALLOCATOR": "tcmaloc"})


def test_a_process_knows_which_allocator_it_runs_with(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n")
    assert allocator.in_use(maps) == "tcmalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.in_use(maps) == "system"


def test_the_kernel_caches_are_bounded_unless_the_environment_says_otherwise() -> None:
    """oneDNN's and ideep's per-shape caches grew with every new shape a batch met (allocator.py)."""
    environ: dict[str, str] = {}
    allocator.bound_kernel_caches(environ)
    assert environ == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256", "LRU_CACHE_CAPACITY": "256"}
    environ = {"DNNL_PRIMITIVE_CACHE_CAPACITY": "2048", "LRU_CACHE_CAPACITY": "64"}
    assert "as set" in allocator.bound_kernel_caches(environ)
    assert environ == {"DNNL_PRIMITIVE_CACHE_CAPACITY": "2048", "LRU_CACHE_CAPACITY": "64"}
