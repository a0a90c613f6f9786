"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens), driven by the official `anthropic`
SDK against a live server: the same conversation as a chat completion gives the same answer, streamed as the
SDK's named events; tools, a prefill, stop sequences, structured output, errors in Anthropic's shape."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

from tests.test_responses import CITY
from tests.test_tools import MODEL, SCHEMAS, TIME, WEATHER
from textgen.engine.params import ParamError
from textgen.frontend.messages_protocol import MessagesRequest

GREEDY = {"temperature": 0}  # the SDK has no sampling arguments any more: they go in the body as extras
TOOLS = [
    {"name": "get_weather", "description": "The weather.", "input_schema": WEATHER},
    {"name": "get_time", "input_schema": TIME},
]


@pytest.fixture(scope="module")
def client(long_context_server):
    with anthropic.Anthropic(base_url=long_context_server.url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def openai_client(long_context_server):
    with long_context_server.openai() as c:
        yield c


def test_the_same_conversation_gets_the_same_answer_as_chat(client, openai_client):
    m = client.messages.create(
        model=MODEL,
        system="Be brief.",
        messages=[{"role": "user", "content": "What is AI?"}],
        max_tokens=6,
        extra_body=GREEDY,
        metadata={"user_id": "u1"},  # accepted, as Anthropic's clients send it
    )
    chat = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is AI?"}],
        max_tokens=6,
        temperature=0,
    )
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == MODEL
    (block,) = m.content
    assert block.type == "text" and block.text == chat.choices[0].message.content
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None
    assert m.usage.input_tokens == chat.usage.prompt_tokens and m.usage.output_tokens == 6
    # Text blocks, system blocks and an earlier assistant turn are the same messages.
    blocks = client.messages.create(
        model=MODEL,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "user", "content": "What is AI?"},
        ],
        max_tokens=6,
        extra_body=GREEDY,
    )
    chat = openai_client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "What is AI?"},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert blocks.content[0].text == chat.choices[0].message.content
    # count_tokens counts the prompt /v1/messages submitted.
    count = client.messages.count_tokens(
        model=MODEL, system="Be brief.", messages=[{"role": "user", "content": "What is AI?"}]
    )
    assert count.input_tokens == m.usage.input_tokens


