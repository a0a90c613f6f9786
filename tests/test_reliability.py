"""Hostile input, overload, timeouts, health and metrics, against live servers (tiny model).

After every error case, a normal request must still succeed (`assert_recovers`).
"""

from __future__ import annotations

import asyncio
import ctypes.util
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server import Server, start_server
from tests.test_service import metric
from tests.tiny_model import build_tiny_gpt2

NORMAL = {"prompt": "What is AI?", "max_new_tokens": 5, "temperature": 0}
LONG_CONTEXT = 4096


def assert_recovers(server: Server, headers: dict[str, str] | None = None) -> None:
    response = httpx.post(f"{server.url}/generate", json=NORMAL, headers=headers, timeout=60)
    assert response.status_code == 200, response.text


def assert_error_shape(response: httpx.Response, status: int, loc: list[str]) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert body["detail"][0]["loc"] == loc and body["detail"][0]["msg"]
    return body


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", None],
)
def test_a_body_that_is_not_json_is_refused_with_415(tiny_server: Server, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/generate", "/generate_stream"):
        response = httpx.post(f"{tiny_server.url}{path}", content=b"prompt=hi", headers=headers)
        body = assert_error_shape(response, 415, ["header", "content-type"])
        assert "application/json" in body["error"]
    openai = httpx.post(f"{tiny_server.url}/v1/completions", content=b"prompt=hi", headers=headers)
    assert openai.status_code == 415 and openai.json()["error"]["code"] == "unsupported_media_type"
    assert_recovers(tiny_server)


def test_json_with_a_charset_is_accepted(tiny_server: Server) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    response = httpx.post(
        f"{tiny_server.url}/generate", content=b'{"prompt": "Hi", "max_new_tokens": 2}', headers=headers
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("raw", [b'{"prompt": "What is AI?"', b"not json", b'{"prompt": "x",}', b""])
def test_malformed_json_is_a_400(tiny_server: Server, raw: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    body = assert_error_shape(
        httpx.post(f"{tiny_server.url}/generate", content=raw, headers=headers), 400, ["body"]
    )
    assert "not valid JSON" in body["error"]
    openai = httpx.post(f"{tiny_server.url}/v1/chat/completions", content=raw, headers=headers)
    assert openai.status_code == 400 and openai.json()["error"]["code"] == "malformed_json"
    assert_recovers(tiny_server)


def test_a_body_over_the_default_1_mb_is_refused_with_413(tiny_server: Server) -> None:
    huge = {"prompt": "x" * (1 << 20)}
    body = assert_error_shape(httpx.post(f"{tiny_server.url}/generate", json=huge), 413, ["body"])
    assert "1048576 bytes" in body["error"] and "TEXTGEN_MAX_BODY_BYTES" in body["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    chunked = httpx.post(
        f"{tiny_server.url}/generate", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_error_shape(chunked, 413, ["body"])
    assert_recovers(tiny_server)


def test_truncate_keeps_the_prompt_end_and_reports_it_in_usage(tiny_server: Server) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 40  # more than the tiny model's 256 tokens
    refused = httpx.post(f"{tiny_server.url}/generate", json={"prompt": prompt, "max_new_tokens": 8})
    body = assert_error_shape(refused, 400, ["prompt"])
    assert "256" in body["error"] and "truncate" in body["error"]

    request = {"prompt": prompt, "max_new_tokens": 8, "truncate": 100, "temperature": 0, "ignore_eos": True}
    answer = httpx.post(f"{tiny_server.url}/generate", json=request, timeout=60).json()
    usage = answer["usage"]
    assert usage["prompt_tokens"] == 100 and usage["completion_tokens"] == 8
    assert usage["truncated_prompt_tokens"] > 100  # the prompt was ~400 tokens

    short = httpx.post(f"{tiny_server.url}/generate", json={**NORMAL, "truncate": 100}).json()
    assert short["usage"]["truncated_prompt_tokens"] == 0
    bad = httpx.post(f"{tiny_server.url}/generate", json={**NORMAL, "truncate": 0})
    assert_error_shape(bad, 400, ["truncate"])


# -- health, info, metrics ------------------------------------------------------------------------


def test_health_answers_json(tiny_server: Server) -> None:
    for path in ("/livez", "/healthz"):
        live = httpx.get(f"{tiny_server.url}{path}")
        assert live.status_code == 200 and live.json() == {"status": "alive"}
    ready = httpx.get(f"{tiny_server.url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "model": "tiny-gpt2"}


def test_info_describes_the_model_and_the_limits(tiny_server: Server, tiny_model_dir: Path) -> None:
    info = httpx.get(f"{tiny_server.url}/info").json()
    assert info["status"] == "ready"
    assert info["model"] == "tiny-gpt2" and info["source"] == str(tiny_model_dir)
    assert (
        info["dtype"] == "float32" and info["context_length"] == 256 and info["kv_cache_dtype"] == "float32"
    )
    assert info["compiled_step"] == "off: float32 decodes eagerly"  # textgen/model/compiled.py: bfloat16 only
    assert info["limits"]["max_new_tokens"] == 1024 and info["limits"]["max_body_bytes"] == 1 << 20
    assert info["limits"]["max_queue"] == 128 and info["limits"]["timeout_seconds"] == 600
    assert info["auth"] is False
    assert info["version"]["textgen"] and info["version"]["bentoml"] and info["version"]["torch"]
    # The worker got tcmalloc from `bentoml serve`'s process when the system has it (scripts/install.sh
    # installs it), glibc's malloc otherwise (textgen/model/allocator.py).
    assert info["allocator"] == ("tcmalloc" if ctypes.util.find_library("tcmalloc_minimal") else "system")


def test_requests_are_counted_by_route_and_status(tiny_server: Server) -> None:
    def count(status: int) -> float:
        text = httpx.get(f"{tiny_server.url}/metrics").text
        labels = ('endpoint="/generate"', f'http_response_code="{status}"')
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("bentoml_service_request_total{") and all(label in line for label in labels)
        )

    before_ok, before_bad = count(200), count(415)
    assert_recovers(tiny_server)
    httpx.post(f"{tiny_server.url}/generate", content=b"x", headers={"Content-Type": "text/plain"})
    assert count(200) == before_ok + 1 and count(415) == before_bad + 1
    assert metric(tiny_server, 'textgen_rejected_requests_total{reason="unsupported_media_type"}') >= 1
    text = httpx.get(f"{tiny_server.url}/metrics").text
    for name in ("bentoml_service_request_in_progress", "textgen_inter_token_latency_seconds_bucket"):
        assert name in text


def test_cors_is_off_by_default(tiny_server: Server) -> None:
    origin = {"Origin": "http://elsewhere.example"}
    response = httpx.post(f"{tiny_server.url}/generate", json=NORMAL, headers=origin, timeout=60)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


# -- a server with small limits: overload, timeout, body size, CORS ---------------------------------


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Server]:
    model = build_tiny_gpt2(tmp_path_factory.mktemp("models") / "long-tiny", n_positions=LONG_CONTEXT)
    env = {
        "MODEL_NAME": str(model),
        "TEXTGEN_CACHE_DIR": str(cache_dir),
        "TEXTGEN_THREADS": "1",
        "TEXTGEN_TIMEOUT": "1",
        # Its 1 s requests measure the timeout, not the first seconds after ready, when a bfloat16 server
        # compiles its one-stream step in the background (textgen/model/compiled.py): 1 s requests timed out.
        "TEXTGEN_COMPILE": "off",
        "TEXTGEN_MAX_NEW_TOKENS": str(LONG_CONTEXT - 100),
        "TEXTGEN_MAX_BATCH_SIZE": "2",
        "TEXTGEN_MAX_QUEUE": "2",
        "TEXTGEN_MAX_BODY_BYTES": "4096",
        "TEXTGEN_CORS_ORIGINS": "http://ui.example",
    }
    with start_server(env) as server:
        yield server


@pytest.fixture(scope="module")
def small_queue_server(tiny_model_dir: Path, cache_dir: Path) -> Iterator[Server]:
    """Room for 2 running and 2 waiting requests, and no tight timeout: how long the accepted requests take
    depends on the CPU (on a slow one, 200 tokens twice over outlast a 1 s timeout), their outcome must not.
    """
    env = {
        "MODEL_NAME": str(tiny_model_dir),
        "TEXTGEN_CACHE_DIR": str(cache_dir),
        "TEXTGEN_THREADS": "1",
        "TEXTGEN_DTYPE": "float32",
        "TEXTGEN_MAX_BATCH_SIZE": "2",
        "TEXTGEN_MAX_QUEUE": "2",
    }
    with start_server(env) as server:
        yield server


def test_overload_is_refused_quickly_with_429_and_accepted_requests_complete(
    small_queue_server: Server,
) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small_queue_server.url, timeout=600) as client:
            body = {"prompt": "What is AI?", "max_new_tokens": 200, "ignore_eos": True}
            return await asyncio.gather(*(client.post("/generate", json=body) for _ in range(12)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(accepted) >= 4 and refused, statuses  # 2 running + 2 queued at least; the rest refused
    for r in refused:
        assert r.headers["retry-after"] == "1"
        assert "TEXTGEN_MAX_QUEUE" in r.json()["error"]
    for r in accepted:
        assert r.json()["usage"]["completion_tokens"] == 200
    assert metric(small_queue_server, 'textgen_rejected_requests_total{reason="overloaded"}') >= len(refused)
    assert_recovers(small_queue_server)


def test_a_timed_out_request_is_stopped_and_leaves_the_batch(strict_server: Server) -> None:
    cancelled = 'textgen_requests_finished_total{reason="cancelled"}'
    before = metric(strict_server, cancelled)
    body = {"prompt": "What is AI?", "max_new_tokens": LONG_CONTEXT - 200, "ignore_eos": True}
    started = time.monotonic()
    response = httpx.post(f"{strict_server.url}/generate", json=body, timeout=60)
    assert response.status_code == 504, response.text
    assert "TEXTGEN_TIMEOUT" in response.json()["error"]
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 2  # the in-flight gauge is back within 2 s
    while metric(strict_server, "textgen_running_sequences") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(strict_server, "textgen_running_sequences") == 0
    assert metric(strict_server, cancelled) == before + 1
    assert metric(strict_server, 'textgen_rejected_requests_total{reason="timeout"}') >= 1
    assert_recovers(strict_server)


def test_the_body_limit_is_configurable(strict_server: Server) -> None:
    response = httpx.post(f"{strict_server.url}/generate", json={"prompt": "z" * 5000})
    body = assert_error_shape(response, 413, ["body"])
    assert "4096 bytes" in body["error"]
    assert_recovers(strict_server)


def test_cors_allows_only_the_configured_origins(strict_server: Server) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    allowed = httpx.options(
        f"{strict_server.url}/generate", headers={"Origin": "http://ui.example", **preflight}
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://ui.example"
    other = httpx.options(
        f"{strict_server.url}/generate", headers={"Origin": "http://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers
    simple = httpx.post(
        f"{strict_server.url}/generate", json=NORMAL, headers={"Origin": "http://ui.example"}, timeout=60
    )
    assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == "http://ui.example"
