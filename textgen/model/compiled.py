"""A lone stream's decoding step compiled with torch.compile (inductor, CPU): one graph for the whole step.

At one row a decoding step streams every weight once, and what is not a product is per-op overhead: each
layer norm, residual add, view and KV write is a dispatched op of a few microseconds on a [1, 768] tensor,
~200 of them a step for GPT-2. Inductor fuses them into a few generated C++ loops and calls the products'
kernels directly, from generated C++ (`cpp_wrapper`); with `freezing` the weights are constants of the
graph, so the products are oneDNN's packed bfloat16 ones (textgen/model/linear.py), or inductor's own
C++ GEMM template where that streams the weights faster (`gemm_backends`: AVX512_BF16 without AMX).
Measured in the batch's step (one row, AMX Xeon, 2 threads, alternating runs): random GPT-2 bfloat16
9.9-10.2 ms against 11.9-12.7 eager; SmolLM2 14.8-15.1 against 20.8 (its 30 layers have more small ops).
The output layer stays outside: inductor turned the tied [V, width] product into a generated loop over a
float32 copy of the embeddings (+150 MB, 17 ms a step instead of 11).

Only a lone row decoding one token takes this path (`SegmentedCache.open_one_token`): every other pass keeps
the eager one (textgen/model/native.py), so the graph has one shape but its KV buffers' capacity, which is
dynamic. Only bfloat16 compiles by default: float32 promises that a row computes the same alone and in a
batch, and fused layer norms round differently from torch's (3e-6 on logits of scale 3), and there inductor
packs a second copy of every weight (+700 MB for GPT-2).

Compiling takes ~15 s for GPT-2 and ~40-60 s for SmolLM2 on a 2-core AMX Xeon (31-39 s and ~110 s with the
template on a 2-core Zen 4 EPYC), at every start: inductor caches neither frozen graphs nor their AOT graphs
("Cannot cache a graph with freezing enabled"). Unfrozen, with the packed products behind a custom op, the
graph was cached (2.8 s to load) but took 8.4-8.5 ms against 7.1-7.3 frozen: little better than eager. So it
compiles in a background thread once the server is ready, and the first seconds are slow: GPT-2, one client
sending 64-token requests from ready on, 124-137 ms a token in the first request (tracing holds the GIL),
21-28 ms in the next ones, then, compiled, 11.4-12.6 ms. Compiling before ready would hold /readyz back by
those 15-40 s instead. It costs ~150 MB (the compiler itself). If compiling fails (no C++ compiler, an op
inductor cannot take), steps stay eager and the log says why. TEXTGEN_COMPILE=off never compiles.
"""

from __future__ import annotations

import gc
import getpass
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from textgen.model.cpu import CpuInfo, detect_cpu
from textgen.model.memory import release_freed_memory

log = logging.getLogger(__name__)

Buffers = list[tuple[torch.Tensor, torch.Tensor]]
OneToken = Callable[[torch.Tensor, torch.Tensor, Buffers], torch.Tensor]
EXAMPLE_CAPACITY = 64  # the KV capacity the graph is traced with; any other works (it is dynamic)


