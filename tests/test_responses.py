"""OpenAI's Responses API (POST /v1/responses), driven by the official `openai` SDK against a live server:
the same conversation as a chat completion gives the same answer, streamed as the SDK's typed events."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest

from tests.test_tools import MODEL, TIME, WEATHER
from textgen.engine.params import ParamError
from textgen.frontend.responses_protocol import ResponsesRequest

TOOLS = [
    {"type": "function", "name": "get_weather", "description": "The weather.", "parameters": WEATHER},
    {"type": "function", "name": "get_time", "parameters": TIME},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
CITY = {  # a structured output's schema
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(long_context_server):
    with long_context_server.openai() as c:
        yield c


def test_the_same_conversation_gets_the_same_answer_as_chat(client):
    r = client.responses.create(
        include=["reasoning.encrypted_content"],  # as the Agents SDK may send: nothing to add
        model=MODEL,
        instructions="Be brief.",
        input="What is AI?",
        max_output_tokens=6,
        temperature=0,
        extra_body={"speculative": True},  # greedy: the same text either way
    )
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is AI?"}],
        max_tokens=6,
        temperature=0,
    )
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == chat.choices[0].message.content
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 6
    assert r.usage.total_tokens == r.usage.input_tokens + 6
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    # Input items with text parts, an earlier assistant turn among them, are the same messages.
    items = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
            {"role": "user", "content": "What is AI?"},
        ],
        max_output_tokens=6,
        temperature=0,
    )
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "What is AI?"},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert items.output_text == chat.choices[0].message.content


def test_stream_events_build_the_final_response(client):
    kwargs = dict(model=MODEL, input="The quick brown fox", max_output_tokens=12, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    # The SDK's stream helper checks each event against the response it builds, and gives a final one for
    # an answer that completed (one that a grammar ends).
    answer = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    kwargs |= {"text": {"format": {"type": "json_schema", "name": "answer", "schema": answer}}}
    with client.responses.stream(**kwargs) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and json.loads(final.output_text) in ({"ok": True}, {"ok": False})


def test_the_messages_tokens_are_scored_as_chat_scores_them(client):
    """include "message.output_text.logprobs" (OpenAI's, vLLM's): the message's tokens with their
    log-probabilities and top_logprobs alternatives, in the whole answer and in the stream's deltas."""
    kwargs = dict(model=MODEL, input="What is AI?", max_output_tokens=6, temperature=0)
    scored = dict(include=["message.output_text.logprobs"], top_logprobs=2)
    whole = client.responses.create(**kwargs, **scored)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is AI?"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    (part,) = whole.output[0].content
    expected = chat.choices[0].logprobs.content
    assert whole.top_logprobs == 2 and part.text == chat.choices[0].message.content
    assert [e.token for e in part.logprobs] == [e.token for e in expected] and len(expected) == 6
    assert [e.logprob for e in part.logprobs] == pytest.approx([e.logprob for e in expected], abs=1e-4)
    for entry, reference in zip(part.logprobs, expected):
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert [t.token for t in entry.top_logprobs] == [t.token for t in reference.top_logprobs]
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy: the likeliest
    events = list(client.responses.create(**kwargs, **scored, stream=True))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    streamed = [entry for d in deltas for entry in d.logprobs]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [e.token for e in streamed] == [e.token for e in done.logprobs] == [e.token for e in part.logprobs]

    def dump(entries):  # the events' and the response's own SDK types, as plain data
        return [e.model_dump() for e in entries]

    assert dump(events[-1].response.output[0].content[0].logprobs) == dump(done.logprobs) == dump(streamed)
    # Not asked for (top_logprobs alone asks for nothing, as in vLLM): empty lists, as OpenAI sends them.
    plain = client.responses.create(**kwargs, top_logprobs=2)
    assert plain.output[0].content[0].logprobs == []
    events = list(client.responses.create(**kwargs, stream=True))
    assert all(e.logprobs == [] for e in events if e.type == "response.output_text.delta")


def check_calls(output) -> list:
    calls = [item for item in output if item.type == "function_call"]
    assert calls
    for call in calls:
        assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    return calls


