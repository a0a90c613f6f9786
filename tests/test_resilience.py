"""Reliability over time and under faults, against live `bentoml serve` processes (tiny GPT-2, float32):
graceful drain on SIGTERM, a failing engine step that fails only its own request, the KV budget, and a
client that stops reading. Time budgets derive from a step time measured on the server under test.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from textgen.api.drain import EXIT_MARGIN_SECONDS
from tests.server import Server, start_server
from tests.test_reliability import assert_recovers
from tests.test_service import metric
from tests.tiny_model import build_tiny_gpt2

LONG_CONTEXT = 4200  # room for the longest generation a request may ask: 4096 tokens
MOST_TOKENS = 4096
POISON = "POISONED"
CLEAN_PROMPTS = [
    "What is AI?",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Rome is",
    "Language models predict the next token",
    "Batching many requests together keeps",
    "Café 東京 🙂",
    "Stop strings end generation early.",
]
PLAIN = {"temperature": 0, "ignore_eos": True, "postprocess": False, "template": "none"}


def until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll `condition` until it holds; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds:.1f} s: {what}"
        time.sleep(0.02)


def seconds_per_token(server: Server, tokens: int = 200) -> float:
    """One request decoding alone: the server's time per generated token, after the first."""
    body = {"prompt": "What is AI?", "max_new_tokens": tokens, **PLAIN}
    timings = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()["timings"]
    return max((timings["total_ms"] - timings["first_token_ms"]) / 1000 / (tokens - 1), 1e-5)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "long-tiny", n_positions=LONG_CONTEXT)


def long_env(model: Path, cache_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "MODEL_NAME": str(model),
        "TEXTGEN_CACHE_DIR": str(cache_dir),
        "TEXTGEN_THREADS": "1",
        "TEXTGEN_DTYPE": "float32",
        "TEXTGEN_MAX_NEW_TOKENS": str(MOST_TOKENS),
        **extra,
    }


# -- graceful drain on SIGTERM -------------------------------------------------------------------------


def test_sigterm_drains_in_flight_generations_refuses_new_ones_and_exits_0(
    long_model: Path, cache_dir: Path
) -> None:
    drain_seconds = 60
    with start_server(long_env(long_model, cache_dir, TEXTGEN_DRAIN_SECONDS=str(drain_seconds))) as server:
        # Long enough that the 8 still run well after SIGTERM: 4 s of decoding alone (more in a batch).
        tokens = min(MOST_TOKENS, max(200, math.ceil(4.0 / seconds_per_token(server))))
        body = {"prompt": "What is AI?", "max_new_tokens": tokens, **PLAIN}
        openai_body = {"prompt": "What is AI?", "max_tokens": tokens, "temperature": 0, "ignore_eos": True}

        def generate() -> tuple[int, int]:
            r = httpx.post(f"{server.url}/generate", json=body, timeout=300)
            return r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else -1

        def stream() -> tuple[int, int]:
            with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=300) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
            final = events[-1] if events else {}
            return r.status_code, final.get("usage", {}).get("completion_tokens", -1)

        def complete() -> tuple[int, int]:
            r = httpx.post(f"{server.url}/v1/completions", json=openai_body, timeout=300)
            return r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else -1

        with ThreadPoolExecutor(8) as pool:
            running = [pool.submit(f) for f in [generate] * 4 + [stream] * 2 + [complete] * 2]
            until(lambda: metric(server, "textgen_running_sequences") == 8, 60, "8 generations running")

            os.kill(server.process.pid, signal.SIGTERM)  # as Kubernetes does: to `bentoml serve` (PID 1)
            stopped = time.monotonic()
            until(lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503, 5, "/readyz 503")
            assert httpx.get(f"{server.url}/readyz", timeout=5).json()["status"] == "draining"
            assert httpx.get(f"{server.url}/livez", timeout=5).status_code == 200

            late = httpx.post(f"{server.url}/generate", json=body, timeout=30)
            assert late.status_code == 503 and late.headers["retry-after"] == "1"
            assert (
                "shutting down" in late.json()["error"]
                and late.json()["detail"][0]["type"] == "shutting_down"
            )
            late_stream = httpx.post(f"{server.url}/generate_stream", json=body, timeout=30)
            assert late_stream.status_code == 503 and "retry-after" in late_stream.headers
            late_openai = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []}, timeout=30)
            assert late_openai.status_code == 503 and late_openai.headers["retry-after"] == "1"
            error = late_openai.json()["error"]
            assert error["type"] == "server_error" and "shutting down" in error["message"]
            # The late ones were refused while the 8 were still generating: they really were drained.
            assert not any(f.done() for f in running), "the generations ended before the late requests"

            results = [f.result(timeout=drain_seconds) for f in running]
        assert results == [(200, tokens)] * 8  # every one finished, in full

        code = server.process.wait(timeout=drain_seconds + EXIT_MARGIN_SECONDS)
        took = time.monotonic() - stopped
        assert code == 0, server.log()[-3000:]
        assert took < drain_seconds + EXIT_MARGIN_SECONDS
        assert "SIGTERM: draining" in server.log() and "drain: done" in server.log()


