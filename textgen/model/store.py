"""textgen's model in the BentoML model store: import once, versioned by content, then pinned by Bentos.

`python -m textgen.import_model SOURCE` copies a Hugging Face model (Hub id, local directory, or a .gguf
file converted to torch weights) into the store as `textgen-model:<version>`. The version is derived
from the content (the Hub commit, or a sha256), so importing the same source twice finds the model
already there instead of adding a duplicate. Labels say where the weights came from.

bentofile.yaml lists `textgen-model` under `models` with the alias `textgen-model`: `bentoml build`
pins the newest imported version in bento.yaml, containerize carries it, and a service loaded from the
Bento resolves the alias to that pinned version (BentoML's model aliases), never to a newer import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from textgen.config import Settings
from textgen.model.source import ModelSource, file_sha256, resolve_model

log = logging.getLogger(__name__)

STORE_NAME = "textgen-model"  # also the alias bentofile.yaml gives it
# What a Hugging Face model needs to load without remote code; everything else (TF/Flax/ONNX copies,
# training state) stays out of the store and the image.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
LEGACY_WEIGHT_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
SUPPORT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",  # sentencepiece
    "added_tokens.json",
    "chat_template.*",
)


@dataclass(frozen=True)
class ImportResult:
    tag: str
    created: bool  # False: the same content was already in the store
    labels: dict[str, str]


def import_model(source: str | None, settings: Settings, revision: str | None = None) -> ImportResult:
    """Put `source` (default: what MODEL_NAME would serve) into the store, unless it is already there."""
    import bentoml

    folder, labels = _materialize(source, settings, revision)
    version = labels.get("revision") or labels["sha256"][:16]
    tag = f"{STORE_NAME}:{version[:16]}"
    try:
        existing = bentoml.models.get(tag)
        return ImportResult(str(existing.tag), created=False, labels=dict(existing.info.labels))
    except bentoml.exceptions.NotFound:
        pass
    files = model_files(folder)
    labels.update(_describe(folder, files))
    with bentoml.models.create(tag, labels=labels, metadata=dict(labels), module="textgen") as model:
        for name in files:
            shutil.copy2(folder / name, Path(model.path) / name)
    log.info("imported %s into the BentoML model store as %s", labels["source"], model.tag)
    return ImportResult(str(model.tag), created=True, labels=labels)


def stored_model_source() -> ModelSource | None:
    """The model a Bento pinned (or, outside a Bento, the newest import), if the store has one."""
    import bentoml

    try:
        model = bentoml.models.get(STORE_NAME)  # the alias first, then the newest version
    except bentoml.exceptions.NotFound:
        return None
    labels = model.info.labels
    origin = f"BentoML model {model.tag} ({labels.get('source', 'unknown source')})"
    return ModelSource(
        model.path,
        labels.get("model_id", STORE_NAME),
        origin,
        kind="store",
        sha256=labels.get("sha256"),
        revision=labels.get("revision"),
    )


def check_build_has_model() -> None:
    """Stop `bentoml build` early, with the fix, when bentofile.yaml's model is not in the store.

    `bentoml build` imports the service with the bentofile's model aliases set; without an imported model it
    would otherwise fail later with BentoML's "No cloud context default found", which says nothing useful.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    if STORE_NAME not in BentoMLContainer.model_aliases.get() or stored_model_source() is not None:
        return
    raise SystemExit(
        f"bentoml build: the model {STORE_NAME} is not in the BentoML model store. Import it first:\n"
        f"    python -m textgen.import_model            # the default model (GPT-2; offline: SmolLM2)\n"
        f"    python -m textgen.import_model SOURCE     # a Hub id, a local model directory or a .gguf file\n"
        f"then run `bentoml build` again."
    )


def model_files(folder: Path) -> list[str]:
    """The files of a Hugging Face model folder that serving needs, safetensors preferred."""

    def matching(patterns: tuple[str, ...]) -> set[str]:
        return {p.name for pattern in patterns for p in folder.glob(pattern) if p.is_file()}

    weights = matching(WEIGHT_PATTERNS) or matching(LEGACY_WEIGHT_PATTERNS)
    if not weights or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face model folder: it needs config.json and *.safetensors "
            "(or pytorch_model*.bin) weights"
        )
    return sorted(weights | matching(SUPPORT_PATTERNS))


def _materialize(source: str | None, settings: Settings, revision: str | None) -> tuple[Path, dict[str, str]]:
    """A local folder holding the model, and the labels that say where it came from."""
    resolved = resolve_model(replace(settings, model_name=source))
    labels = {"model_id": resolved.model_id, "kind": resolved.kind}
    folder = Path(resolved.location)
    if resolved.kind == "gguf":  # converted to torch weights; the file's hash names the content
        assert resolved.sha256 is not None
        assert resolved.file is not None
        labels.update(source=resolved.file, sha256=resolved.sha256)
    elif resolved.kind == "directory":
        labels.update(source=str(folder.resolve()), sha256=_folder_sha256(folder))
    else:
        folder = _download(resolved.location, revision, labels)
    return folder, labels


def _download(repo_id: str, revision: str | None, labels: dict[str, str]) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [*WEIGHT_PATTERNS, *SUPPORT_PATTERNS]
    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    if not any(folder.glob("*.safetensors")):
        patterns = [*LEGACY_WEIGHT_PATTERNS, *SUPPORT_PATTERNS]
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    # The Hub cache keeps each download under snapshots/<commit sha>: the exact revision served.
    labels.update(source=repo_id, revision=folder.name)
    return folder


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in model_files(folder):
        digest.update(name.encode() + b"\0" + file_sha256(folder / name).encode())
    return digest.hexdigest()


def _describe(folder: Path, files: list[str]) -> dict[str, str]:
    """dtype of the stored weights and the context length, read from the files themselves."""
    config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    context = next(
        (config[key] for key in ("n_positions", "max_position_embeddings", "n_ctx") if key in config),
        None,
    )
    dtype = config.get("dtype") or config.get("torch_dtype")
    safetensors = [name for name in files if name.endswith(".safetensors")]
    if safetensors:
        from safetensors import safe_open

        with safe_open(str(folder / safetensors[0]), framework="pt") as f:
            first = next(iter(f.keys()), None)
            if first is not None:
                dtype = str(f.get_slice(first).get_dtype()).lower()
    dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(str(dtype), str(dtype))
    return {"dtype": dtype, "context_length": str(context or "unknown")}
