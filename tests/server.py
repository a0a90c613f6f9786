"""Start `bentoml serve service:TextGen` as a user would, on a free port, and stop it afterwards."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    readiness: list[tuple[int, str]] = field(default_factory=list)  # what the ready path said meanwhile

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def openai(self, api_key: str = "unused", timeout: float = 120.0) -> Any:
        """The official `openai` client of this server's /v1 routes, without retries."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=timeout)


def free_port() -> int:
    """A port free now, below the kernel's range of ephemeral ports. A port the kernel handed out (bind to 0)
    was in that range, where every outgoing connection also takes its local port: a CI run's session server
    lost its port to one in the moment before `bentoml serve` bound it ("Could not bind 127.0.0.1:43037"),
    and every test using that server failed."""
    low = _ephemeral_ports()[0]
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low}")


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def server_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service:TextGen",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@contextmanager
def start_server(env: dict[str, str], ready_timeout: float = 240.0) -> Iterator[Server]:
    """`bentoml serve service:TextGen` with `env` on top of this process's environment."""
    with start_process(server_command, env, ready_timeout) as server:
        yield server


def stop_on_sigterm() -> None:
    """Let SIGTERM (`kill`, `timeout`) end the calling program as Ctrl-C does: SystemExit in the main thread,
    so each `start_process` block stops its server and a benchmark kills its anchor workers. By default
    SIGTERM ends Python at once, and they ran on, loading the cores the next measurement used."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextmanager
def start_process(
    command: Callable[[int], list[str]],
    env: dict[str, str],
    ready_timeout: float = 240.0,
    ready_path: str = "/readyz",
) -> Iterator[Server]:
    """Run `command(port)` in its own process group until the block ends; wait for GET `ready_path`."""
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"textgen-server-{port}.log"
    # Every `bentoml serve` wipes $BENTOML_HOME/prometheus_multiproc_dir at start, which would blind the
    # /metrics of any other server already running with the same home: give each its own.
    home = tempfile.mkdtemp(prefix="bentoml-home-")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENTOML_HOME": home, **env}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command(port),
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    passed = False
    try:
        wait_ready(server, ready_timeout, ready_path)
        yield server
        passed = True
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except ProcessLookupError:  # the test stopped it already (tests/test_resilience.py)
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(home, ignore_errors=True)
        if passed:  # a failed test's server log stays for reading (its path is in the test's report)
            log_path.unlink(missing_ok=True)


def wait_ready(server: Server, timeout: float, path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            response = httpx.get(f"{server.url}{path}", timeout=2)
            server.readiness.append((response.status_code, response.text))
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout} s:\n{server.log()[-4000:]}")
