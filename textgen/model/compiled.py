"""A lone stream's passes compiled ahead of time (torch.export, then AOTInductor): one program for the whole
pass of a lone row, its prompt's and each decoding step's, compiled once per model, format and machine and
cached on disk.

At one row a decoding step streams every weight once, and what is not a product is per-op overhead: each
layer norm, residual add, view and KV write is a dispatched op of a few microseconds on a [1, 768] tensor,
~200 of them a step for GPT-2. Inductor fuses them into a few generated C++ loops and calls the products'
kernels directly from generated C++; with `freezing` the weights are constants of the program, so the
products are inductor's own C++ GEMM template where that streams the weights faster (`gemm_backends`:
AMX, or AVX512_BF16), else oneDNN's packed bfloat16 ones (textgen/model/linear.py). Measured in the batch's
step with torch.compile, the same inductor (one row, AMX Xeon, 2 threads, alternating runs): random GPT-2
bfloat16 9.9-10.2 ms against 11.9-12.7 eager; SmolLM2 14.8-15.1 against 20.8 (more layers, more small ops).
The output layer stays outside: inductor turned the tied [V, width] product into a generated loop over a
float32 copy of the embeddings (+150 MB, 17 ms a step instead of 11).

Only a lone row takes this path (`SegmentedCache.open_lone`): each of its steps and, where AMX multiplies
its rows (`lone_tokens`), its prompt prefilled alone (or the rest after a cached beginning) and speculative
verifications; every other pass keeps the eager one (textgen/model/native.py). The program's sizes are
dynamic in its KV buffers' capacities (each layer's its own) and, there, in the number of tokens. One
program for all: a prompt's pass then reads the weights the steps read, laid out once for their kernels (a
program of its own would pack a second copy, +170 MB for GPT-2, and evict the steps' from the cache), with
its small ops fused as a step's are. Measured on the AMX Xeon, random GPT-2 bfloat16, one process,
alternating: a step 5.07 ms against 5.11 for the program of one token it replaced; a 32-token prompt's
blocks 9.79 ms against 13.81 eager. In the engine (bfloat16-int8head, in-process, two processes each), a
32-token request's first token after a stream's 128 steps came 12.4 ms after it was submitted against
18.7-19.2 with the prompt's pass eager: 1.6 steps instead of 2.4.

bfloat16's layers compile (bfloat16, bfloat16-int8head), and float32-int8head's float32 ones: float32 and
float32-packed promise that a row computes the same alone and in a batch, and fused layer norms round
differently from torch's (3e-6 on logits of scale 3); float32-int8head's int8 output layer already rounds a
row alone otherwise than in a batch. A float32 program keeps oneMKL's products on the model's own weights,
which its package does not hold (FLOAT32_OPTIONS): inductor's default packed a second copy of every weight
(+700 MB for GPT-2), and was slower than eager.

Ahead of time rather than torch.compile (this module's way before), because the result can be kept:
torch.compile caches no frozen graph ("Cannot cache a graph with freezing enabled"), so every start paid the
compile again (GPT-2 15 s on the AMX Xeon, 31-39 s with the template on the Zen 4 EPYC; SmolLM2 40-60 and ~110
s) and decoded slowly meanwhile. The package (the compiled library and the weights as laid out for its
kernels, ~250 MB for GPT-2) goes to TEXTGEN_CACHE_DIR/compiled under a key of what the program is made of (the
model's configuration and every weight's values, textgen's model code, transformers' and torch's versions),
the inductor settings, the CPU (its kernels use this CPU's instructions) and the thread count; a restart finds
the package by that key and loads it: random GPT-2 on the Zen 4 3.2-4.0 s after ready instead of 42-45. The
key is had without tracing the pass: torch.export holds the GIL throughout (SmolLM2's pass: 8.0 s on the AMX
Xeon), and while a restarted server traced to learn its key, its engine stalled (SmolLM2, the offline default,
on the AMX Xeon, requests of 20 tokens sent one after the other from ready: the package loaded 14.1 s after
ready, one request took 10.0 s meanwhile; keyed so, loaded 7.7 s after ready, the requests meanwhile at 16-28
tok/s against eager's 26-31, their first tokens 0.06-0.34 s). And no guards run at each call: on that Zen 4,
in one process, alternating 250-step blocks (positions 0-249), the step took 8.37 ms (median) against
torch.compile's 9.37 for random GPT-2, 13.07 against 14.21 for SmolLM2.

On a miss it compiles in a process of its own (textgen/model/compile_step.py), at the lowest priority, while
the server decodes eagerly: compiling in the server raised its peak RSS (random GPT-2: 1827 MB against 1186)
and tracing held the GIL (one stream, 124-137 ms a token meanwhile, against ~11), so the server neither traces
nor compiles (SmolLM2's first request after ready on a miss: its first token 0.14 s, against 7.6 s while the
server traced to key it). Compiling before ready would hold /readyz back by those seconds instead. If
compiling fails (no C++ compiler, an op inductor cannot take), steps stay eager and the log says why.
TEXTGEN_COMPILE=off never compiles.

How a program is exported, keyed, cached, compiled apart and loaded is `AheadOfTime`'s, which the batch's
attention of decoding rows (textgen/model/compiled_attention.py) uses too; one background thread compiles
the programs of a model one after the other (`compile_in_background`).
"""