def test_generations_outlasting_the_drain_are_cancelled_with_503_and_the_server_still_exits_0(
    long_model: Path, cache_dir: Path
) -> None:
    drain_seconds = 1
    with start_server(long_env(long_model, cache_dir, TEXTGEN_DRAIN_SECONDS=str(drain_seconds))) as server:
        # At least 5 s of decoding: far past the 1 s drain.
        tokens = min(MOST_TOKENS, max(500, math.ceil(5.0 / seconds_per_token(server))))
        body = {"prompt": "What is AI?", "max_new_tokens": tokens, **PLAIN}
        with ThreadPoolExecutor(2) as pool:
            answers = [
                pool.submit(httpx.post, f"{server.url}/generate", json=body, timeout=120) for _ in range(2)
            ]
            until(lambda: metric(server, "textgen_running_sequences") == 2, 60, "2 generations running")
            os.kill(server.process.pid, signal.SIGTERM)
            stopped = time.monotonic()
            responses = [a.result(timeout=60) for a in answers]
        for r in responses:
            assert r.status_code == 503 and "shutting down" in r.json()["error"], r.text
        assert server.process.wait(timeout=drain_seconds + EXIT_MARGIN_SECONDS) == 0
        assert time.monotonic() - stopped < drain_seconds + EXIT_MARGIN_SECONDS
        assert "still in flight" in server.log()


# -- a failing step, and the KV budget (one server) --------------------------------------------------------

KV_BUDGET = 900  # tokens: 3 full contexts of the tiny model (3 × (256 + 32) = 864), fewer than 8


@pytest.fixture(scope="module")
def guarded_server(tiny_model_dir: Path, cache_dir: Path) -> Iterator[Server]:
    env = {
        "MODEL_NAME": str(tiny_model_dir),
        "TEXTGEN_CACHE_DIR": str(cache_dir),
        "TEXTGEN_THREADS": "1",
        "TEXTGEN_DTYPE": "float32",
        "TEXTGEN_MAX_BATCH_SIZE": "8",
        "TEXTGEN_MAX_QUEUE": "4",
        "TEXTGEN_KV_BUDGET_TOKENS": str(KV_BUDGET),
        "TEXTGEN_TEST_FAULT_PROMPT": POISON,
        "TEXTGEN_TEST_FAULT_AFTER_TOKENS": "3",  # fails in a decoding step, inside the running batch
    }
    with start_server(env) as server:
        yield server


def post_all(
    server: Server, requests: list[tuple[str, dict[str, Any], dict[str, str]]]
) -> list[httpx.Response]:
    """Send the requests at once (path, body, headers); their responses in order."""
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [
            pool.submit(httpx.post, f"{server.url}{path}", json=body, headers=headers, timeout=120)
            for path, body, headers in requests
        ]
        return [f.result() for f in futures]


