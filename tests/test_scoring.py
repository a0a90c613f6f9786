"""Log-probabilities, echo, token-id prompts and the tokenizer endpoints, against the tiny server (float32)."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "The quick brown fox jumps over the"


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)

    return tokenizer, logprobs


def post(server, path: str, body: dict) -> dict:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_echo_scores_the_prompt_and_the_generated_token_like_transformers(tiny_server, reference):
    tokenizer, logprobs = reference
    ids = tokenizer(PROMPT)["input_ids"]
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 2, "echo": True}
    choice = post(tiny_server, "/v1/completions", body)["choices"][0]
    scores = choice["logprobs"]
    assert len(scores["tokens"]) == len(ids) + 1  # every prompt token, then the generated one
    assert scores["token_logprobs"][0] is None and scores["top_logprobs"][0] is None
    generated = tokenizer(choice["text"][len(tokenizer.decode(ids)) :], add_special_tokens=False)["input_ids"]
    everything = ids + generated[:1]
    expected = logprobs(everything)
    for i in range(1, len(everything)):
        assert scores["token_logprobs"][i] == pytest.approx(expected[i - 1, everything[i]].item(), abs=1e-4)
        assert len(scores["top_logprobs"][i]) <= 2
    # greedy: the generated token is the likeliest, and it leads its own alternatives
    assert scores["token_logprobs"][-1] == pytest.approx(max(scores["top_logprobs"][-1].values()), abs=1e-6)
    assert scores["text_offset"][0] == 0 and scores["text_offset"] == sorted(scores["text_offset"])
    assert choice["text"].startswith(tokenizer.decode(ids))


def test_logprobs_are_paid_only_by_the_requests_that_ask(tiny_server):
    plain = post(tiny_server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
    assert plain["choices"][0]["logprobs"] is None


def test_chat_logprobs_have_openais_shape(tiny_server):
    body = {
        "messages": [{"role": "user", "content": "What is AI?"}],
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    content = post(tiny_server, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    assert 1 <= len(content) <= 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"], abs=1e-6)  # greedy


def test_generate_returns_logprobs_on_request(tiny_server):
    body = {"prompt": PROMPT, "max_new_tokens": 3, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    answer = post(tiny_server, "/generate", body)
    assert len(answer["logprobs"]) == 3 and all(len(t["top_logprobs"]) == 1 for t in answer["logprobs"])
    assert "logprobs" not in post(tiny_server, "/generate", {"prompt": PROMPT, "max_new_tokens": 2})


@pytest.mark.parametrize(
    "prompt, status",
    [([[1, 2, 3], [4, 5]], 200), ([], 400), ([[]], 400), ([10**9], 400), ([-1], 400)],
)
def test_token_id_prompts_are_validated_against_the_vocabulary(tiny_server, prompt, status):
    response = httpx.post(
        f"{tiny_server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60
    )
    assert response.status_code == status, response.text
    if status == 200:
        assert len(response.json()["choices"]) == len(prompt)
    else:
        assert response.json()["error"]["param"] == "prompt"


def test_tokenizer_endpoints_round_trip(tiny_server, reference):
    tokenizer, _ = reference
    info = httpx.get(f"{tiny_server.url}/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["model_max_length"] == 256
    tokens = post(tiny_server, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert tokens["tokens"] == tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 256
    assert post(tiny_server, "/detokenize", {"tokens": tokens["tokens"]})["prompt"] == PROMPT
    bad = httpx.post(f"{tiny_server.url}/detokenize", json={"tokens": [10**9]}, timeout=10)
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]