from __future__ import annotations

import functools
import gc
import getpass
import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from textgen.model import float16_op
from textgen.model.cpu import CpuInfo, detect_cpu, this_cpu
from textgen.model.linear import Linear
from textgen.model.memory import release_freed_memory

log = logging.getLogger(__name__)

Buffers = list[tuple[torch.Tensor, torch.Tensor]]
LoneRow = Callable[[torch.Tensor, torch.Tensor, Buffers], torch.Tensor]
# A lone row's pass of more tokens stays eager even on AMX: inductor's products lose to oneDNN's at many rows
# (random GPT-2 bfloat16, AMX Xeon, the blocks of a prompt's pass: 32 tokens 11.1 ms compiled against 14.5
# eager, 128 25.8 against 27.0, 512 96.9 against 83.8). Elsewhere one token is the most (`lone_tokens`).
MAX_TOKENS = 128
EXAMPLE_TOKENS = 2  # the tokens a pass of several is exported with; any number works (1 would not be dynamic)
EXAMPLE_CAPACITY = 64  # the KV capacity the pass is exported with; any other works (it is dynamic)
PACKAGE_VERSION = 1  # bump when what a package holds changes without its key changing
KEPT_PACKAGES = 4  # compiled packages kept in the cache directory (`_prune`)
PARENT = "TEXTGEN_COMPILE_PARENT"  # set for the compiling process: the pid of the server it compiles for
SCRATCH = "TEXTGEN_COMPILE_SCRATCH"  # and its directory for inductor, removed by it if the server is gone
# A float32 pass (TEXTGEN_DTYPE=float32-int8head's) fuses its small ops and leaves the products oneMKL's, on
# the model's own weights: without `freezing` they stay the program's inputs, and its package holds none of
# them (the weights read where the model keeps them: `_load`). Inductor's default (freezing, oneDNN's packed
# float32 products) was slower than eager and a second copy of the weights (random GPT-2 under AVX2 caps on
# the AMX Xeon, one stream in-process: 38.9 tok/s against 34.8-36.9 eager, RSS +760 MB); this way 44.3-44.8
# against 36.6-37.4 eager, at eager's peak RSS (bench/PERFORMANCE.md, session 31).
FLOAT32_OPTIONS = {
    "freezing": False,
    "compile_threads": 1,
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": None,
}