def test_a_poisoned_request_fails_alone_and_the_rest_of_its_batch_gets_the_same_text(
    guarded_server: Server,
) -> None:
    def body(prompt: str) -> dict[str, Any]:
        return {"prompt": prompt, "max_new_tokens": 100, **PLAIN}

    clean = post_all(guarded_server, [("/generate", body(p), {}) for p in CLEAN_PROMPTS])
    expected = [r.json()["generated_text"] for r in clean]
    errors_before = metric(guarded_server, 'textgen_requests_finished_total{reason="error"}')
    batch_failures_before = metric(guarded_server, 'textgen_engine_failures_total{kind="batch"}')

    # The clean requests stream; the poisoned one is sent once every clean one has a token, so it joins
    # their running batch (they have ~99 steps to go) and fails inside it, whatever the CPU's speed.
    started = [threading.Event() for _ in CLEAN_PROMPTS]

    def stream(i: int) -> str:
        with httpx.stream(
            "POST", f"{guarded_server.url}/generate_stream", json=body(CLEAN_PROMPTS[i]), timeout=120
        ) as r:
            texts = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    texts.append(json.loads(line[6:]).get("text", ""))
                    started[i].set()
            return "".join(texts)

    poisoned = f"{POISON} What is the weather like today?"
    with ThreadPoolExecutor(len(CLEAN_PROMPTS)) as pool:
        streams = [pool.submit(stream, i) for i in range(len(CLEAN_PROMPTS))]
        assert all(event.wait(60) for event in started)
        failed = httpx.post(f"{guarded_server.url}/generate", json=body(poisoned), timeout=60)
        texts = [s.result() for s in streams]

    assert failed.status_code == 500, failed.text
    message = failed.json()["error"]
    assert "generation failed" in message and "InjectedFault" in message and "retry, or report it" in message
    request_id = message.split("(request ")[1].split(")")[0]
    assert texts == expected
    # It failed inside the batch (the step undone, its rows retried alone), not alone.
    assert metric(guarded_server, 'textgen_engine_failures_total{kind="batch"}') > batch_failures_before

    # A streamed request fails with an error event; a client's X-Request-ID names it in the log.
    with httpx.stream(
        "POST",
        f"{guarded_server.url}/generate_stream",
        json=body(poisoned),
        headers={"X-Request-ID": "client-chosen-id-42"},
        timeout=60,
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and "InjectedFault" in events[-1]["error"]

    assert metric(guarded_server, 'textgen_requests_finished_total{reason="error"}') == errors_before + 2
    assert metric(guarded_server, 'textgen_engine_failures_total{kind="request"}') >= 2
    log = guarded_server.log()
    assert log.count(f"request {request_id} failed in an engine step") == 1  # logged once, by its id
    assert log.count("request client-chosen-id-42 failed in an engine step") == 1
    assert POISON not in log and not any(p in log for p in CLEAN_PROMPTS)  # never a prompt
    assert_recovers(guarded_server)


def test_full_contexts_beyond_the_kv_budget_wait_or_get_429_and_never_crash(guarded_server: Server) -> None:
    context = httpx.get(f"{guarded_server.url}/info", timeout=10).json()["context_length"]
    assert metric(guarded_server, "textgen_kv_budget_tokens") == KV_BUDGET
    full = {"prompt": "What is AI?", "max_new_tokens": context - 4, **PLAIN}  # "What is AI?" is 4 tokens
    openai_full = {"prompt": "What is AI?", "max_tokens": context - 4, "temperature": 0, "ignore_eos": True}
    requests = [("/generate", full, {})] * 12 + [("/v1/completions", openai_full, {})] * 4

    samples: list[tuple[float, float]] = []
    with ThreadPoolExecutor(1) as watcher:
        done = False

        def watch() -> None:  # what /metrics shows while the 16 are in flight
            while not done:
                samples.append(
                    (
                        metric(guarded_server, "textgen_kv_reserved_tokens"),
                        metric(guarded_server, "textgen_kv_cache_bytes"),
                    )
                )
                time.sleep(0.05)

        watching = watcher.submit(watch)
        responses = post_all(guarded_server, requests)
        done = True
        watching.result(timeout=30)

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 3, statuses  # at least a batch's worth ran
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
        elif "usage" in r.json():
            assert r.json()["usage"]["completion_tokens"] == context - 4
    assert (
        max(r.json()["batch_size"] for r in responses if r.status_code == 200 and "batch_size" in r.json())
        <= 3
    )
    per_token = 2 * 2 * 64 * 4  # the tiny GPT-2: keys and values, 2 layers, 64 wide, float32
    assert samples and max(s[0] for s in samples) <= KV_BUDGET
    assert max(s[0] for s in samples) > 2 * context  # the budget was the limit, not the load
    assert max(s[1] for s in samples) <= KV_BUDGET * per_token
    assert guarded_server.process.poll() is None
    assert_recovers(guarded_server)


# -- a client that stops reading -------------------------------------------------------------------------


def stalled_stream(server: Server, path: str, body: dict[str, Any]) -> socket.socket:
    """Open a stream on a raw socket with tiny buffers, read until its first event, then read no more."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: the window it advertises
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)  # small segments: a small server send buffer
    sock.connect((host, int(port)))
    payload = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    sock.settimeout(30)
    received = b""
    while b"data: " not in received.partition(b"\r\n\r\n")[2]:
        chunk = sock.recv(256)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock


def test_a_stream_whose_client_stops_reading_is_cancelled_and_the_others_are_unaffected(
    long_model: Path, cache_dir: Path
) -> None:
    timeout = 2  # TEXTGEN_TIMEOUT: a write that waits this long stops the stream
    with start_server(long_env(long_model, cache_dir, TEXTGEN_TIMEOUT=str(timeout))) as server:
        per_token = seconds_per_token(server)
        short = {"prompt": "Paris is the capital of France; Rome is", "max_new_tokens": 50, **PLAIN}
        expected = httpx.post(f"{server.url}/generate", json=short, timeout=60).json()["generated_text"]

        # 4 choices of up to 4096 tokens: ~200-byte chunks fill the socket buffers (~100 kB) in ~150 steps,
        # and the choices are still generating when a write has waited `timeout` seconds.
        tokens = min(MOST_TOKENS, 1000 + math.ceil((timeout + 6) / per_token))
        body = {
            "prompt": "What is AI?",
            "max_tokens": tokens,
            "n": 4,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        cancelled = 'textgen_requests_finished_total{reason="cancelled"}'
        before = metric(server, cancelled)
        sock = stalled_stream(server, "/v1/completions", body)
        try:
            # Others, meanwhile: same answers as alone, within the same 2 s timeout.
            others = post_all(server, [("/generate", short, {})] * 3)
            assert [r.status_code for r in others] == [200] * 3
            assert [r.json()["generated_text"] for r in others] == [expected] * 3

            # The stalled one leaves the batch: cancelled, while its socket is still open.
            until(
                lambda: metric(server, cancelled) == before + 4,
                timeout + 4 * tokens * per_token,
                "cancellation",
            )
            until(lambda: metric(server, "textgen_running_sequences") == 0, 5, "an empty batch")
            assert metric(server, 'textgen_rejected_requests_total{reason="stalled"}') == 1
            assert "read nothing for 2 s (TEXTGEN_TIMEOUT)" in server.log()
            assert_recovers(server)
        finally:
            sock.close()
        assert_recovers(server)


# -- BentoML's timeout middleware --------------------------------------------------------------------------


def test_bentomls_timeout_timer_is_cancelled_once_the_response_starts() -> None:
    """BentoML 1.4 left one timer per request scheduled for the whole traffic timeout, holding the request's
    context (and its tracing span) in memory; textgen/api/bentoml_fixes.py cancels it."""
    import asyncio

    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from textgen.api.bentoml_fixes import fix_timeout_middleware

    assert fix_timeout_middleware()

    async def answer(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = TimeoutMiddleware(Starlette(routes=[Route("/", answer)]), timeout=600)

    async def go() -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for _ in range(5):
                assert (await client.get("/")).text == "ok"
        loop = asyncio.get_running_loop()
        return [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]

    assert asyncio.run(go()) == []
