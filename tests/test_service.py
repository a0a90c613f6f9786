"""End to end against a real `bentoml serve` of the tiny GPT-2, as a client sees it."""

from __future__ import annotations

import json
import time
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server import ROOT, free_port, server_command

GREEDY = {"temperature": 0, "ignore_eos": True, "postprocess": False}


def generate(server, **body) -> dict:
    response = httpx.post(f"{server.url}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_old_service_body_works_unchanged(tiny_server):
    response = httpx.post(
        f"{tiny_server.url}/generate", json={"prompt": "What is AI?", "max_new_tokens": 50}, timeout=60
    )
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["generated_text"], str)
    assert body["model"] == "tiny-gpt2"
    assert body["finish_reason"] in ("length", "eos", "stop")
    assert 1 <= body["usage"]["completion_tokens"] <= 50
    assert body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["total_tokens"] == 4 + body["usage"]["completion_tokens"]
    assert set(body["timings"]) == {"queue_ms", "first_token_ms", "total_ms", "tokens_per_second"}


def test_every_parameter_is_honoured(tiny_server):
    full = dict(
        prompt="Question: what is the weather like today?",
        max_new_tokens=12,
        temperature=0.9,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.1,
        no_repeat_ngram_size=3,
        do_sample=True,
        seed=42,
        stop=["zzzz"],
        ignore_eos=True,
        template="assistant",
        postprocess=False,
    )
    first, again = generate(tiny_server, **full), generate(tiny_server, **full)
    assert first["generated_text"] == again["generated_text"] and first["seed"] == 42  # seed
    assert first["usage"]["completion_tokens"] == 12 and first["finish_reason"] == "length"  # max_new_tokens
    assert first["usage"]["prompt_tokens"] > 20  # the assistant template framed the prompt
    other = generate(tiny_server, **{**full, "seed": 43})
    assert other["generated_text"] != first["generated_text"]
    unseeded = generate(tiny_server, **{**full, "seed": None})
    assert unseeded["seed"] != 42  # a fresh seed is drawn and reported

    # Greedy ignores the seed; do_sample=False is greedy whatever the temperature.
    greedy = generate(tiny_server, prompt="What is AI?", max_new_tokens=20, **GREEDY)
    assert (
        generate(
            tiny_server,
            prompt="What is AI?",
            max_new_tokens=20,
            ignore_eos=True,
            postprocess=False,
            do_sample=False,
            temperature=1.5,
        )["generated_text"]
        == greedy["generated_text"]
    )
    # Penalties change greedy output on a model this repetitive.
    plain = generate(
        tiny_server,
        prompt="What is AI?",
        max_new_tokens=20,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        **GREEDY,
    )
    assert plain["generated_text"] != greedy["generated_text"]

    # stop: cut before the first occurrence, reported as finish_reason "stop".
    text = greedy["generated_text"]
    stop = text[6:9]
    stopped = generate(tiny_server, prompt="What is AI?", max_new_tokens=20, stop=[stop], **GREEDY)
    assert stopped["finish_reason"] == "stop"
    assert stopped["generated_text"] == text[: text.index(stop)]

    # Post-processing switches: word cap on by default at the request's max_words.
    capped = generate(
        tiny_server,
        prompt="What is AI?",
        max_new_tokens=40,
        temperature=0,
        ignore_eos=True,
        max_words=2,
        drop_repeated_lines=False,
        strip_prompt=False,
    )
    assert len(capped["generated_text"].split()) <= 2
    top_k_1 = generate(
        tiny_server,
        prompt="What is AI?",
        max_new_tokens=20,
        top_k=1,
        seed=1,
        ignore_eos=True,
        postprocess=False,
    )
    assert top_k_1["generated_text"] == greedy["generated_text"]  # top_k honoured: k=1 is greedy


def test_concurrent_requests_share_a_batch_and_each_gets_its_own_parameters(tiny_server):
    bodies = [
        dict(
            prompt=f"Request {i}: what is AI?",
            max_new_tokens=60 + 5 * i,
            seed=100 + i,
            temperature=0.5 + 0.1 * i,
            top_k=i * 3,
            ignore_eos=True,
            postprocess=False,
        )
        for i in range(8)
    ]
    alone = [generate(tiny_server, **b) for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: generate(tiny_server, **b), bodies))
    assert max(r["batch_size"] for r in together) > 1  # they shared forward passes
    for body, solo, batched in zip(bodies, alone, together):
        assert batched["usage"]["completion_tokens"] == body["max_new_tokens"]
        assert batched["seed"] == body["seed"]
        assert batched["generated_text"] == solo["generated_text"]


