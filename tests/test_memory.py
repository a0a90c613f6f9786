"""The serving process keeps the memory its steps free for the next steps (textgen/model/memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
