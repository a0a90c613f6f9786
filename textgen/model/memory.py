"""How much KV cache the engine may hold: the model's bytes per cached token, and the budget in tokens.

A decoding batch's KV cache grows with every token of every sequence; left unchecked, enough long requests
at once take the process past its memory limit (an OOM kill loses every request on the pod). The engine
admits a sequence only while the worst case of the running batch (every row at prompt + max_new_tokens;
for an encoder-decoder, encoder input + max_new_tokens) fits this budget (textgen/engine/core.py); the
others wait in the queue.

Also how the process's allocator treats freed memory: what loading freed goes back to the system
(release_freed_memory), what serving frees is kept for reuse (keep_freed_memory).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
from typing import Any

import torch

from textgen.config import Settings, available_memory
from textgen.model import allocator

log = logging.getLogger(__name__)

# The share of the memory available after loading that the KV cache may take: the rest is for activations
# (a prefill's attention scores grow with the square of the prompt), sampling buffers, Python and the
# HTTP server, which all grow with the batch too.
KV_MEMORY_SHARE = 0.5
# The most spare KV positions a row's cache holds beyond its tokens: it grows 32 at a time, up to 7 early
# (textgen/engine/kv_cache.py).
GROWTH_BLOCK = 40

# glibc's malloc, as tuned by keep_freed_memory: blocks up to this size come from its heaps (its largest
# mmap threshold on 64-bit) and freed memory up to RETAINED_BYTES stays there for reuse.
HEAP_BLOCK_BYTES = 32 << 20
RETAINED_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_GLIBC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> str:
    """Keep the memory a decoding step frees for the next steps, instead of giving it back to the kernel;
    returns what was done, for the start-up log.

    KV buffers, logits and activations of a few MB are freed and allocated again at every join, leave and
    growth of the batch. By default glibc maps each block over its (adaptive) mmap threshold anew and unmaps
    it when freed, so every new buffer is fresh memory the kernel must fault in: on a 2-core Xeon VM that came
    at 0.4-4 GB/s against 12 for reused memory, and a batch's KV growth took 300-600 ms steps among 35 ms
    ones (16 streams at ~700 positions; the streams' ITL p99 250-400 ms, 48 ms with this), and workload W
    ran at 328 tok/s instead of 516 (32 clients, bfloat16, in-process) for 9 MB less peak RSS. Settings
    already in the environment (MALLOC_*_ variables, GLIBC_TUNABLES) are left as they are; other C libraries
    as well.
    """
    serving = allocator.in_use()
    if serving != "system":
        return f"{serving}, which keeps freed memory for reuse itself (textgen/model/allocator.py)"
    if any(name in os.environ for name in _GLIBC_SETTINGS):
        return "glibc malloc settings left as set in the environment"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "not glibc: the C library's malloc settings are left as they are"
    if not (mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES) and mallopt(_M_TRIM_THRESHOLD, RETAINED_BYTES)):
        return "glibc refused the malloc settings; left as they are"
    return (
        f"glibc malloc keeps freed memory for reuse (blocks up to {HEAP_BLOCK_BYTES >> 20} MB from its heaps, "
        f"up to {RETAINED_BYTES >> 20} MB retained)"
    )


_MADV_POPULATE_WRITE = 23  # madvise advice (Linux 5.14 and later)
FAULT_IN_BYTES = 1 << 20  # smaller buffers are not worth a system call
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.cache
def _madvise() -> Any:
    """libc's madvise, or None where there is none."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def fault_in(*buffers: torch.Tensor) -> None:
    """Map the pages of newly allocated buffers before anything writes them, one system call per buffer.

    A KV buffer the batch grows into, or re-lays rows into at a join or a leave, is often fresh memory (the
    heap has no freed block that large). Written by torch's threads, its pages were faulted in one at a time,
    and on the 2-core Xeon VM at ~6 us a page: 3 layers of 16 rows x ~150 positions grew in 22-28 ms (~4000
    pages) inside a 26 ms decoding step, the streams' slowest step. Populated first (MADV_POPULATE_WRITE):
    4-7 ms. Pages already mapped cost little (16 MB: 0.1-0.5 ms); when the host itself is slow to back new
    pages (~10 us a page) nothing helps but needing fewer. Not for a prefix-cache hit's buffer: torch's two
    threads copying the cached blocks were faster there (3.3 against 4.9-9.4 ms). Kernels without it (before
    Linux 5.14) skip it.
    """
    madvise = _madvise()
    if madvise is None or not _populating:
        return
    for buffer in buffers:
        if buffer.nbytes < FAULT_IN_BYTES:
            continue
        start = buffer.data_ptr()
        first = -(-start // PAGE_BYTES) * PAGE_BYTES  # whole pages inside the buffer
        end = (start + buffer.nbytes) // PAGE_BYTES * PAGE_BYTES
        if madvise(first, end - first, _MADV_POPULATE_WRITE) != 0 and ctypes.get_errno() == errno.EINVAL:
            _stop_populating()  # an older kernel: it does not know this advice
            return


_populating = True


def _stop_populating() -> None:
    global _populating
    _populating = False


_MADV_DONTNEED = 4


def drop_pages(address: int, nbytes: int) -> None:
    """Let go of this process's pages in [address, address + nbytes) of a file's mapping whose values have
    been copied elsewhere: RSS stops counting them, and whatever still reads them gets the file's bytes
    again. Only whole pages inside the range, so a neighbour's pages, and anything written to them, stay.

    Loading reads a float32 file's weights through its mapping while it copies them; without this every page
    read stayed resident until the whole mapping went, beside the copies. Loading's peak RSS in float32
    (Zen 4, in-process, tcmalloc), with this and use_linear's one-by-one replacement (textgen/model/linear.py)
    against neither: random GPT-2 931 MB against 1388 (915 once loaded), SmolLM2 1101 against 1456."""
    madvise = _madvise()
    if madvise is None:
        return
    first = -(-address // PAGE_BYTES) * PAGE_BYTES
    end = (address + nbytes) // PAGE_BYTES * PAGE_BYTES
    if end > first:
        madvise(first, end - first, _MADV_DONTNEED)


def release_freed_memory() -> None:
    """Give back to the system the memory that loading used and freed (the file's dtype, conversions).

    glibc keeps freed blocks that sit below live ones, so without this the server carries 160-250 MB of
    dead loading memory for its whole life (measured on GPT-2 in bfloat16 and int8).
    """
    process = ctypes.CDLL(None)
    # tcmalloc, when it serves this process (textgen/model/allocator.py), has its own call for it.
    release = getattr(process, "MallocExtension_ReleaseFreeMemory", None)
    try:
        if release is not None:
            release()
        else:
            process.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # neither glibc nor tcmalloc: nothing to do


def kv_bytes_per_token(model: Any) -> int:
    """Bytes one KV position takes: keys and values, in every layer that caches them, in the dtype stored.

    For an encoder-decoder a position is either one of the decoder's (its self-attention cache: the start
    token and each token fed back) or one of the encoder's (the cross-attention cache: every decoder layer
    keeps keys and values of its row's whole encoder output). Both take the decoder's layers × heads × head
    width, so one price serves both and the engine counts positions of either kind (textgen/engine/core.py).
    The encoder's output itself is not kept once the cross-attention cache is filled (engine/seq2seq.py).

    Raises ValueError for an encoder-decoder whose config this does not know how to read.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        layers, kv_heads, head_dim = decoder_kv_shape(model.config)
    else:
        config = model.config.get_text_config()
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    from textgen.model.attention import kv_dtype  # attention.py's imports come back here

    return 2 * layers * kv_heads * head_dim * torch.empty(0, dtype=kv_dtype(model)).element_size()


def decoder_kv_shape(config: Any) -> tuple[int, int, int]:
    """An encoder-decoder's decoder: (layers, heads, per-head width) of its self- and cross-attention caches.

    Not the generic fields: for T5 and BART, num_hidden_layers and num_attention_heads name the encoder's.
    """
    if getattr(config, "d_kv", None) is not None:
        # T5 and kin (mT5, umT5, LongT5, Switch): the head width is d_kv, not d_model / num_heads
        # (flan-t5-small: 6 heads of 64 over d_model 512); num_decoder_layers defaults to num_layers.
        layers = int(getattr(config, "num_decoder_layers", None) or config.num_layers)
        return layers, int(config.num_heads), int(config.d_kv)
    layers, heads = getattr(config, "decoder_layers", None), getattr(config, "decoder_attention_heads", None)
    if layers is not None and heads is not None:
        # BART and kin (mBART, Marian, Pegasus, M2M100, Blenderbot): both attentions of a decoder layer have
        # decoder_attention_heads heads of d_model / heads.
        return int(layers), int(heads), int(config.d_model) // int(heads)
    raise ValueError(
        f"cannot size the KV cache of a {config.model_type!r} encoder-decoder: its config names neither "
        "T5's d_kv nor BART's decoder_layers and decoder_attention_heads"
    )


def kv_budget_tokens(model: Any, context_length: int, settings: Settings) -> int | None:
    """TEXTGEN_KV_BUDGET_TOKENS, or a default from the memory available now.

    In KV positions: for an encoder-decoder, encoder and decoder positions together (kv_bytes_per_token).
    Never less than one full context (else a request that passed validation could wait forever): a
    configured budget below that is an error that says so; a default below it is raised to it, with a warning.
    None (no bound but TEXTGEN_MAX_BATCH_SIZE) only for an encoder-decoder whose config cannot be sized.
    """
    one_row = context_length + GROWTH_BLOCK
    configured = settings.kv_budget_tokens
    if configured is not None:
        if configured < one_row:
            raise ValueError(
                f"TEXTGEN_KV_BUDGET_TOKENS={configured} is less than one full context of this model "
                f"({context_length} tokens + {GROWTH_BLOCK} spare = {one_row}); set it to at least "
                f"{one_row}, or unset it to size it from the available memory"
            )
        return configured
    try:
        per_token = kv_bytes_per_token(model)
    except ValueError as exc:
        log.warning("KV budget: none (%s); set TEXTGEN_KV_BUDGET_TOKENS to bound the batch's cache", exc)
        return None
    available = available_memory()
    most = settings.max_batch_size * one_row  # more than every row at full context is never needed
    if available is None:
        log.warning("KV budget: the available memory is unknown; allowing %d tokens (every row full)", most)
        return most
    budget = int(available * KV_MEMORY_SHARE) // per_token
    if budget < one_row:
        log.warning(
            "KV budget: only %d MB of memory is available, less than one full context needs; allowing one "
            "(%d tokens): long requests run one at a time and the process may still run out of memory",
            available >> 20,
            one_row,
        )
        return one_row
    budget = min(budget, most)
    log.info(
        "KV budget: %d tokens (%d MB at %d bytes per token; %d%% of the %d MB available; "
        "TEXTGEN_KV_BUDGET_TOKENS)",
        budget,
        budget * per_token >> 20,
        per_token,
        int(KV_MEMORY_SHARE * 100),
        available >> 20,
    )
    return budget