def test_stream_events_build_the_final_message(client, long_context_server):
    body = dict(model=MODEL, messages=[{"role": "user", "content": "The quick brown fox"}], max_tokens=12)
    kwargs = dict(body, extra_body=GREEDY)
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12

    # The same prompt, counted as Anthropic does: the second may read some of it from the prefix cache
    # (cache_read_input_tokens), which input_tokens then leaves out.
    def prompt_tokens(usage) -> int:  # type: ignore[no-untyped-def]
        return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens

    assert prompt_tokens(final.usage) == prompt_tokens(whole.usage)
    # On the wire: every event named as its data's type, in Anthropic's order.
    with httpx.stream(
        "POST", f"{long_context_server.url}/v1/messages", json={**body, **GREEDY, "stream": True}, timeout=60
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    data = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert names == [d["type"] for d in data]
    assert names[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert data[0]["message"]["content"] == [] and data[0]["message"]["stop_reason"] is None


def test_stop_sequences_end_the_answer_and_are_named(client):
    kwargs = dict(
        model=MODEL, messages=[{"role": "user", "content": "Count"}], max_tokens=16, extra_body=GREEDY
    )
    text = client.messages.create(**kwargs).content[0].text
    # Three characters from the middle on, not blank (whatever text this CPU's numerics give).
    stop = next(text[i : i + 3] for i in range(len(text) // 2, len(text) - 2) if text[i : i + 3].strip())
    m = client.messages.create(**kwargs, stop_sequences=["never written here", stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == text[: text.index(stop)]
    with client.messages.stream(**kwargs, stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop
    assert final.content[0].text == m.content[0].text
    # The transcript's own stop ("\nUser:", for a model without a chat template) is the end of a turn.
    assert client.messages.create(**{**kwargs, "max_tokens": 100}).stop_reason in ("end_turn", "max_tokens")


def test_a_prefill_is_continued(client, openai_client):
    """A conversation that ends with the assistant's words: the answer goes on from them (the tiny model has
    no chat template, so the prompt is textgen's transcript, which /v1/completions can be given as text)."""
    m = client.messages.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Finish the sentence."},
            {"role": "assistant", "content": "The quick brown"},
        ],
        max_tokens=8,
        extra_body=GREEDY,
    )
    completion = openai_client.completions.create(
        model=MODEL,
        prompt="User: Finish the sentence.\nAssistant: The quick brown",
        max_tokens=8,
        temperature=0,
    )
    assert m.content[0].text == completion.choices[0].text
    assert m.usage.input_tokens == completion.usage.prompt_tokens


def check_calls(content, n=None):
    calls = [b for b in content if b.type == "tool_use"]
    assert calls and (n is None or len(calls) == n), content
    for call in calls:
        assert call.id.startswith("toolu_")
        jsonschema.validate(call.input, SCHEMAS[call.name])
    return calls


def test_tools_are_called_and_their_results_taken_back(client):
    ask = [{"role": "user", "content": "What is the weather like in Paris?"}]
    m = client.messages.create(
        model=MODEL,
        messages=ask,
        tools=TOOLS,
        tool_choice={"type": "any"},
        max_tokens=200,
        extra_body={"temperature": 0.8},
    )
    # Calls may go on until the budget ends (parallel calls allowed): whole calls stand, a cut one is dropped.
    assert m.stop_reason in ("tool_use", "max_tokens")
    calls = check_calls(m.content)
    one = client.messages.create(
        model=MODEL,
        messages=ask,
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        max_tokens=200,
        extra_body={"temperature": 0.8, "top_k": 50},
    )
    assert one.stop_reason == "tool_use" and check_calls(one.content, n=1)
    forced = dict(
        model=MODEL,
        messages=ask,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_time"},
        max_tokens=100,
        extra_body=GREEDY,
    )
    named = client.messages.create(**forced)
    assert named.stop_reason == "tool_use" and check_calls(named.content, n=1)[0].name == "get_time"
    # Streamed, a named call's input arrives as input_json_delta pieces the SDK adds up.
    with client.messages.stream(**forced) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [e.type for e in events if e.type == "content_block_start"] == ["content_block_start"]
    assert check_calls(final.content, n=1)[0].input == named.content[-1].input
    # The calls and their results sent back, as the SDK's own blocks, with an error among them.
    back = client.messages.create(
        model=MODEL,
        messages=[
            *ask,
            {"role": "assistant", "content": m.content},
            {
                "role": "user",
                "content": [
                    *(
                        {"type": "tool_result", "tool_use_id": c.id, "content": "21 C", "is_error": i > 0}
                        for i, c in enumerate(calls)
                    ),
                    {"type": "text", "text": "Thanks."},
                ],
            },
        ],
        tools=TOOLS,
        max_tokens=5,
        extra_body=GREEDY,
    )
    assert back.stop_reason == "max_tokens" and back.content[0].type == "text"


def test_output_config_constrains_the_output(client):
    schema = CITY
    m = client.messages.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A city as JSON."}],
        max_tokens=100,
        extra_body={"temperature": 0.8},
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    jsonschema.validate(json.loads(m.content[0].text), schema)


@pytest.mark.parametrize(
    "body, named",
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"temperature": 9}, "temperature"),
        ({"stop_sequences": [str(i) for i in range(17)]}, "stop_sequences"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content.0",
        ),
        ({"system": [{"type": "document", "source": {}}]}, "system.0"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
        ({"tools": [{"name": "get weather", "input_schema": WEATHER}]}, "tools.0.name"),
        (
            {"tools": [{"name": "f", "input_schema": {"type": "foo"}}], "tool_choice": {"type": "any"}},
            "tools.0.input_schema",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": 5}]}
                ]
            },
            "messages.0.content.0.content",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "a", "name": "f", "input": 3}],
                    }
                ]
            },
            "messages.0.content.0",
        ),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "tool"}}, "tool_choice"),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": {"type": "foo"}}}},
            "output_config.format",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_what_cannot_be_served_is_a_400_in_anthropics_shape(long_context_server, body, named):
    request = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}], **body}
    r = httpx.post(f"{long_context_server.url}/v1/messages", json=request, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", r.text
    assert named in error["error"]["message"], r.text


def test_the_sdk_lists_the_served_model(client, openai_client):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.type == "model" and model.created_at.year > 2000
    assert [m.id for m in openai_client.models.list().data] == [MODEL]  # OpenAI's reading of the same body


def test_errors_are_the_sdks_typed_exceptions(client):
    with pytest.raises(anthropic.NotFoundError) as exc:
        client.messages.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    assert exc.value.body["error"]["type"] == "not_found_error" and MODEL in exc.value.message
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.count_tokens(model=MODEL, messages=[{"role": "tool", "content": "x"}])
    assert exc.value.body["error"]["type"] == "invalid_request_error"


def test_blocks_become_chat_messages():
    request = MessagesRequest.model_validate(
        {
            "max_tokens": 4,
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Look it up.", "signature": "s"},
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"zone": "UTC"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "14:00"}],
                        },
                        {"type": "text", "text": "And then?"},
                    ],
                },
            ],
            "tools": TOOLS,
        }
    )
    messages = request.to_chat().messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "user"]
    assert messages[1].content == "Let me look." and messages[1].tool_calls[0].id == "toolu_1"
    assert json.loads(messages[1].tool_calls[0].function.arguments) == {"zone": "UTC"}
    assert messages[2].tool_call_id == "toolu_1" and messages[2].content == "14:00"
    assert not request.to_chat().continue_final_message
    with pytest.raises(ParamError) as exc:
        MessagesRequest.model_validate(
            {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}
        ).to_chat()
    assert exc.value.field == "messages" and "messages.0.content.0" in exc.value.message
    with pytest.raises(ParamError) as exc:
        MessagesRequest.model_validate(
            {"max_tokens": 4, "messages": [], "system": [{"text": "Be brief."}]}
        ).to_chat()
    assert exc.value.field == "system" and "system.0" in exc.value.message
