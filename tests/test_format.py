import subprocess

from tests.server import ROOT


def test_code_is_black_formatted():
    result = subprocess.run(["black", "--check", "--quiet", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"run `black .`:\n{result.stderr}"
