"""End to end with a real pretrained model: SmolLM2-135M-Instruct, the offline default."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.real_model


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


def test_default_parameters_answer_the_readme_question(default_server):
    """The first answer a newcomer gets: template auto (the model's chat template), sampled, all defaults."""

    def ask(_: int) -> str:
        response = httpx.post(
            f"{default_server.url}/generate", json={"prompt": "What is the capital of France?"}, timeout=300
        )
        assert response.status_code == 200, response.text
        return response.json()["generated_text"]

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(ask, range(10)))
    assert sum("Paris" in a for a in answers) >= 9, answers


def test_start_up_lines_say_what_the_server_chose(default_server):
    log = default_server.log()
    assert "model SmolLM2-135M-Instruct from the GGUF file" in log
    assert "dtype " in log and "(TEXTGEN_DTYPE=auto)" in log
    assert "torch threads; context 8192 tokens" in log
    info = httpx.get(f"{default_server.url}/info", timeout=10).json()
    assert info["dtype"] in ("float32", "bfloat16", "int8") and info["dtype_reason"]
    assert info["cpu"]["isa_class"] and info["cpu"]["cores"] >= 1