BAD_BODIES = [
    ({"prompt": ""}, "prompt", "non-whitespace"),
    ({"prompt": "   \n"}, "prompt", "non-whitespace"),
    ({"prompt": "x", "temperature": -1}, "temperature", "[0, 5]"),
    ({"prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "x", "top_k": "many"}, "top_k", "[0, 100000]"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens", "[1, 4096]"),
    ({"prompt": "x", "max_new_tokens": 2000}, "max_new_tokens", "[1, 1024]"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "(0, 10]"),
    ({"prompt": "x", "template": "poem"}, "template", "'few_shot' or 'chat'"),
    ({"prompt": "x", "template": "chat"}, "template", "no chat template"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop", "at most 16"),
    ({"prompt": "x", "temprature": 0.5}, "temprature", "Extra inputs are not permitted"),
    ({"prompt": 42}, "prompt", "valid string"),
    ({"prompt": "x", "speculative": "yes"}, "speculative", "valid boolean"),
    ({"max_new_tokens": 5}, "prompt", "Field required"),
]


@pytest.mark.parametrize("body,field,fragment", BAD_BODIES)
def test_invalid_input_is_a_4xx_naming_the_field_and_range(tiny_server, body, field, fragment):
    response = httpx.post(f"{tiny_server.url}/generate", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()
    fields = [d["loc"][0] for d in error["detail"] if d["loc"]]
    assert field in fields
    assert fragment in error["error"]


@pytest.mark.parametrize(
    "raw",
    [b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}', b"[1, 2]", b'"text"'],
)
def test_non_finite_numbers_and_non_objects_are_rejected(tiny_server, raw):
    response = httpx.post(
        f"{tiny_server.url}/generate", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400, response.text


def test_prompt_plus_max_new_tokens_beyond_context_gives_both_numbers(tiny_server):
    prompt = "The quick brown fox jumps over the lazy dog. " * 12
    response = httpx.post(
        f"{tiny_server.url}/generate", json={"prompt": prompt, "max_new_tokens": 200}, timeout=30
    )
    assert response.status_code == 400
    message = response.json()["error"]
    assert "max_new_tokens is 200" in message and "context of 256" in message
    tokens = int(message.split("the prompt is ")[1].split(" tokens")[0])
    assert f"at most {256 - tokens}" in message
    # ...and the server still answers.
    assert generate(tiny_server, prompt="What is AI?", max_new_tokens=5)["usage"]["completion_tokens"] <= 5


def test_stream_deltas_add_up_to_the_non_streamed_text(tiny_server):
    body = dict(prompt="Café 東京 🙂 What is AI?", max_new_tokens=40, **GREEDY)
    expected = generate(tiny_server, **body)
    events = []
    with httpx.stream("POST", f"{tiny_server.url}/generate_stream", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    assert "".join(e["text"] for e in events) == expected["generated_text"]
    final = events[-1]
    assert final["finish_reason"] == "length" and final["usage"] == expected["usage"]
    assert all("finish_reason" not in e for e in events[:-1])


def test_stream_rejects_invalid_input_as_json(tiny_server):
    response = httpx.post(f"{tiny_server.url}/generate_stream", json={"prompt": "x", "top_p": 2}, timeout=30)
    assert response.status_code == 400
    assert response.json()["detail"][0]["loc"] == ["top_p"]


def test_swagger_ui_and_openapi_are_served_and_docs_redirects(tiny_server):
    docs = httpx.get(f"{tiny_server.url}/docs", follow_redirects=True, timeout=10)
    assert docs.status_code == 200 and docs.url.path == "/"
    assert "swagger" in docs.text.lower()
    spec = httpx.get(f"{tiny_server.url}/docs.json", timeout=10).json()
    schema = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["template"]["enum"] == ["auto", "none", "assistant", "few_shot", "chat"]
    assert schema["properties"]["temperature"]["maximum"] == 5.0
    assert schema["properties"]["max_new_tokens"]["maximum"] == 1024  # this server's TEXTGEN_MAX_NEW_TOKENS
    speculative = schema["properties"]["speculative"]
    assert speculative["type"] == "boolean" and speculative["nullable"] and speculative["default"] is None
    assert "Speculative decoding" in speculative["description"]
    assert "/generate_stream" in spec["paths"]


def test_unloadable_model_name_exits_non_zero_before_serving(tmp_path):
    port = free_port()
    env = {"MODEL_NAME": str(tmp_path / "missing.gguf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        server_command(port), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert f"Could not load MODEL_NAME='{tmp_path / 'missing.gguf'}'" in result.stderr + result.stdout


def test_a_model_the_worker_cannot_load_stops_the_server_with_exit_1(tmp_path):
    """The config.json is only read before the worker starts; what it names is found unloadable by the
    worker (an architecture transformers does not know), and `bentoml serve` still exits non-zero."""
    model = tmp_path / "unknown-architecture"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    env = {
        "MODEL_NAME": str(model),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "BENTOML_HOME": str(tmp_path),
    }
    result = subprocess.run(
        server_command(free_port()), cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "its worker could not start: Could not load MODEL_NAME=" in result.stderr
    assert "no-such-architecture" in result.stderr


def metric(server, name: str) -> float:
    """Sum of a metric's samples on /metrics (labels included in `name` must match exactly)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return sum(values)


def test_speculative_is_chosen_per_request(tiny_server):
    """The tiny server runs the default TEXTGEN_SPECULATIVE=ngram, which speculates greedy requests that do not
    choose; `speculative: false` keeps one out, and either way the text is the same."""
    drafted = lambda: metric(tiny_server, "textgen_spec_draft_tokens_total")  # noqa: E731
    # A prompt that repeats itself and no penalties: prompt lookup finds drafts on the tiny model.
    body = dict(
        prompt="The quick brown fox jumps over the lazy dog. " * 4,
        template="none",
        max_new_tokens=30,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        **GREEDY,
    )
    before = drafted()
    off = generate(tiny_server, **body, speculative=False)
    assert drafted() == before
    default = generate(tiny_server, **body)
    after_default = drafted()
    assert after_default > before
    on = generate(tiny_server, **body, speculative=True)
    assert drafted() > after_default
    assert on["generated_text"] == default["generated_text"] == off["generated_text"]


def test_engine_metrics_are_exported(tiny_server):
    before = metric(tiny_server, "textgen_generated_tokens_total")
    generate(tiny_server, prompt="What is AI?", max_new_tokens=7, **GREEDY)
    text = httpx.get(f"{tiny_server.url}/metrics", timeout=10).text
    for name in (
        "textgen_running_sequences",
        "textgen_waiting_requests",
        "textgen_batch_size",
        "textgen_time_to_first_token_seconds_bucket",
        "textgen_step_seconds_bucket",
    ):
        assert name in text
    assert metric(tiny_server, "textgen_generated_tokens_total") >= before + 7
    assert metric(tiny_server, 'textgen_requests_finished_total{reason="length"}') >= 1


def test_a_repeated_prompt_is_served_from_the_prefix_cache_with_the_same_text(tiny_server):
    """The server caches prompt prefixes by default (TEXTGEN_PREFIX_CACHE_MB): the second request of a long
    prompt takes its KV from the cache, says so on /metrics, and answers the same."""
    prompt = (
        "Question: what is the weather like today? Answer: it is sunny and warm. " * 4
        + "Question: what is AI?"
    )
    body = dict(prompt=prompt, template="none", max_new_tokens=8, **GREEDY)
    queried, hits = "textgen_prefix_cache_queried_tokens_total", "textgen_prefix_cache_hit_tokens_total"
    before = metric(tiny_server, hits)
    first = generate(tiny_server, **body)
    second = generate(tiny_server, **body)
    assert second["generated_text"] == first["generated_text"]
    assert metric(tiny_server, hits) >= before + 16 * (first["usage"]["prompt_tokens"] // 16 - 1)
    # Each answer's usage says how much of its prompt the cache served (16-token blocks, never the last).
    cached = second["usage"]["cached_prompt_tokens"]
    assert 16 * (first["usage"]["prompt_tokens"] // 16 - 1) <= cached < first["usage"]["prompt_tokens"]
    assert metric(tiny_server, queried) >= 2 * first["usage"]["prompt_tokens"]
    assert metric(tiny_server, "textgen_prefix_cache_bytes") > 0


def test_a_disconnected_stream_leaves_the_batch(tiny_server):
    cancelled = 'textgen_requests_finished_total{reason="cancelled"}'
    before = metric(tiny_server, cancelled)
    body = dict(prompt="What is AI?", max_new_tokens=240, **GREEDY)
    with httpx.stream("POST", f"{tiny_server.url}/generate_stream", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # The client is gone after one event: its sequence must leave at the next step, not run 240 tokens.
    deadline = time.monotonic() + 2
    while metric(tiny_server, cancelled) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(tiny_server, cancelled) == before + 1
    assert metric(tiny_server, "textgen_running_sequences") == 0


def test_a_client_that_gives_up_on_generate_frees_its_slot(tiny_server):
    cancelled = 'textgen_requests_finished_total{reason="cancelled"}'
    before = metric(tiny_server, cancelled)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{tiny_server.url}/generate",
            json=dict(prompt="What is AI?", max_new_tokens=250, **GREEDY),
            timeout=httpx.Timeout(5, read=0.05),
        )
    deadline = time.monotonic() + 2
    while metric(tiny_server, cancelled) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(tiny_server, cancelled) == before + 1
    assert generate(tiny_server, prompt="What is AI?", max_new_tokens=3)["usage"]["completion_tokens"] <= 3
