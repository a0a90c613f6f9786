"""BentoML's own clients call textgen the BentoML way: keyword arguments, against a live `bentoml serve`;
and BentoML reads a request body through textgen's input spec without building its schema."""

from __future__ import annotations

import asyncio
import json

import bentoml
import httpx
import pytest

CALL = dict(prompt="What is AI?", max_new_tokens=6, temperature=0, ignore_eos=True, postprocess=False)


def test_sync_client_generates_with_keyword_arguments(tiny_server):
    with bentoml.SyncHTTPClient(tiny_server.url, timeout=60) as client:
        answer = client.generate(**CALL)
    assert answer["model"] == "tiny-gpt2" and answer["usage"]["completion_tokens"] == 6
    # The same flat body as curl's: the client's answer is the plain HTTP answer.
    plain = httpx.post(f"{tiny_server.url}/generate", json=CALL, timeout=60).json()
    assert answer["generated_text"] == plain["generated_text"]


def test_async_client_generates_with_keyword_arguments(tiny_server):
    async def call() -> list[dict]:
        async with bentoml.AsyncHTTPClient(tiny_server.url, timeout=60) as client:
            return await asyncio.gather(*(client.generate(**CALL) for _ in range(3)))

    answers = asyncio.run(call())
    assert len({a["generated_text"] for a in answers}) == 1  # greedy: batched or not, the same text


def test_stream_yields_the_events_with_keyword_arguments(tiny_server):
    with bentoml.SyncHTTPClient(tiny_server.url, timeout=60) as client:
        chunks = list(client.generate_stream(**CALL))
        whole = client.generate(**CALL)
    text = "".join(chunks)
    assert text.count("data: ") >= 2 and '"finish_reason": "length"' in text
    assert whole["generated_text"] in "".join(
        json.loads(line.removeprefix("data: "))["text"]
        for line in text.split("\n")
        if line.startswith("data: ")
    )


def test_client_errors_keep_the_documented_shape(tiny_server):
    with bentoml.SyncHTTPClient(tiny_server.url, timeout=60) as client:
        with pytest.raises(bentoml.exceptions.BentoMLException) as exc:
            client.generate(prompt="x", top_p=0)
    assert "top_p" in str(exc.value) and "(0, 1]" in str(exc.value)


def test_reading_a_body_does_not_build_the_schema(monkeypatch):
    """BentoML's model_validate_json asks the input spec's schema of every request; built anew, that cost
    3.4 ms of the event loop per request. The body comes through as the batchable API's one-item list."""
    from textgen.api.bentoml_io import json_body
    from textgen.frontend.generate_protocol import GenerateRequest

    body = json_body(GenerateRequest, "The body.")
    built = []
    monkeypatch.setattr(
        GenerateRequest, "model_json_schema", classmethod(lambda cls, *a, **k: built.append(1))
    )
    for raw in (b'{"prompt": "What is AI?", "max_new_tokens": 5}', '"a bare string"', b"[1, 2]"):
        assert body.model_validate_json(raw).root == [json.loads(raw)]
    assert built == []
