"""Benchmarks that compare textgen with an earlier textgen: export that commit, run a worker against a tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from textgen.config import Settings
from textgen.model.allocator import named_in, preload_for_workers

ROOT = Path(__file__).resolve().parents[1]


def export(rev: str, into: Path) -> Path:
    """The files of commit `rev` (`git archive`), written under `into`; returns `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def run_worker(script: Path, tree: Path, args: list[str], threads: int) -> dict[str, Any]:
    """Run `script args` in a fresh process that imports textgen from `tree`; its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    # The allocator `bentoml serve` gives its workers (TEXTGEN_ALLOCATOR), whichever tree runs.
    preload_for_workers(Settings.from_env().allocator, env)
    out = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, cwd=tree
    )
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed on {tree}:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["allocator"] = named_in(env.get("LD_PRELOAD", "")) or "system"
    return result