def test_function_tools_are_called_and_their_outputs_taken_back(client):
    r = client.responses.create(
        model=MODEL,
        input="What time is it in Paris?",
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=200,
        temperature=0,
    )
    (call,) = check_calls(r.output)
    assert r.status == "completed"
    follow_up = [
        {"role": "user", "content": "What time is it in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "14:00"},
    ]
    again = client.responses.create(model=MODEL, input=follow_up, tools=TOOLS, max_output_tokens=5)
    assert again.status in ("completed", "incomplete")
    named = client.responses.create(
        model=MODEL,
        input="Weather?",
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=200,
    )
    assert [c.name for c in check_calls(named.output)] == ["get_weather"]


def test_streamed_calls_are_items_with_their_arguments(client):
    kwargs = dict(
        model=MODEL,
        input="Weather?",
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=200,
        temperature=0,
    )
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [i.type for i in added] == ["function_call"] and added[0].name == "get_weather"
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    final = check_calls(events[-1].response.output)
    assert pieces == done == final[0].arguments == check_calls(whole.output)[0].arguments
    assert events[-1].type == "response.completed"


def test_text_format_constrains_the_output(client):
    schema = CITY
    r = client.responses.create(
        model=MODEL,
        input="A city as JSON.",
        max_output_tokens=100,
        temperature=0.8,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
    )
    jsonschema.validate(json.loads(r.output_text), schema)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 9}, "temperature"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "foo"}}}},
            "text.format",
        ),
        ({"reasoning": {"effort": "extreme"}}, "reasoning"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"include": ["message.output_text.logprobs"], "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": -1}, "top_logprobs"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_field(long_context_server, body, param):
    r = httpx.post(
        f"{long_context_server.url}/v1/responses", json={"model": MODEL, "input": "Hi", **body}, timeout=60
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input="Hi")


def test_a_function_call_joins_the_assistant_turn_before_it():
    request = ResponsesRequest.model_validate(
        {
            "input": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Let me look."},
                {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "14:00"},
            ],
            "tools": TOOLS,
        }
    )
    messages = request.to_chat().messages
    assert [m.role for m in messages] == ["user", "assistant", "tool"]
    assert [c.id for c in messages[1].tool_calls] == ["c1", "c2"] and messages[1].content == "Let me look."
    with pytest.raises(ParamError) as exc:
        ResponsesRequest.model_validate({"input": [{"type": "function_call", "name": "f"}]}).to_chat()
    assert exc.value.field == "input" and "input.0.call_id" in exc.value.message


def test_the_openai_agents_sdk_runs_a_tool_and_reads_structured_output(long_context_server):
    """OpenAI's Agents SDK speaks the Responses API, streamed: a function tool it runs on the model's call,
    and an agent whose output is a typed object (text.format)."""
    import asyncio

    from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
    from agents.models.openai_responses import OpenAIResponsesModel
    from pydantic import BaseModel, Field

    set_tracing_disabled(True)
    asked = []

    @function_tool
    def get_time(zone: Literal["CET", "UTC"]) -> str:  # bounded: a random model's strings never end
        """The time in a time zone."""
        asked.append(zone)
        return "14:00"

    class City(BaseModel):
        name: str = Field(max_length=8)
        country: str = Field(max_length=8)

    async def run() -> tuple[object, object]:
        client = openai.AsyncOpenAI(base_url=f"{long_context_server.url}/v1", api_key="unused")
        model = OpenAIResponsesModel(model=MODEL, openai_client=client)
        settings = ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=200)
        timer = Agent(
            name="timer",
            tools=[get_time],
            model=model,
            model_settings=settings,
            tool_use_behavior="stop_on_first_tool",
        )
        cities = Agent(
            name="cities", output_type=City, model=model, model_settings=ModelSettings(max_tokens=200)
        )
        timed = await Runner.run(timer, "What time is it in Paris?", max_turns=2)
        city = await Runner.run(cities, "The capital of France?", max_turns=1)
        return timed.final_output, city.final_output

    timed, city = asyncio.run(run())
    assert timed == "14:00" and asked in (["CET"], ["UTC"])
    assert isinstance(city, City)
