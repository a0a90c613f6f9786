"""bench/run.py's closed loop against a stand-in server (no model): a level stops sending once its seconds
are up, each client having sent one request, and counts only what was sent."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

from bench.run import run_level

SERVICE_SECONDS = 0.5  # each request's time at the stand-in server


class Slow(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802  (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(SERVICE_SECONDS)
        body = json.dumps({"usage": {"completion_tokens": 128}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class FewPrompts:
    def next(self) -> str:
        return "a prompt"


def test_a_level_stops_sending_after_its_seconds_once_every_client_has_sent_one() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = SimpleNamespace(
        url=f"http://127.0.0.1:{httpd.server_port}", process=SimpleNamespace(pid=os.getpid())
    )
    try:
        # Two clients, 0.5 s a request, a budget of 0.75 s: each sends at 0 and ~0.5, not at ~1.0 (the
        # budget falls midway between sends, so a slow machine's overheads have 0.25 s of slack).
        level = asyncio.run(run_level(server, "baseline", "top-p", 2, 20, FewPrompts(), seconds=0.75))
        assert (level.requests, level.tokens, level.errors) == (4, 512, 0)
        assert level.seconds >= 2 * SERVICE_SECONDS  # the level ends when its last request does
        # A budget already spent still lets every client send one.
        level = asyncio.run(run_level(server, "baseline", "top-p", 3, 20, FewPrompts(), seconds=0.0))
        assert (level.requests, level.tokens) == (3, 384)
        # Without a budget, the requests asked for.
        level = asyncio.run(run_level(server, "baseline", "top-p", 2, 5, FewPrompts()))
        assert level.requests == 5 and level.tokens == 640
    finally:
        httpd.shutdown()