class OneTokenSteps:
    """The compiled form of a decoding pass's `one_token` (its final hidden state), then the output layer.

    `kv_shape`: a layer's (key heads, head size); `layers`: how many."""

    def __init__(
        self,
        one_token: OneToken,
        head: Callable[[torch.Tensor], torch.Tensor],
        kv_shape: tuple[int, int],
        layers: int,
    ) -> None:
        self.one_token, self.head = one_token, head
        self.kv_shape, self.layers = kv_shape, layers
        self.compiled: OneToken | None = None  # set once compiled and run: steps use it from then on
        self.state = "off"  # for the log and GET /info
        self.steps = 0  # how many steps it ran (tests check the path was taken)
        self.thread: threading.Thread | None = None  # compiling in the background (`start`)

    def start(self, dtype: torch.dtype) -> threading.Thread:
        """Compile for weights of `dtype` in a background thread, which is returned. A fresh thread, as the
        engine's is: the graph's guards check torch's thread count, which a thread that ran ops before
        textgen set it (the main thread) may hold at another value, and every step would recompile."""
        self.state = "compiling"
        self.thread = threading.Thread(target=self._compile_aside, args=(dtype,), name="textgen-compile")
        self.thread.daemon = True
        self.thread.start()
        return self.thread

    def _compile_aside(self, dtype: torch.dtype) -> None:
        # The server answers meanwhile: this thread, and the g++ it runs, at the lowest priority.
        _lowest_priority()
        self.compile(dtype)

    def compile(self, dtype: torch.dtype) -> bool:
        """Compile and run the step once on scratch buffers; whether it worked. Steps use it afterwards."""
        import torch._inductor.config

        _inductor_cache_dir()
        # Set for the process, not passed in torch.compile's `options`: there (torch 2.13) the weights were
        # not frozen, and inductor cannot call oneDNN's packed products on weights that are graph inputs.
        # A recompile (a guard failing later) must freeze too; nothing else in textgen compiles.
        torch._inductor.config.freezing = True
        # The graph's kernels called from generated C++, not from a generated Python function: GPT-2's step
        # 9.9-10.2 ms against 10.9-11.6 (eager 11.9-13.1, alternating runs), for twice the compile time.
        torch._inductor.config.cpp_wrapper = True
        # One compile job at a time, in this thread: no pool of compiling processes beside a serving engine.
        torch._inductor.config.compile_threads = 1
        backends = gemm_backends(detect_cpu())
        if backends is not None:
            torch._inductor.config.max_autotune_gemm = True
            torch._inductor.config.max_autotune_gemm_backends = backends
        compiled = torch.compile(self.one_token, dynamic=False)
        start = time.perf_counter()
        try:
            # Under inference_mode, as the engine's steps run: its guards would otherwise recompile there.
            with torch.inference_mode():
                kv_heads, head_dim = self.kv_shape
                shape = (1, kv_heads, EXAMPLE_CAPACITY, head_dim)
                buffers = [
                    (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                    for _ in range(self.layers)
                ]
                for keys, values in buffers:  # the capacity grows with the row: one graph for all
                    torch._dynamo.maybe_mark_dynamic(keys, 2)
                    torch._dynamo.maybe_mark_dynamic(values, 2)
                compiled(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), buffers)
        except Exception as exc:  # no C++ compiler, an op inductor cannot take: stay eager
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.state = f"off: torch.compile failed ({type(exc).__name__}: {first})"
            log.warning("decoding steps stay eager: %s; TEXTGEN_COMPILE=off skips trying", self.state[5:])
            return False
        self.compiled = compiled
        self.state = f"compiled in {time.perf_counter() - start:.1f} s"
        # What the compiler freed goes back to the system: 50 MB of GPT-2's (Zen 4, the C++ template).
        gc.collect()
        release_freed_memory()
        log.info("a lone stream's decoding step is %s (torch.compile)", self.state)
        return True

    def run(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, keep: Any) -> torch.Tensor | None:
        """Logits [1, V] of a lone row's token through the compiled step, or None: not compiled (yet), or
        not a lone row decoding one token (the caller then runs the eager pass)."""
        if self.compiled is None or keep is not None or ids.numel() != 1:
            return None
        buffers = cache.open_one_token()  # textgen's SegmentedCache (engine/kv_cache.py)
        if buffers is None:
            return None
        hidden = self.compiled(ids, positions, buffers)
        cache.close_one_token()
        self.steps += 1
        return self.head(hidden)


def gemm_backends(cpu: CpuInfo) -> str | None:
    """The kernels of the graph's products on `cpu` (inductor's max_autotune_gemm_backends), or None for
    oneDNN's packed products (inductor's default with `freezing`).

    Where bfloat16 is native through AVX512_BF16 without AMX, inductor's own C++ GEMM template, whose
    one-row products stream the weights faster than oneDNN's: on an AMD EPYC (Zen 4), GPT-2's 48 one-row
    bfloat16 products at 32.5 GB/s against 21.5-23.9 (5.2 against 7.1-7.9 ms a step), one stream 87-123
    tok/s against 68-85 (random GPT-2, bfloat16-int8head, in-process, 3 and 4 processes), SmolLM2 62-79
    against 55.
    The template only, not a race against oneDNN (backends "CPP,ATEN"): inductor times the candidates on
    weights already in cache, which is not how a decoding step reads them, and that race kept oneDNN for 12
    of the 48 products in one compile and none in another. Elsewhere (AMX, ARM) oneDNN's products were
    measured and the template was not: they stay.
    """
    if cpu.bf16_unit == "AVX512_BF16" and cpu.raw_isa_class != "amx":  # nor an AMX CPU under a cap
        return "CPP"
    return None


def _inductor_cache_dir() -> None:
    """Inductor names its cache directory after the user (getpass.getuser()), which fails for a numeric
    user without a passwd entry, as containers run (deploy/deployment.yaml: uid 1034): name it by uid then."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    try:
        getpass.getuser()
    except Exception:  # KeyError from pwd, OSError: no name for this uid
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            tempfile.gettempdir(), f"torchinductor_{os.getuid()}"
        )


def _lowest_priority() -> None:
    """Nice 19 for the calling thread (Linux: a thread's own id), inherited by the processes it starts."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: compile at normal priority
        pass
