"""textgen::float16_linear: FBGEMM's float16 products on every thread (textgen/model/float16_op.py), built
once into the cache, the same numbers as torch's one-thread op, and its absence survived."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from textgen.model import float16_op
from textgen.model.linear import Linear, fbgemm_float16

pytestmark = pytest.mark.skipif(not fbgemm_float16(), reason="torch without FBGEMM")

ROOT = Path(__file__).resolve().parents[1]


def test_the_op_gives_torchs_products_bit_for_bit_on_every_thread(cache_dir):
    float16_op.prepare(cache_dir, background=False)  # built here, or loaded already by an earlier test
    assert float16_op.loaded() and float16_op.loaded_from().is_file()
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 64), torch.randn(300)
    layer = Linear(weight, bias, float16=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # columns split over two threads, whatever the CPU has
    try:
        for rows in (1, 3, 40, 97):
            x = torch.randn(rows, 64)
            one_thread = torch.ops._quantized.wrapped_fbgemm_linear_fp16_weight(x, layer.float16, bias, 300)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                got = layer(x)
            assert torch.equal(got, one_thread)
            assert "textgen::float16_linear" in {event.key for event in profile.key_averages()}
            assert torch.equal(torch.ops.textgen.float16_linear(x, layer.float16, None, 300) + bias, got)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="has 300 outputs, not 299"):
        torch.ops.textgen.float16_linear(x, layer.float16, None, 299)
    with pytest.raises(RuntimeError, match="takes a handle from"):  # not a handle: refused, not followed
        torch.ops.textgen.float16_linear(x, torch.zeros(64, dtype=torch.uint8), None, 300)


SCRIPT = """
import logging, sys, torch
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from textgen.model import float16_op
from textgen.model.linear import Linear
float16_op.prepare(Path(sys.argv[1]), background=False)
layer = Linear(torch.ones(8, 4), None, float16=True)
print("loaded", float16_op.loaded(), layer(torch.ones(2, 4)).sum().item())
"""


def _run(cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CXX": "/nonexistent/g++", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache)], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_built_op_loads_without_a_compiler_and_without_one_products_stay_on_one_thread(cache_dir, tmp_path):
    float16_op.prepare(cache_dir, background=False)
    # the library as a build leaves it in a cache, under the name a process looks for
    built = tmp_path / "built"
    (built / "ops").mkdir(parents=True)
    shutil.copy(float16_op.loaded_from(), float16_op.library_path(built))
    cached = _run(built)
    assert cached.returncode == 0, cached.stderr
    assert "loaded True 64.0" in cached.stdout and "float16_linear ready in" in cached.stderr

    fresh = _run(tmp_path / "cache")
    assert fresh.returncode == 0, fresh.stderr
    assert "loaded False 64.0" in fresh.stdout  # torch's one-thread op, the same numbers
    assert "stay on one thread: could not build textgen::float16_linear (no C++ compiler" in fresh.stderr
    assert "Install a C++ compiler" in fresh.stderr
