"""textgen::float16_linear: FBGEMM's float16-weight products on all threads, built once and cached.

float16-int8head's layers (textgen/model/linear.py) keep their weights in FBGEMM's float16 packing behind a
tensor handle, the only form a compiled program can take (textgen/model/compiled.py). torch's op on that
handle (`_quantized.wrapped_fbgemm_linear_fp16_weight`) asks FBGEMM for one thread; its op on the same packing
held as an object (`quantized::linear_dynamic_fp16`) splits the columns over every thread, but an object
cannot be a program's input. float16_linear.cpp is ~15 lines that call the object's method through the
handle. GPT-2's 48 block products read from memory, AMD EPYC Zen 3, 2 threads (session 46), torch's handle
op against this one: 1 row 11.8 against 7.9 ms, 8 rows 25.3 against 15.1, 32 rows 83.7 against 39.8, 128
rows 288 against 145; the outputs are bit for bit the same (each column is FBGEMM's same sum, only spread
over threads). In a served decoding step of one stream the products had taken 76% of its time.

The library is built by the C++ compiler (`CXX`, else g++; the one compiled passes need too) against the
installed torch's headers, ~10 s on that EPYC, into TEXTGEN_CACHE_DIR/ops/ under a name keyed by the source
and torch's version; later starts load it in milliseconds. The server builds it in a thread at the lowest
priority and its layers use torch's one-thread op until it is there (`prepare`); a process that compiles a
pass waits for it (`wait`). Without a compiler the products stay on one thread and the log says so once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("float16_linear.cpp")

_lock = threading.Lock()
_loaded: Path | None = None  # the library this process loaded
_builder: threading.Thread | None = None


def loaded() -> bool:
    """Whether torch.ops.textgen.float16_linear is there (Linear.forward asks at every call)."""
    return _loaded is not None


def loaded_from() -> Path | None:
    """The library this process loaded the op from (once per process, whichever cache asked first)."""
    return _loaded


def prepare(cache_dir: Path, background: bool = True) -> None:
    """Load the op from the cache, or build it (in a low-priority thread with `background`) and load it."""
    with _lock:
        if _loaded is None and _builder is None:
            _start(cache_dir)
    if not background:
        wait()  # this call's build, or one an earlier call started


def _start(cache_dir: Path) -> None:
    global _builder
    try:
        path = library_path(cache_dir)
    except OSError as exc:  # a copy of textgen without float16_linear.cpp
        _warn(exc)
        return
    if path.exists():  # built before: a load (or, if it cannot, the warning)
        _build_and_load(path)
        return
    _builder = threading.Thread(target=_build_and_load, args=(path,), name="textgen-float16-op", daemon=True)
    _builder.start()


def wait(timeout: float | None = None) -> bool:
    """Wait for a build that `prepare` started; whether the op is loaded."""
    builder = _builder
    if builder is not None:
        builder.join(timeout)
    return loaded()


def library_path(cache_dir: Path) -> Path:
    """Where the library for this source and this torch lies (not where either is installed: a copy of the
    project elsewhere finds the same library)."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join([torch.__version__, *FLAGS, f"abi={_abi()}"]).encode())
    return cache_dir / "ops" / f"float16_linear-{digest.hexdigest()[:16]}.so"


FLAGS = ["-O2", "-shared", "-fPIC", "-std=c++20"]


def _abi() -> int:
    return int(torch._C._GLIBCXX_USE_CXX11_ABI)


def _command(target: Path) -> list[str]:
    from torch.utils import cpp_extension

    includes = [flag for path in cpp_extension.include_paths() for flag in ("-I", path)]
    lib = cpp_extension.library_paths()[0]
    compiler = os.environ.get("CXX") or "g++"
    flags = [*FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={_abi()}", *includes]
    return [
        compiler,
        *flags,
        str(SOURCE),
        "-o",
        str(target),
        f"-L{lib}",
        "-ltorch_cpu",
        "-lc10",
        f"-Wl,-rpath,{lib}",
    ]


def _build_and_load(path: Path) -> None:
    started = time.perf_counter()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One build for every process sharing the cache (the server and its compiling process)
        with open(path.parent / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                _build(path)
        _load(path)
    except Exception as exc:  # no compiler, no headers, a torch without FBGEMM's classes: one thread it is
        _warn(exc)
        return
    log.info(
        "FBGEMM's float16 products on %d threads from now: textgen::float16_linear ready in %.1f s (%s)",
        torch.get_num_threads(),
        time.perf_counter() - started,
        path,
    )


def _warn(exc: BaseException) -> None:
    log.warning(
        "FBGEMM's float16 products stay on one thread: could not build textgen::float16_linear (%s). "
        "Install a C++ compiler (g++) for them to use every thread.",
        exc,
    )


def _build(path: Path) -> None:
    scratch = path.with_name(f"{path.stem}.{os.getpid()}.tmp")  # the library appears whole or not at all
    try:
        done = subprocess.run(
            _command(scratch), capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.nice(19)
        )
        if done.returncode != 0:
            raise RuntimeError(f"the compiler failed: {done.stderr.strip()[-1500:]}")
        os.replace(scratch, path)
    except FileNotFoundError as exc:
        raise RuntimeError(f"no C++ compiler: {exc}") from None
    finally:
        scratch.unlink(missing_ok=True)


def _load(path: Path) -> None:
    global _loaded
    torch.ops.load_library(str(path))

    @torch.library.register_fake("textgen::float16_linear")
    def _shape(
        x: torch.Tensor, handle: torch.Tensor, bias: torch.Tensor | None, out_features: int
    ) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], out_features))

    _loaded = path