class AheadOfTime:
    """A program compiled ahead of time and kept in the compile cache, as a lone stream's pass is (below).
    A subclass says what the program is (`export`) and how inductor compiles it (`options`); `kind` names
    its packages, and `python -m textgen.model.compile_step KIND` compiles it apart; `about` names it in
    the log."""

    kind = "program"
    about = "a compiled program"

    def __init__(self) -> None:
        self.compiled: Any = None  # set once compiled and run: calls use it from then on
        self.dtype = torch.bfloat16  # of the tensors it was compiled for
        self.state = "off"  # for the log and GET /info
        self.thread: threading.Thread | None = None  # compiling in the background (`compile_in_background`)

    def export(self, dtype: torch.dtype) -> Any:
        """The program (torch.export) for tensors of `dtype`, traced with `example`'s arguments."""
        raise NotImplementedError

    def example(self, dtype: torch.dtype) -> tuple[Any, ...]:
        """The arguments the program of `dtype` is traced with, and run once on when loaded."""
        raise NotImplementedError

    def makings(self, dtype: torch.dtype) -> tuple[dict[str, Any], Iterable[tuple[str, torch.Tensor]]]:
        """What the program of `dtype` is made of, short of tracing it: what its graph depends on besides
        textgen's code (`_code_fingerprint`) and torch's, and the tensors it holds or reads, by name. Its
        package's key (`_package_key`)."""
        raise NotImplementedError

    def options(self, cpu: CpuInfo, dtype: torch.dtype) -> dict[str, Any]:
        """Inductor's settings for the program of tensors of `dtype` on `cpu`."""
        raise NotImplementedError

    def weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """The model's tensors by name, for a program of `dtype` whose package holds none of its own (it
        reads these: `_load`), or None: its package holds its weights, as laid out for its kernels."""
        return None

    def compile(
        self, dtype: torch.dtype, cache_dir: Path | None = None, apart: Mapping[str, str] | None = None
    ) -> bool:
        """Export the program and load its compiled package from `cache_dir` when this exact program was
        compiled before, else compile it, and run it once on its example; whether it worked. Calls use it
        afterwards. `apart`: the environment under which `python -m textgen.model.compile_step` loads this
        same model, to compile in that process rather than this one (textgen/model/compile_step.py)."""
        _inductor_cache_dir()
        start = time.perf_counter()
        float16_op.wait()  # float16 layers' products are textgen's op once it is built (the key says which)
        try:
            runner, package, how = self._load_or_compile(dtype, cache_dir, apart)
        except Exception as exc:  # no C++ compiler, an op inductor cannot take: stay eager
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.state = f"off: compiling failed ({type(exc).__name__}: {first})"
            log.warning("%s stays eager: %s; TEXTGEN_COMPILE=off skips trying", self.about, self.state[5:])
            return False
        self.compiled, self.dtype = runner, dtype
        self.state = f"{how} in {time.perf_counter() - start:.1f} s"
        # What exporting, compiling and loading freed goes back to the system (tcmalloc would keep it).
        gc.collect()
        release_freed_memory()
        log.info("%s is %s (AOTInductor: %s)", self.about, self.state, package)
        return True

    @torch.inference_mode()  # as the engine's steps run
    def _load_or_compile(
        self, dtype: torch.dtype, cache_dir: Path | None, apart: Mapping[str, str] | None
    ) -> tuple[Any, Path, str]:
        """The compiled package loaded and run once, where it is and how it was had (`compile`)."""
        # Keyed without tracing: torch.export holds the GIL for seconds (SmolLM2's pass 8 s on the AMX
        # Xeon), and a server whose cache has the package would stall its engine's steps that long to learn
        # it; the compiling process traces, the server does not.
        cpu = detect_cpu()
        options = self.options(cpu, dtype)
        name = f"{self.kind}-{_package_key(*self.makings(dtype), options, cpu)}.pt2"
        folder = _writable(cache_dir)
        if folder is not None and (folder / name).is_file():
            package, how = folder / name, "loaded from the cache"
            os.utime(package)  # recently used: kept by _prune
        elif folder is not None and apart is not None:
            package, how = folder / name, "compiled in a process of its own"
            _compile_apart(apart, package, self.kind)
        elif folder is not None:
            package, how = folder / name, "compiled"
            _compile(self.export(dtype), options, package)
            _prune(folder, self.kind)
        else:  # no cache: compiled into a temporary directory, removed once loaded (or failed)
            scratch = Path(tempfile.mkdtemp(prefix=f"textgen-{self.kind}-"))
            try:
                package, how = scratch / name, "compiled"
                _compile(self.export(dtype), options, package)
                return self._load(package, dtype), package, how
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return self._load(package, dtype), package, how

    def _load(self, package: Path, dtype: torch.dtype) -> Any:
        """`package`'s runner, given the model's own tensors if its package holds none (`weights`), run once
        on `example`'s arguments."""
        # Loading holds the constants twice for a moment (random GPT-2, Zen 4: RSS +477 MB, then +240): what
        # exporting and fingerprinting freed (82 MB) goes back to the system first.
        gc.collect()
        release_freed_memory()
        runner = _load_package(package)
        weights = self.weights(dtype)
        if weights is not None:
            names = runner.aoti_runner.get_constant_fqns()
            unknown = [name for name in names if name not in weights]
            if unknown:  # a tensor inductor derived from the weights: only a package can hold it
                raise RuntimeError(f"the program reads tensors the model does not have: {unknown[:3]}")
            # Read where they are (user-managed): no second copy of the weights, and none on disk.
            runner.aoti_runner.load_constants(
                {name: weights[name] for name in names}, check_full_update=True, user_managed=True
            )
        runner(*self.example(dtype))
        return runner


