"""The harness's processes end with the program that started them (tests/server.py `stop_on_sigterm`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.server import ROOT

CHILD = """
import subprocess, sys, time
from tests.server import stop_on_sigterm
stop_on_sigterm()
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
try:
    print(helper.pid, flush=True)
    time.sleep(600)
finally:
    helper.kill()
    helper.wait()
"""


def test_sigterm_runs_the_cleanup_of_a_benchmark_like_program():
    program = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert program.stdout is not None
    helper = int(program.stdout.readline())
    try:
        program.send_signal(signal.SIGTERM)
        assert program.wait(timeout=30) == 128 + signal.SIGTERM  # SystemExit, not death by the signal
        deadline = time.monotonic() + 10
        while not _gone(helper):
            assert time.monotonic() < deadline, "the program's helper process outlived it"
            time.sleep(0.05)
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
        if not _gone(helper):
            os.kill(helper, signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
