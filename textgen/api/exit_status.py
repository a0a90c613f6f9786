"""Stopping `bentoml serve` from its worker when the model cannot be served, with a non-zero exit.

BentoML restarts a worker that exits, forever, so a worker whose model fails to load asks the `bentoml
serve` process (its parent) to shut down instead. That process would then exit 0, and a shell, a CI job
or a container runtime would read a failed start as a clean stop. So the worker leaves a note for its
parent first; the parent imported service.py too (`watch_for_failed_worker`), and turns the note into
exit status 1 as it exits.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import tempfile
from pathlib import Path


def _note(server_pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"textgen-failed-start-{server_pid}"


def watch_for_failed_worker() -> None:
    """In every process that imports the service: exit 1 if a worker of this process left a note."""
    note = _note(os.getpid())
    note.unlink(missing_ok=True)  # an earlier process of the same pid may have left one

    def exit_failed() -> None:
        try:
            reason = note.read_text()
        except OSError:
            return
        note.unlink(missing_ok=True)
        sys.stderr.write(f"textgen: the server stopped because its worker could not start: {reason}\n")
        sys.stderr.flush()
        os._exit(1)

    atexit.register(exit_failed)


def stop_server(reason: str) -> None:
    """Ask `bentoml serve` (this worker's parent) to shut down, and to exit 1 for `reason`."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            is_bentoml = b"bentoml" in f.read()
    except OSError:
        is_bentoml = False
    if is_bentoml:
        try:
            _note(parent).write_text(reason)
        except OSError:  # no writable temporary directory: the server still stops, with exit 0
            pass
        os.kill(parent, signal.SIGTERM)
