"""Structured output: grammars as per-row token masks in the batched engine, and the fields that ask for them.

The tiny random model would never write JSON by itself, so whatever parses below parses because of the masks.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from textgen.engine.grammar import enforced_schema
from textgen.engine.params import Constraint, ParamError, SamplingParams
from textgen.frontend.generate_protocol import GenerateRequest
from textgen.frontend.openai_protocol import ChatCompletionRequest

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "member"],
    "additionalProperties": False,
}
PROMPT = "Question: what is the weather like today? Answer:"


def schema_constraint(schema: dict) -> Constraint:
    return Constraint("json_schema", json.dumps(schema))


def test_sampled_outputs_all_parse_and_validate_while_sharing_steps(engine, encode):
    params = [
        SamplingParams(
            max_new_tokens=120, temperature=1.0, top_p=1.0, seed=s, constraint=schema_constraint(SCHEMA)
        )
        for s in range(20)
    ]
    handles = [engine.submit(encode(PROMPT), p) for p in params]
    results = [h.wait(60) for h in handles]
    for result in results:
        assert result.finish_reason == "eos", result  # the grammar ended it, not the token budget
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert len({r.text for r in results}) > 10  # sampled: the masks constrain, they do not decide
    assert max(h.sequence.max_batch_size for h in handles) > 1  # they were batched together


def test_an_object_has_only_the_properties_its_schema_lists(engine, encode):
    # JSON Schema allows other properties unless additionalProperties says no; the grammar does not, as
    # vLLM's and llama.cpp's do not: SmolLM2 went on adding properties until its budget ran out (grammar.py)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}}
    constraint = schema_constraint(schema)
    params = [
        SamplingParams(max_new_tokens=60, temperature=1.0, top_p=1.0, seed=s, constraint=constraint)
        for s in range(12)
    ]
    results = [h.wait(60) for h in [engine.submit(encode(PROMPT), p) for p in params]]
    assert all(r.finish_reason == "eos" and set(json.loads(r.text)) <= {"a", "b"} for r in results), results
    closed = json.loads(enforced_schema({"properties": {"o": {"properties": {}}}, "$defs": {"d": SCHEMA}}))
    assert closed["additionalProperties"] is closed["properties"]["o"]["additionalProperties"] is False
    assert closed["$defs"]["d"] == SCHEMA
    # What a schema says of other properties stands, and the parts of one object stay open
    for kept in (
        {"properties": {"x": {}}, "additionalProperties": {"type": "string"}},
        {"properties": {"x": {}}, "patternProperties": {"^y": {}}},
        {"allOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]},
        {"properties": {"x": {}}, "anyOf": [{"properties": {"y": {}}}, {"required": ["x"]}]},
    ):
        assert json.loads(enforced_schema(kept)) == kept
    assert json.loads(enforced_schema({"anyOf": [{"properties": {}}]})) == {
        "anyOf": [{"properties": {}, "additionalProperties": False}]  # alternatives close one by one
    }


def test_an_integer_without_bounds_is_one_of_jsons_safe_integers():
    # At most 16 digits, as llama.cpp's grammars allow: SmolLM2 wrote "population": 1111... until its budget
    # ran out (grammar.py). Bounds a schema gives stand.
    safe = 2**53 - 1
    assert json.loads(enforced_schema({"type": "integer"})) == {
        "type": "integer",
        "minimum": -safe,
        "maximum": safe,
    }
    assert (
        json.loads(enforced_schema({"type": ["integer", "null"], "exclusiveMinimum": 0}))["maximum"] == safe
    )
    for kept in ({"type": "integer", "minimum": 0, "maximum": 9}, {"type": "integer", "enum": [2**60]}):
        assert json.loads(enforced_schema(kept)) == kept


def test_free_rows_are_untouched_by_their_constrained_neighbours(engine, encode):
    free = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    alone = engine.submit(encode(PROMPT), free).wait(30)
    constrained = SamplingParams(
        max_new_tokens=60, temperature=0.9, seed=3, constraint=schema_constraint(SCHEMA)
    )
    handles = [engine.submit(encode(PROMPT), constrained), engine.submit(encode(PROMPT), free)]
    together = [h.wait(30) for h in handles]
    assert handles[1].sequence.max_batch_size == 2
    assert together[1].text == alone.text  # float32, greedy: the same text batched or alone
    json.loads(together[0].text)


def test_regex_and_choice_hold(engine, encode):
    pattern = r"[A-Z][a-z]{2,6} (is|was) [0-9]{1,3}"
    choices = ["sunny and warm", "cold", "raining"]
    for seed in range(5):
        regex = SamplingParams(
            max_new_tokens=40, seed=seed, temperature=1.0, constraint=Constraint("regex", pattern)
        )
        text = engine.submit(encode(PROMPT), regex).wait(30).text
        assert re.fullmatch(pattern, text), text
        choice = SamplingParams(
            max_new_tokens=40,
            seed=seed,
            temperature=1.0,
            constraint=Constraint("choice", json.dumps(choices)),
        )
        assert engine.submit(encode(PROMPT), choice).wait(30).text in choices


def test_the_grammar_wins_over_bans_that_leave_no_token(engine, encode):
    # no_repeat_ngram_size=1 bans every token already present: a JSON object repeats `"` at once, so the bans
    # alone would leave some steps nothing the grammar allows.
    schema = {
        "type": "object",
        "properties": {"a": {"enum": ["x"]}, "b": {"enum": ["x"]}},
        "required": ["a", "b"],
    }
    params = SamplingParams(
        max_new_tokens=60,
        temperature=0,
        no_repeat_ngram_size=1,
        repetition_penalty=1.5,
        constraint=schema_constraint(schema),
    )
    result = engine.submit(encode(PROMPT), params).wait(30)
    assert json.loads(result.text) == {"a": "x", "b": "x"}


def test_a_cut_short_output_says_length(engine, encode):
    params = SamplingParams(max_new_tokens=3, temperature=0, constraint=schema_constraint(SCHEMA))
    assert engine.submit(encode(PROMPT), params).wait(30).finish_reason == "length"


def test_every_dialect_becomes_one_constraint():
    base = {"prompt": "hi"}
    expectations = {
        "response_format": ({"type": "json_object"}, Constraint("json_object", "", "response_format")),
        "guided_regex": ("a+", Constraint("regex", "a+", "guided_regex")),
        "guided_choice": (["a", "b"], Constraint("choice", '["a", "b"]', "guided_choice")),
        "structured_outputs": (
            {"json": {"type": "integer"}},
            Constraint("json_schema", '{"type": "integer"}', "structured_outputs.json"),
        ),
    }
    for field, (value, expected) in expectations.items():
        assert (
            GenerateRequest.model_validate(base | {field: value}).to_sampling_params().constraint == expected
        )
    chat = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": SCHEMA, "strict": True},
            },
        }
    )
    assert chat.constraint() == Constraint("json_schema", json.dumps(SCHEMA), "response_format")
    assert GenerateRequest.model_validate(base | {"response_format": {"type": "text"}}).constraint() is None
    with pytest.raises(ParamError, match="one structured-output constraint"):
        GenerateRequest.model_validate(base | {"guided_regex": "a", "guided_choice": ["b"]}).constraint()
    with pytest.raises(ParamError, match='needs "json_schema"'):
        GenerateRequest.model_validate(base | {"response_format": {"type": "json_schema"}}).constraint()


def test_http_routes_constrain_and_refuse_what_does_not_compile(tiny_server):
    url = tiny_server.url
    chat = {
        "messages": [{"role": "user", "content": "Describe a person."}],
        "max_tokens": 120,
        "seed": 1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    }
    answer = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), SCHEMA)
    # /generate keeps its post-processing for free text only: it would cut or clean what must parse.
    body = {"prompt": "Pick one.", "guided_choice": ["alpha beta", "gamma"], "max_words": 1, "stream": False}
    body.pop("stream")
    generated = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    assert generated["generated_text"] in ("alpha beta", "gamma"), generated
    completion = {"prompt": "Phone:", "max_tokens": 20, "structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}}
    text = httpx.post(f"{url}/v1/completions", json=completion, timeout=60).json()["choices"][0]["text"]
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", text), text

    bad = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "guided_regex": "[a-"}, timeout=30)
    assert (
        bad.status_code == 400 and "guided_regex" in bad.text and "regular expression" in bad.text
    ), bad.text
    bad = httpx.post(
        f"{url}/generate",
        json={
            "prompt": "x",
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}},
        },
        timeout=30,
    )
    assert bad.status_code == 400 and "response_format" in bad.text and "objectx" in bad.text, bad.text


def test_openai_sdk_sends_response_format_and_vllm_extras(tiny_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="tiny-gpt2",
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=120,
        seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    # A schema with bounded fields: json_object allows strings of any length, which a random model may
    # still be writing when max_tokens runs out (finish_reason "length").
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    reply = client.completions.create(
        model="tiny-gpt2", prompt="Colour:", max_tokens=10, extra_body={"guided_choice": ["red", "green"]}
    )
    assert reply.choices[0].text in ("red", "green")


def test_the_vocabulary_is_indexed_off_the_event_loop_before_the_first_body_that_may_ask(
    loaded_tiny, monkeypatch
):
    """Not at start-up: a server that never constrains its output never holds llguidance's index of the
    vocabulary (38 MB for GPT-2). Before the first body with a structured-output field is prepared (on the
    event loop), it is built once, in a worker thread: the loop answers the others meanwhile."""
    import asyncio
    import threading

    from textgen.config import Settings
    from textgen.engine import grammar
    from textgen.frontend.prepare import Frontend

    builders = []
    build = grammar.llguidance.hf.from_tokenizer

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        builders.append(threading.current_thread())
        return build(*args, **kwargs)

    monkeypatch.setattr(grammar.llguidance.hf, "from_tokenizer", recording)
    frontend = Frontend(loaded_tiny, Settings(speculative="off", compile="off"))
    try:
        frontend.warmup()
        assert not frontend.engine.grammars.indexed and not builders
        asyncio.run(frontend.index_vocabulary_for([{"prompt": "Hi", "max_new_tokens": 4}]))  # free text
        chat = {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}
        asyncio.run(frontend.index_vocabulary_for([chat, chat | {"tool_choice": "auto"}]))  # calls unforced
        assert not builders
        asyncio.run(
            frontend.index_vocabulary_for([{"prompt": "Hi"}, {"prompt": "Hi", "guided_choice": ["a"]}])
        )
        assert frontend.engine.grammars.indexed and builders[0] is not threading.current_thread()
        asyncio.run(frontend.index_vocabulary_for([{"response_format": {"type": "json_object"}}]))
        asyncio.run(frontend.index_vocabulary_for([chat | {"tool_choice": "required"}]))
        assert len(builders) == 1  # once
        params = SamplingParams(max_new_tokens=8, constraint=Constraint("choice", json.dumps(["yes", "no"])))
        (prepared,) = frontend.prepare([frontend_request(params)])
        assert frontend.submit(prepared)[0].wait(30).text in ("yes", "no")
    finally:
        frontend.close()


def frontend_request(params: SamplingParams):  # type: ignore[no-untyped-def]
    from textgen.frontend.prepare import PromptRequest
    from textgen.frontend.templates import RenderedPrompt

    return PromptRequest([RenderedPrompt(PROMPT, user_text=PROMPT)], params)
