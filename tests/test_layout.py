"""The house rule: textgen's wings import only downwards, api → frontend → engine → model."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "textgen"
WINGS = ("api", "frontend", "engine", "model")  # top to bottom
SHARED = ("textgen.config",)  # settings every wing reads; it imports no wing


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "textgen" or m.startswith("textgen.")}


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else None


def test_every_module_lives_in_a_wing_or_is_shared():
    loose = {p.stem for p in ROOT.glob("*.py")} - {"__init__", "config", "import_model"}
    assert not loose, f"textgen/{sorted(loose)} belong in a wing: {WINGS}"


def test_wings_import_only_downwards():
    wrong = []
    for wing in WINGS:
        allowed = set(WINGS[WINGS.index(wing) :])
        for path in (ROOT / wing).glob("*.py"):
            for module in imported_modules(path):
                target = wing_of(module)
                if module in SHARED or module == "textgen":
                    continue
                if target not in allowed:
                    wrong.append(f"textgen/{wing}/{path.name} imports {module}")
    assert not wrong, "imports against api → frontend → engine → model:\n" + "\n".join(wrong)


def test_shared_modules_import_no_wing():
    for module in SHARED:
        path = ROOT / f"{module.split('.')[-1]}.py"
        assert not {m for m in imported_modules(path) if wing_of(m)}, f"{module} must not import a wing"


def test_the_service_module_imports_no_torch(tiny_model_dir: Path):
    """`bentoml serve` imports service.py in its own process before its worker imports it again; only the
    worker's loading thread needs torch and transformers (~2.7 s of a ~9 s start when both imported them)."""
    probe = "import sys, service; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    env = {**os.environ, "MODEL_NAME": str(tiny_model_dir), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT.parent, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", "importing service.py loaded " + run.stdout
