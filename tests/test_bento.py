"""The model in the BentoML store: import (Hub id, directory, GGUF), idempotence, and a Bento that pins it.

Every test uses its own BENTOML_HOME, so nothing touches the user's store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.server import ROOT, start_process

HUB_SHA = "0123456789abcdef0123456789abcdef01234567"


def run(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENTOML_HOME": str(home), "MODEL_NAME": "", **env}
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def import_model(source: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    result = run([sys.executable, "-m", "textgen.import_model", source], home, **env)
    assert result.returncode == 0, result.stderr
    return result


def stored_tags(home: Path) -> list[str]:
    return sorted(f"{p.parent.name}:{p.name}" for p in (home / "models").glob("*/*") if p.is_dir())


def labels(home: Path, tag: str) -> dict[str, str]:
    name, version = tag.split(":")
    return yaml.safe_load((home / "models" / name / version / "model.yaml").read_text())["labels"]


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "bentoml"


def test_directory_import_is_labelled_and_idempotent(home: Path, tiny_model_dir: Path) -> None:
    first = import_model(str(tiny_model_dir), home)
    [tag] = stored_tags(home)
    assert f"imported {tag}" in first.stdout
    found = labels(home, tag)
    assert found["kind"] == "directory"
    assert found["source"] == str(tiny_model_dir)
    assert len(found["sha256"]) == 64 and tag.endswith(found["sha256"][:16])
    assert found["dtype"] == "float32"
    assert found["context_length"] == "256"

    again = import_model(str(tiny_model_dir), home)
    assert f"already in the store: {tag}" in again.stdout
    assert stored_tags(home) == [tag]


def test_hub_import_records_the_commit(home: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    # A Hub cache as huggingface_hub lays it out; HF_HUB_OFFLINE makes the real download code read it.
    repo = tmp_path / "hf" / "hub" / "models--textgen-test--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / HUB_SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_SHA)
    hf = {"HF_HOME": str(tmp_path / "hf")}

    import_model("textgen-test/tiny", home, **hf)
    import_model("textgen-test/tiny", home, **hf)
    assert stored_tags(home) == [f"textgen-model:{HUB_SHA[:16]}"]
    found = labels(home, f"textgen-model:{HUB_SHA[:16]}")
    assert (found["kind"], found["source"], found["revision"]) == ("hub", "textgen-test/tiny", HUB_SHA)


def test_unknown_source_fails_with_advice(home: Path) -> None:
    result = run([sys.executable, "-m", "textgen.import_model", "/nonexistent/model.gguf"], home)
    assert result.returncode == 1
    assert "no such file" in result.stderr and "Set MODEL_NAME" in result.stderr


@pytest.mark.real_model
def test_gguf_import_records_the_file_hash(home: Path, cache_dir: Path) -> None:
    from textgen.model.source import file_sha256, offline_model_path

    gguf = offline_model_path()
    import_model(str(gguf), home, TEXTGEN_CACHE_DIR=str(cache_dir))
    [tag] = stored_tags(home)
    found = labels(home, tag)
    assert (found["kind"], found["source"], found["sha256"]) == ("gguf", str(gguf), file_sha256(gguf))
    assert found["dtype"] == "float32" and found["context_length"] == "8192"


@pytest.fixture()
def bento(home: Path, tiny_model_dir: Path, tmp_path: Path) -> Iterator[str]:
    """A Bento built with the tiny model; a second model imported afterwards must not replace it."""
    import_model(str(tiny_model_dir), home)
    built = run([sys.executable, "-m", "bentoml", "build", "--output", "tag", str(ROOT)], home)
    assert built.returncode == 0, built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    newer = tmp_path / "newer-model"
    shutil.copytree(tiny_model_dir, newer)
    (newer / "generation_config.json").write_text('{"_from_model_config": true}')
    import_model(str(newer), home)
    yield tag


def test_bento_pins_the_model_and_serves_it_offline(bento: str, home: Path) -> None:
    name, version = bento.split(":")
    info = yaml.safe_load((home / "bentos" / name / version / "bento.yaml").read_text())
    [pinned] = info["models"]
    assert pinned["alias"] == "textgen-model"
    assert labels(home, pinned["tag"])["model_id"] == "tiny-gpt2"

    exported = home.parent / "textgen.bento"
    result = run([sys.executable, "-m", "bentoml", "export", bento, str(exported)], home)
    assert result.returncode == 0, result.stderr
    with tarfile.open(exported) as archive:
        names = [Path(name) for name in archive.getnames()]  # "./models/<name>/<version>/..."
    carried = {
        "/".join(p.parts[1:3]) for p in names if p.parts[:1] == ("models",) and p.name == "model.safetensors"
    }
    assert carried == {pinned["tag"].replace(":", "/")}  # the pinned model travels with the Bento, alone
    # Every wing of the library travels too (a container has no checkout to fall back on).
    wings = ("textgen/api/generate.py", "textgen/engine/core.py", "textgen/model/cpu.py")
    for module in ("service.py", *wings, "textgen/model/float16_linear.cpp"):  # its C++ too, built at start
        assert Path("src") / module in names, module  # Path drops the archive's leading "./"

    command = lambda port: [  # noqa: E731
        *(sys.executable, "-m", "bentoml", "serve", bento),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]
    env = {"BENTOML_HOME": str(home), "MODEL_NAME": "", "TEXTGEN_THREADS": "1"}
    with start_process(command, env) as server:
        body = {"prompt": "What is AI?", "max_new_tokens": 5}
        answer = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "tiny-gpt2"  # the pinned model, not the newer import


def test_build_without_an_imported_model_says_how_to_import_it(tmp_path: Path) -> None:
    empty_home = tmp_path / "empty-bentoml-home"
    built = run([sys.executable, "-m", "bentoml", "build", str(ROOT)], empty_home)
    assert built.returncode != 0
    output = built.stdout + built.stderr
    assert "python -m textgen.import_model" in output and "No cloud context" not in output, output[-2000:]
