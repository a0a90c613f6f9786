import shutil
import subprocess

import pytest

from tests.server import ROOT


@pytest.mark.skipif(shutil.which("black") is None, reason="black is installed by scripts/install.sh")
def test_code_is_black_formatted():
    result = subprocess.run(["black", "--check", "--quiet", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"run `black .`:\n{result.stderr}"
