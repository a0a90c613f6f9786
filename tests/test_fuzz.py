"""Fuzz every documented operation from /docs.json with schemathesis: no 5xx, answers match the document."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.server import Server


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    tiny_server: Server, tmp_path: Path
) -> None:
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{tiny_server.url}/docs.json"),
        *("--checks", "not_a_server_error,response_schema_conformance"),
        *("--phases", "examples,coverage,fuzzing"),
        *("--max-examples", "30", "--workers", "1", "--seed", "20261125"),
        *("--report", "junit", "--report-dir", str(tmp_path)),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "passed" in result.stdout and "Tested: 11" in result.stdout