def compile_in_background(
    programs: Sequence[tuple[AheadOfTime, torch.dtype]],
    cache_dir: Path | None = None,
    apart: Mapping[str, str] | None = None,
) -> threading.Thread:
    """Compile `programs`, each for tensors of its dtype, one after the other, in one background thread at
    the lowest priority (the server answers meanwhile, and two compiles at once would only share the
    cores); the thread is returned and set as each program's `thread`."""

    def compile_all() -> None:
        _lowest_priority()  # this thread, and the processes it starts
        for program, dtype in programs:
            program.compile(dtype, cache_dir, apart)

    thread = threading.Thread(target=compile_all, name="textgen-compile", daemon=True)
    for program, _ in programs:
        program.state, program.thread = "compiling", thread
    thread.start()
    return thread


class LoneRowPasses(AheadOfTime):
    """A decoding pass's `embed`, the compiled form of its `lone_row` (the final hidden states), then the
    output layer. The embedding lookup stays outside the program, as the output layer does: inside, its
    table (77 MB for GPT-2) would be a second copy, the program's constant beside the model's.

    `kv_shape`: a layer's (key heads, head size); `layers`: how many."""

    kind = "step"
    about = "a lone stream's pass"

    def __init__(
        self,
        embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        lone_row: LoneRow,
        head: Callable[[torch.Tensor], torch.Tensor],
        kv_shape: tuple[int, int],
        layers: int,
        body: torch.nn.Module,
        traced: Callable[[], tuple[LoneRow, torch.nn.Module]],
        stored: torch.dtype | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """`body`: the model's module whose tensors `lone_row` reads (its blocks and final norm); `traced`:
        `lone_row` and `body` again over modules of their own that share the model's tensors (`export`);
        `stored`: the dtype the KV cache holds keys and values in, if not the pass's
        (textgen/model/attention.py `cache_dtype`); `config`: the model's configuration (its norms' epsilon,
        its rotary embedding's base, ...: what the pass computes beyond its tensors' shapes)."""
        super().__init__()
        self.embed, self.lone_row, self.head, self.body = embed, lone_row, head, body
        self.kv_shape, self.layers, self.stored, self.traced = kv_shape, layers, stored, traced
        self.config = dict(config or {})
        # FBGEMM's float16 weights (float16-int8head's), by the handles its products take: inputs of the
        # program, not constants (`float16_handles`)
        self.handles = float16_handles(body)
        # Passes it ran of one token, and of several (a prompt, a verification): tests check the path was
        # taken.
        self.steps = self.many = 0

    def options(self, cpu: CpuInfo, dtype: torch.dtype) -> dict[str, Any]:
        return inductor_options(cpu, dtype)

    def weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        if not weightless(dtype):
            return None
        return {f"{_Pass.BODY}.{name}": tensor for name, tensor in _held_tensors(self.body)}

    def example(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, Buffers, list[torch.Tensor]]:
        """Tokens 0 embedded at their positions, buffers of EXAMPLE_CAPACITY zeroed (EXAMPLE_TOKENS of them
        where this CPU's passes take several, `lone_tokens`, else one), and the float16 weights' handles."""
        kv_heads, head_dim = self.kv_shape
        shape = (1, kv_heads, EXAMPLE_CAPACITY, head_dim)
        stored = self.stored or dtype
        buffers = [
            (torch.zeros(shape, dtype=stored), torch.zeros(shape, dtype=stored)) for _ in range(self.layers)
        ]
        positions = torch.arange(EXAMPLE_TOKENS if lone_tokens(this_cpu()) > 1 else 1)
        hidden = self.embed(torch.zeros_like(positions), positions).to(dtype)
        return hidden, positions, buffers, self.handles

    def makings(self, dtype: torch.dtype) -> tuple[dict[str, Any], Iterable[tuple[str, torch.Tensor]]]:
        about = {
            "pass": type(getattr(self.lone_row, "__self__", self.lone_row)).__qualname__,
            # Not where it was read from, nor what transformers notes for itself ("_attn_implementation"...)
            "config": {k: v for k, v in self.config.items() if not k.startswith("_")},
            "dtype": str(dtype),
            "stored": str(self.stored),
            "kv_shape": list(self.kv_shape),
            "layers": self.layers,
            "tokens": "several" if lone_tokens(this_cpu()) > 1 else "one",
            "weightless": weightless(dtype),
            "float16_handles": len(self.handles),
            "float16_op": bool(self.handles) and float16_op.loaded(),
        }
        # A handle's bytes are a pointer, this process's: the key has its name, dtype and shape only
        handles = {id(handle) for handle in self.handles}
        return about, [
            (name, _shape_only(t) if id(t) in handles else t) for name, t in _held_tensors(self.body)
        ]

    def export(self, dtype: torch.dtype) -> Any:
        """The pass as a program (torch.export) for buffers of `dtype`, traced with `example`'s arguments. Of
        any number of tokens where this CPU's passes take several (`lone_tokens`); elsewhere of one, as the
        step alone was: a program dynamic in its rows has its products compiled for any number of them, and
        only on AMX was its one-row step measured as fast."""
        several = lone_tokens(this_cpu()) > 1
        # Any capacity, each layer its own (they grow at different steps): one program.
        tokens = {0: torch.export.Dim("tokens", min=1)} if several else None
        capacities = [torch.export.Dim(f"capacity{layer}", min=2) for layer in range(self.layers)]
        # A program reading the model's tensors takes them as inputs (its body's), which torch.export
        # (non-strict) swaps for fake tensors in the modules themselves while it traces: in the model's own,
        # the engine thread would read them mid-step, and fail ("fake_mode.in_kernel_invocation must be
        # False": float32-int8head's SmolLM2 under AVX2 caps, 20 requests as the server started). So it
        # traces modules of its own (`traced`); the inputs keep the body's names (`weights`).
        lone_row, body = self.traced() if weightless(dtype) else (self.lone_row, None)
        with warnings.catch_warnings():
            # FBGEMM's float16 weights' handles, set into the traced body's products from the inputs (_Pass)
            warnings.filterwarnings("ignore", message="The tensor attributes .*float16.* were assigned")
            return torch.export.export(
                _Pass(lone_row, body),
                self.example(dtype),
                dynamic_shapes={
                    "hidden": tokens,
                    "positions": tokens,
                    "buffers": [({2: capacity}, {2: capacity}) for capacity in capacities],
                    "handles": [None] * len(self.handles),
                },
            )

    def run(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, keep: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Logits [kept tokens, V] of a lone row's tokens `ids` [T] through the compiled pass (`keep`: the
        tokens whose logits are wanted, None: all), or None: not compiled (yet), not a lone row's pass, or
        one of more tokens than this CPU's products take fast (`lone_tokens`; the caller then runs the eager
        one)."""
        if self.compiled is None or ids.numel() > lone_tokens(this_cpu()):
            return None
        kv_heads, head_dim = self.kv_shape
        like = torch.empty(1, kv_heads, 0, head_dim, dtype=self.buffers_dtype)
        buffers = cache.open_lone(ids.numel(), like)  # textgen's SegmentedCache (engine/kv_cache.py)
        if buffers is None:
            return None
        if not self._fits(buffers):
            return None  # the eager pass writes the tokens into the room made for them
        hidden = self.compiled(self.embed(ids, positions), positions, buffers, self.handles)
        cache.close_lone(ids.numel())
        if ids.numel() == 1:
            self.steps += 1
        else:
            self.many += 1
        return self.head(hidden if keep is None else hidden[keep])

    @property
    def buffers_dtype(self) -> torch.dtype:
        """The dtype of the KV buffers the compiled program takes."""
        return self.stored or self.dtype

    def _fits(self, buffers: Buffers) -> bool:
        """Whether the program can take `buffers`: it reads its inputs as laid out when exported and checks
        none of it (no guards), so whole contiguous buffers of its dtype, as SegmentedCache.open_lone gives,
        of at least 2 columns (its `capacity`). 8 µs for GPT-2's 24 buffers."""
        return all(
            tensor.dtype == self.buffers_dtype and tensor.is_contiguous() and tensor.shape[2] >= 2
            for layer in buffers
            for tensor in layer
        )


