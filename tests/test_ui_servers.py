"""Loopback HTTP servers for the UI tests (helpers; no tests here).

- `RecordingProxy` sits between the UI and the real `bentoml serve`, and keeps each request body and
  each response body, so a test sees exactly what reached the server and what came back.
- `ScriptedServer` answers with fixed bytes, for what the real server cannot be made to do on demand:
  fail in the middle of a stream, drop the connection, or never answer.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import httpx


@dataclass
class Exchange:
    method: str
    path: str
    body: Any  # the request's JSON, or None
    status: int = 0
    response: bytes = b""

    def sse_events(self) -> list[dict[str, Any]]:
        return [
            json.loads(line[len(b"data: ") :])
            for line in self.response.split(b"\n")
            if line.startswith(b"data: ")
        ]


class _LoopbackServer:
    """A threaded HTTP server on 127.0.0.1, started and stopped as a context manager."""

    def __init__(self, handle: Callable[[BaseHTTPRequestHandler], None]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                handle(self)

            do_POST = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> _LoopbackServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


class RecordingProxy(_LoopbackServer):
    """Forwards every request to `target` unchanged, streaming the answer through as it comes."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.exchanges: list[Exchange] = []
        super().__init__(self._forward)

    def posts(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.method == "POST"]

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        raw = _read_body(handler)
        exchange = Exchange(handler.command, handler.path, json.loads(raw) if raw else None)
        self.exchanges.append(exchange)
        headers = {"content-type": handler.headers.get("Content-Type", "application/json")}
        with httpx.stream(
            handler.command, self.target + handler.path, content=raw, headers=headers, timeout=120
        ) as response:
            exchange.status = response.status_code
            handler.send_response(response.status_code)
            handler.send_header("Content-Type", response.headers.get("content-type", ""))
            handler.end_headers()  # HTTP/1.0: the body ends when the connection closes
            for chunk in response.iter_raw():
                exchange.response += chunk
                handler.wfile.write(chunk)
                handler.wfile.flush()


@dataclass
class Reply:
    """A scripted answer: status, content type, body pieces sent `pause` apart, then maybe a hang."""

    status: int = 200
    content_type: str = "application/json"
    chunks: list[bytes] = field(default_factory=list)
    pause: float = 0.05
    hang: float = 0.0  # seconds to stay silent before (not) answering


class ScriptedServer(_LoopbackServer):
    def __init__(self, routes: dict[str, Reply]) -> None:
        self.routes = routes
        self.dropped: list[str] = []  # paths whose client hung up before the reply was complete
        super().__init__(self._answer)

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        _read_body(handler)
        reply = self.routes.get(handler.path, Reply(404, chunks=[b'{"error": "not found", "detail": []}']))
        if reply.hang:
            time.sleep(reply.hang)
            return
        handler.send_response(reply.status)
        handler.send_header("Content-Type", reply.content_type)
        handler.end_headers()
        try:
            for chunk in reply.chunks:
                handler.wfile.write(chunk)
                handler.wfile.flush()
                time.sleep(reply.pause)
        except (BrokenPipeError, ConnectionResetError):
            self.dropped.append(handler.path)


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


FINAL = {
    "finish_reason": "length",
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    "timings": {"queue_ms": 1.0, "first_token_ms": 2.0, "total_ms": 3.0, "tokens_per_second": 4.0},
    "model": "scripted",
    "seed": 7,
}