def _held_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor `module` and its submodules hold, by name (a tensor reached twice under each of its
    names): their parameters and buffers, and the tensors they keep as plain attributes, such as a
    projection's weight packed for oneDNN (textgen/model/linear.py), which is neither but is what the product
    reads (a fine-tune that changed only the projections, as a merged LoRA does, would otherwise find the
    base model's package)."""
    held = []
    for prefix, child in module.named_modules(remove_duplicate=False):
        dotted = f"{prefix}." if prefix else ""
        tensors = itertools.chain(
            child.named_parameters(recurse=False),
            child.named_buffers(recurse=False),
            ((name, value) for name, value in vars(child).items() if isinstance(value, torch.Tensor)),
        )
        held += [(dotted + name, tensor) for name, tensor in tensors]
    return held


def float16_handles(body: torch.nn.Module) -> list[torch.Tensor]:
    """The handles of FBGEMM's float16 weights in `body`'s products (textgen/model/linear.py), in module
    order. A handle is a few bytes whose storage owns FBGEMM's packed matrix: as a constant of the program,
    AOTInductor would copy the bytes and lose the matrix ("Expected temporary cpp type wrapper"), so the
    program takes the handles as inputs, at every call the model's own."""
    return [layer.float16 for layer in _float16_layers(body)]


def _float16_layers(body: torch.nn.Module) -> list[Any]:
    """`body`'s products whose weights are FBGEMM's float16 ones (textgen/model/linear.py Linear)."""
    return [m for m in body.modules() if isinstance(m, Linear) and m.float16 is not None]


def _shape_only(tensor: torch.Tensor) -> torch.Tensor:
    """A stand-in of `tensor` for a package key: its dtype and shape, no values."""
    return torch.zeros(tensor.shape, dtype=tensor.dtype)


class _Pass(torch.nn.Module):
    """A `lone_row` as a module, which torch.export takes: the model's tensors it reads become the
    program's constants (the model itself is not a submodule: its int8 output layer is outside). With
    `body` (the module holding them) a submodule, they are its parameters and buffers instead, named as in
    `body` after BODY: the names by which a package without weights is given them (LoneRowPasses.weights).
    FBGEMM's float16 weights' handles are inputs (`float16_handles`): set into the traced body's products
    before its pass runs."""

    BODY = "body"

    def __init__(self, lone_row: LoneRow, body: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.lone_row = lone_row
        self.float16_layers = [] if body is None else _float16_layers(body)
        if body is not None:
            setattr(self, self.BODY, body)

    def forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, buffers: Buffers, handles: list[torch.Tensor]
    ) -> torch.Tensor:
        for layer, handle in zip(self.float16_layers, handles, strict=True):
            layer.float16 = handle
        return self.lone_row(hidden, positions, buffers)


def inductor_options(cpu: CpuInfo, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Inductor's settings for a lone stream's pass of `dtype` on `cpu`."""
    if weightless(dtype):
        return dict(FLOAT32_OPTIONS)
    options: dict[str, Any] = {
        # The weights are constants of the program, so its products are oneDNN's packed ones or the
        # template's (`gemm_backends`), on weights laid out for them once, at compile time.
        "freezing": True,
        # One compile job at a time, in this thread: no pool of compiling processes beside a serving engine.
        "compile_threads": 1,
        # The weights beside the compiled library in the package, not inside it: loaded from inside, they
        # stayed resident twice, the library's pages and the copy (random GPT-2, Zen 4: +556 MB RSS at load,
        # against +320 so, ~70 of it torch's compiler modules; force_mmap_weights changed nothing).
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.package_constants_on_disk_format": "binary_blob",
    }
    backends = gemm_backends(cpu)
    if backends is not None:
        options.update(max_autotune_gemm=True, max_autotune_gemm_backends=backends)
    return options


def weightless(dtype: torch.dtype) -> bool:
    """Whether a lone stream's pass of `dtype` is compiled without its weights, reading the model's
    (FLOAT32_OPTIONS): float32's, whose products stay oneMKL's on the weights as they are."""
    return dtype == torch.float32


def gemm_backends(cpu: CpuInfo) -> str | None:
    """The kernels of the step's products on `cpu` (inductor's max_autotune_gemm_backends), or None for
    oneDNN's packed products (inductor's default with `freezing`).

    Inductor's own C++ GEMM template wherever bfloat16 is native on x86, as its one-row products stream the
    weights faster than oneDNN's:
    - AVX512_BF16 without AMX, on an AMD EPYC (Zen 4): GPT-2's 48 one-row bfloat16 products at 32.5 GB/s
      against 21.5-23.9 (5.2 against 7.1-7.9 ms a step), one stream 87-123 tok/s against 68-85 (random
      GPT-2, bfloat16-int8head, in-process, 3 and 4 processes), SmolLM2 62-79 against 55.
    - AMX, where the template's micro-kernel is AMX's own, on an Intel Xeon (family 6 model 167): GPT-2's
      compiled step 5.88-5.96 ms against 6.41-6.68 (one process, alternating blocks); one stream in-process
      122-129 tok/s against 108-120, SmolLM2 86-99 against 74-75 (three and two pairs of processes). Its
      AVX-512 micro-kernel, with AMX hidden from inductor, took 8.90 ms.
    The template only, not a race against oneDNN (backends "CPP,ATEN"): inductor times the candidates on
    weights already in cache, which is not how a decoding step reads them, and that race kept oneDNN for 12
    of the 48 products in one compile and none in another. oneDNN stays on an AMX CPU whose oneDNN is capped
    below AMX (the template would still use AMX, which the cap means to leave out), wherever bfloat16 is
    emulated, and on ARM (not measured).
    """
    if cpu.bf16_unit == "AMX" or (cpu.bf16_unit == "AVX512_BF16" and cpu.raw_isa_class != "amx"):
        return "CPP"
    return None


def lone_tokens(cpu: CpuInfo) -> int:
    """The most tokens a lone row's pass takes compiled on `cpu`: up to MAX_TOKENS (a prompt, a speculative
    step's verification) where the products are the template's with AMX's micro-kernel, which multiplies
    many rows as fast as oneDNN (measured: the module's docstring); else one, a step: without AMX the
    template's micro-kernel for 32 rows is a float32-vector one (AVX512_BF16, Zen 4 EPYC: GPT-2's 48
    products 94.7 ms against oneDNN's 16.0, sessions 22-23), and oneDNN's products frozen into the program
    were not measured at many rows."""
    return MAX_TOKENS if cpu.bf16_unit == "AMX" and gemm_backends(cpu) == "CPP" else 1


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


def _writable(cache_dir: Path | None) -> Path | None:
    """The packages' folder in `cache_dir`, made if need be; None when there is none or it is not writable
    (then the step compiles at every start, into a temporary directory)."""
    if cache_dir is None:
        return None
    folder = cache_dir / "compiled"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
        raise PermissionError(f"{folder} is not writable")
    except OSError as exc:
        log.warning(
            "compiled decoding step: cannot cache it in %s (%s); it compiles at every start", folder, exc
        )
        return None


def _load_package(package: Path) -> Runner:
    """AOTInductor's runner of `package`, with nothing of it left on disk but the package.

    The loader unpacks the package into a directory of its own in the temp dir (aotinductor_XXXXXX: the
    library and its weights, 213-263 MB for random GPT-2) and removes it only when the runner is destroyed,
    which a server's exit never does: every start left one per program in /tmp (142 of them, 15 GB, after a
    day of test suites and benchmarks; CI's container build, after the suite, ran out of disk). Once loaded,
    the library and the weights are mapped or read: Linux keeps a removed file's pages for as long as they
    are mapped, so the directory goes right away."""
    before = _unpacked_directories()
    runner = torch._inductor.aoti_load_package(str(package))
    for directory in _unpacked_directories() - before:
        shutil.rmtree(directory, ignore_errors=True)
    return Runner(runner)


class Runner:
    """A loaded program, called with its arguments: tensors, and lists and tuples of them (a step's KV
    buffers).

    AOTInductor's own runner (AOTICompiledModel) parses the program's specs (JSON) and flattens the
    arguments with torch's pytree at every call. Here the output spec is read once and the arguments
    flattened in place. Measured in the engine (random GPT-2, bfloat16-int8head, Zen 4 EPYC, calls
    alternating between the two in one process): a lone stream's step 3.81 against 3.92 ms (median, 441 and
    448 steps), the batch's attention at 32 rows 0.427 against 0.462 ms a call, twelve a step. Where its
    loader is not there (another torch), the runner is called as it is. Either way the call holds the GIL
    throughout (the loader's binding does not release it): no other Python thread runs meanwhile."""

    def __init__(self, aoti_runner: Any) -> None:
        self.aoti_runner = aoti_runner
        loader = getattr(aoti_runner, "loader", None)
        self._run = getattr(loader, "boxed_run", None)
        if self._run is not None:
            self._outputs = pytree.treespec_loads(loader.get_call_spec()[1])

    def __call__(self, *args: Any) -> Any:
        if self._run is None:
            return self.aoti_runner(*args)
        tensors: list[torch.Tensor] = []
        _tensors(args, tensors)
        return pytree.tree_unflatten(self._run(tensors), self._outputs)


def _tensors(args: Sequence[Any], into: list[torch.Tensor]) -> None:
    """The tensors of `args`, lists and tuples opened, in order (pytree's order for them)."""
    for arg in args:
        if isinstance(arg, (list, tuple)):
            _tensors(arg, into)
        elif isinstance(arg, torch.Tensor):
            into.append(arg)


def _unpacked_directories() -> set[Path]:
    """The aotinductor_* directories holding a file this process maps (Linux: /proc/self/maps; elsewhere
    none are found, and they stay until the runner is destroyed). Wherever they are: the loader reads TMPDIR
    when it unpacks, while Python's tempfile keeps the temp dir it found first."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "/aotinductor_" not in fields[5]:
            continue
        path = Path(fields[5].removesuffix(" (deleted)"))
        found.update(folder for folder in path.parents if folder.name.startswith("aotinductor_"))
    return found


def _compile(program: Any, options: dict[str, Any], package: Path) -> None:
    """Compile `program` into `package`, which appears whole or not at all (for a server starting beside
    this one)."""
    partial = package.with_name(f"partial-{os.getpid()}-{threading.get_native_id()}-{package.name}")
    _parse_kernel_templates_once()
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=options)
        os.replace(partial, package)
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def _parse_kernel_templates_once() -> None:
    """Have inductor parse each of its C++ kernel templates' jinja sources once in this process.

    Its C++ GEMM template parses the same few sources (`KernelTemplate._template_from_string`, no cache) for
    every product it writes and every choice it weighs: 7 products a layer, 30 layers in SmolLM2. Parsed once,
    SmolLM2's lone pass compiled (AMX Xeon, 2 cores, alternating runs, each in a fresh inductor cache) in
    100.5 / 103.8 / 113.0 s against 129.3 / 153.0, into the same program (its generated C++ and its weights
    byte for byte). A jinja template, once parsed, renders anew at each call: sharing it shares nothing else.
    """
    try:
        from torch._inductor.codegen.common import KernelTemplate
    except ImportError:  # another torch's inductor: it compiles as it is
        return
    parse = getattr(KernelTemplate, "_template_from_string", None)
    if callable(parse):
        KernelTemplate._template_from_string = staticmethod(functools.cache(parse))


def _compile_apart(environment: Mapping[str, str], package: Path, kind: str) -> None:
    """Run `python -m textgen.model.compile_step KIND` under `environment`; raise unless it made `package`.

    Inductor's working files go to a directory of the process's own, removed when it ends: each compile's
    generated library with a copy of the weights (209 MB for random GPT-2) is of no use once the package is
    written, since a restart loads the package; in inductor's cache directory, in the temp dir, one stayed
    per program compiled (most of the 1 GiB /tmp volume of deploy/'s pod). Its precompiled headers (140-156
    MB each, one per set of compiler flags) stay where inductor keeps them, in the temp dir whatever
    TORCHINDUCTOR_CACHE_DIR says: bounded, and building them for every compile made the tiny GPT-2's two
    (tests/test_compiled.py) take 64-79 s instead of 54-56."""
    # textgen importable wherever the server runs from (a Bento's src directory, a checkout)
    root = str(Path(__file__).resolve().parents[2])
    paths = [root] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    scratch = tempfile.mkdtemp(prefix=f"textgen-compile-{kind}-")
    try:
        child = subprocess.run(
            [sys.executable, "-m", "textgen.model.compile_step", kind],
            env={
                **environment,
                "PYTHONPATH": os.pathsep.join(paths),
                PARENT: str(os.getpid()),
                SCRATCH: scratch,
                "TORCHINDUCTOR_CACHE_DIR": scratch,
            },
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if child.returncode != 0 or not package.is_file():
        lines = [line for line in child.stderr.splitlines() if line.strip()]
        said = lines[-1] if lines else "no output"
        raise RuntimeError(
            f"the compiling process (exit status {child.returncode}) made no {package.name}: {said}"
        )


def _package_key(
    program: Mapping[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    options: dict[str, Any],
    cpu: CpuInfo,
) -> str:
    """What the package depends on: the program (what it is made of: `program` and `tensors`, by
    AheadOfTime.makings, and the code that traces it: textgen's model wing, transformers' and torch's
    versions), how inductor compiles it, for which CPU (its kernels use the instructions this CPU has) and
    how many threads (the template's blocking)."""
    import transformers  # the families' own functions (rotary embeddings, activations) are traced too

    digest = hashlib.sha256()
    about = {
        "version": PACKAGE_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "code": _code_fingerprint(),
        "cpu": [cpu.model, sorted(cpu.raw_flags or cpu.flags), [str(cap) for cap in cpu.caps]],
        "threads": torch.get_num_threads(),
        "options": options,
        "program": program,
    }
    digest.update(json.dumps(about, sort_keys=True, default=str).encode())
    for name, value in sorted(tensors, key=lambda named: named[0]):
        dense = value.to_dense() if value.is_mkldnn else value
        digest.update(f"{name} {dense.dtype} {list(dense.shape)}".encode())
        digest.update(dense.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:24]


@functools.cache
def _code_fingerprint() -> str:
    """A digest of textgen's model wing (this folder's modules), which builds every pass it compiles: a
    package compiled by other code is not loaded."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def _prune(folder: Path, kind: str) -> None:
    """Keep the KEPT_PACKAGES most recently used packages of `kind` (a step's: ~250 MB for GPT-2): one per
    model, format and CPU a server started with."""
    packages = sorted(folder.glob(f"{kind}-*.pt2"), key=lambda path: path.stat().st_mtime, reverse=True)
    for old in packages[KEPT_PACKAGES:]:
        old.unlink(missing_ok=True)
