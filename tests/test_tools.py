"""Tool calling on /v1/chat/completions: forced calls, the model's own (Hermes) calls, streaming, the
conversation's earlier calls and results, driven by the `openai` SDK and LangChain against a live server.

The tiny random model never writes a call by itself: what parses below as a call parses because a grammar
forced it ("required", a named function), or because a one-choice constraint wrote the model's text.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from transformers import AutoTokenizer

from textgen.engine.params import ParamError
from textgen.frontend.openai_protocol import ChatCompletionRequest, ChatMessage, render_messages
from textgen.frontend.tools import ToolStream, ToolUse, hermes_conversation

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 8}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
BAD_SCHEMA = TOOLS + [{"type": "function", "function": {"name": "bad", "parameters": {"type": "foo"}}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]
MODEL = "tiny-gpt2-1k"  # the served id: the model directory's name (tests/conftest.py long_context_server)
# A request for exactly one forced call.
ONE_CALL = dict(
    messages=ASK, model=MODEL, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=200
)
A_CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
)


def use(mode: str = "auto", name: str | None = None, parallel: bool = True) -> ToolUse:
    body = {"messages": ASK, "tools": TOOLS, "parallel_tool_calls": parallel}
    body["tool_choice"] = {"type": "function", "function": {"name": name}} if name else mode
    found = ChatCompletionRequest.model_validate(body).tool_use()
    assert found is not None
    return found


# -- what the model's text becomes ----------------------------------------------------------------------


def test_hermes_calls_become_tool_calls_and_the_text_before_them_content():
    reply = use().reply("Let me look.\n" + A_CALL + "\n" + A_CALL.replace("Paris", "Rome"))
    assert reply.content == "Let me look."
    assert [c["function"]["name"] for c in reply.calls] == ["get_weather", "get_weather"]
    assert json.loads(reply.calls[1]["function"]["arguments"]) == {"city": "Rome", "unit": "celsius"}
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in reply.calls)
    assert len({c["id"] for c in reply.calls}) == 2
    assert use().finish_reason("stop", reply) == "tool_calls"
    assert use().finish_reason("length", reply) == "length"
    assert len(use(parallel=False).reply(A_CALL + A_CALL).calls) == 1


def test_an_answer_of_bare_json_calls_is_calls_as_llama_writes_them():
    text = ' {"name": "get_time", "parameters": {"zone": "CET"}}; {"name": "get_weather", "arguments": {}}\n'
    reply = use().reply(text)
    assert reply.content is None and [c["function"]["name"] for c in reply.calls] == [
        "get_time",
        "get_weather",
    ]
    assert reply.calls[0]["function"]["arguments"] == '{"zone": "CET"}'
    content, deltas, _ = stream(use(), [" {", '"name": "get_time", "parameters": {"zone": "CET"}}'])
    assert content == "" and [d["function"]["name"] for d in deltas] == ["get_time"]


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny.",
        '{"name": "get_time", "parameters": {"zone": "CET"}} is what I would call.',
        '{"name": "Paris", "parameters": {}}',  # JSON, but not a call of a tool
        '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',  # not one of the tools
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut short
        "<tool_call> is a tag I know.",
        "<tool_call>[1, 2]</tool_call>",
    ],
)
def test_text_that_is_not_a_whole_call_of_a_given_tool_stays_content(text):
    reply = use().reply(text)
    assert reply.content == text and reply.calls == []
    assert use().finish_reason("stop", reply) == "stop"
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    assert stream(use(), pieces)[:2] == (text, [])  # streamed: all of it arrives as content


def test_a_call_the_budget_cut_short_is_dropped_and_the_whole_ones_stand():
    reply = use().reply(A_CALL + "\n" + A_CALL[:30])
    assert reply.content is None and len(reply.calls) == 1
    assert len(use().reply(A_CALL[:-5]).calls) == 1  # cut in its closing tag: the call is whole


def test_a_named_function_answers_with_its_arguments():
    named = use(name="get_time")
    reply = named.reply('{"zone": "UTC"}')
    assert reply.content is None
    assert [c["function"] for c in reply.calls] == [{"name": "get_time", "arguments": '{"zone": "UTC"}'}]
    assert named.finish_reason("stop", reply) == "stop"  # as OpenAI, for a function the client named
    assert json.loads(named.constraint().spec) == TIME


def test_forced_calls_take_only_the_properties_a_schema_lists_unless_it_says_otherwise():
    open_schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},  # a key named so
            "items": {"type": "array", "items": {"$ref": "#/$defs/point"}},
            "extra": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
        },
        "$defs": {"point": {"anyOf": [{"type": "object", "properties": {"x": {"type": "integer"}}}]}},
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": open_schema}}]
    request = {
        "messages": ASK,
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "f"}},
    }
    forced = json.loads(ChatCompletionRequest.model_validate(request).constraint().spec)
    assert forced["additionalProperties"] is False
    inner = forced["properties"]
    assert set(inner) == {"properties", "items", "extra"}  # names stay names
    assert inner["properties"]["additionalProperties"] is False
    assert inner["extra"]["additionalProperties"] == {"type": "string"}  # said otherwise: kept
    assert forced["$defs"]["point"]["anyOf"][0]["additionalProperties"] is False
    assert tools[0]["function"]["parameters"] == open_schema  # the request itself is untouched


def stream(tool_use: ToolUse, pieces: list[str]) -> tuple[str, list[dict], object]:
    s = ToolStream(tool_use)
    content, calls = "", []
    for piece in pieces:
        text, deltas = s.feed(piece)
        content, calls = content + text, calls + deltas
    text, deltas, reply = s.finish()
    return content + text, calls + deltas, reply


def test_a_stream_holds_back_what_may_open_a_call_and_sends_each_call_whole():
    s = ToolStream(use())
    assert s.feed("Sure <to") == ("Sure ", [])  # "<to" may be the start of "<tool_call>"
    assert s.feed("ol_call>\n{") == ("", [])
    content, deltas, _ = stream(use(), ["Sure <to", "ol_call>\n{", A_CALL[13:]])
    assert content == "Sure " and [d["index"] for d in deltas] == [0]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"].startswith("call_")
    # Not a call after all: the held text goes out, and all of it arrives.
    content, deltas, reply = stream(use(), ["a <", "b", " <tool"])
    assert (content, deltas, reply.calls) == ("a <b <tool", [], [])


def test_a_named_functions_arguments_stream_as_they_come():
    content, deltas, reply = stream(use(name="get_time"), ['{"zone', '": "U', 'TC"}'])
    assert content == "" and deltas[0]["function"]["name"] == "get_time" and "id" in deltas[0]
    assert [d["index"] for d in deltas] == [0, 0, 0] and "id" not in deltas[1]
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"zone": "UTC"}'
    assert reply.calls[0]["function"]["arguments"] == '{"zone": "UTC"}'


# -- what the request may say ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools"),  # a name twice
        ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        ({"tools": BAD_SCHEMA, "tool_choice": "required"}, "tools"),
        ({"tools": BAD_SCHEMA, "tool_choice": {"type": "function", "function": {"name": "bad"}}}, "tools"),
    ],
)
def test_tool_fields_that_cannot_work_name_the_field(body, field):
    request = ChatCompletionRequest.model_validate({"messages": ASK, **body})
    with pytest.raises(ParamError) as exc:
        request.constraint()
    assert exc.value.field == field
    if body.get("tools") == BAD_SCHEMA:
        assert "tools.2.function.parameters" in str(exc.value) and "foo" in str(exc.value)


def test_none_or_no_tools_is_plain_chat_and_auto_is_the_default():
    assert (
        ChatCompletionRequest.model_validate(
            {"messages": ASK, "tools": TOOLS, "tool_choice": "none"}
        ).tool_use()
        is None
    )
    assert ChatCompletionRequest.model_validate({"messages": ASK, "tool_choice": "none"}).tool_use() is None
    found = ChatCompletionRequest.model_validate({"messages": ASK, "tools": TOOLS}).tool_use()
    assert found is not None and found.mode == "auto" and found.constraint() is None


# -- what the model is shown ----------------------------------------------------------------------------

HISTORY = [
    {"role": "developer", "content": "Be brief."},
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"zone": "CET"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:00"},
]


def messages(raw: list[dict]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in raw]


def test_a_model_without_tools_in_its_template_sees_them_in_the_hermes_format(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (  # ChatML without tools, as SmolLM2's
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    text = render_messages(messages(HISTORY), tok, use()).text
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and '"name": "get_time"' in system
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    )
    results = "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n14:00\n</tool_response>"
    assert f"<|im_start|>user\n{results}<|im_end|>" in text  # both results in one turn
    # The plain transcript of a model without a chat template (GPT-2) holds the same turns.
    plain = render_messages(messages(HISTORY), AutoTokenizer.from_pretrained(tiny_model_dir), use()).text
    assert plain.startswith("System: Be brief.\n\n# Tools") and f"User: {results}\nAssistant:" in plain
    # No tools shown with tool_choice "none" (use None); the history is still there.
    assert "# Tools" not in render_messages(messages(HISTORY), tok).text


def test_a_template_that_takes_tools_renders_them_itself(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (
        "{% if tools %}<|tools|>{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}"
        "[{{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    text = render_messages(messages(HISTORY), tok, use()).text
    # (transformers renders templates with trim_blocks: a block's newline is dropped.)
    assert text.startswith("<|tools|>get_weather;get_time;<|system|>Be brief.<|user|>")
    assert "<|assistant|>[get_weather Paris][get_time ]<|tool|>18 C<|tool|>14:00<|assistant|>" in text


def test_hermes_conversation_leaves_a_plain_chat_as_it_is():
    plain = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert hermes_conversation(plain, None) == plain


# -- against a live server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(long_context_server):
    return long_context_server


@pytest.fixture(scope="module")
def client(server):
    with server.openai() as c:
        yield c


def check_calls(message, most: int | None = None) -> None:
    assert message.tool_calls and (most is None or len(message.tool_calls) <= most)
    for call in message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_are_valid_calls_of_the_given_tools(client):
    r = client.chat.completions.create(
        messages=ASK, model=MODEL, tools=TOOLS, tool_choice="required", n=8, seed=1, max_tokens=200
    )
    for choice in r.choices:
        # A random model may go on calling until the budget ends; whole calls stand, a cut one is dropped.
        assert choice.finish_reason in ("tool_calls", "length"), choice
        assert choice.message.content is None
        check_calls(choice.message)
    assert any(choice.finish_reason == "tool_calls" for choice in r.choices)
    single = client.chat.completions.create(**ONE_CALL, n=4, seed=2)
    for choice in single.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message, most=1)


def test_a_named_function_is_called_with_valid_arguments(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        messages=ASK, model=MODEL, tools=TOOLS, tool_choice=choice, n=4, seed=3
    )
    for c in r.choices:
        assert c.finish_reason == "stop" and c.message.tool_calls[0].function.name == "get_weather"
        check_calls(c.message, most=1)


def collect(chunks) -> tuple[str, dict[int, dict], str]:
    """A streamed choice as clients put it together: content, and each call's pieces added up by index."""
    content, calls, reason = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or piece.id
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, calls, reason


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_calls_add_up_to_the_answers_calls(client, choice):
    kwargs = dict(messages=ASK, model=MODEL, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=200)
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, calls, reason = collect(client.chat.completions.create(**kwargs, stream=True))
    assert content == "" and reason == whole.finish_reason
    expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == expected
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_the_models_own_hermes_calls_are_parsed_in_auto(client):
    # The model's text, written here by a one-choice constraint, as a model trained on tools would write it.
    said = "Let me check. " + A_CALL
    kwargs = dict(
        messages=ASK,
        model=MODEL,
        tools=TOOLS,
        max_tokens=200,
        extra_body={"guided_choice": [said]},
    )
    r = client.chat.completions.create(**kwargs).choices[0]
    assert r.finish_reason == "tool_calls" and r.message.content == "Let me check."
    assert r.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(r.message.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    content, calls, reason = collect(client.chat.completions.create(**kwargs, stream=True))
    assert content == "Let me check. " and reason == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    # Without tools the same text is content.
    kwargs.pop("tools")
    plain = client.chat.completions.create(**kwargs).choices[0]
    assert (
        plain.message.content == said and plain.message.tool_calls is None and plain.finish_reason == "stop"
    )


def test_a_conversation_with_calls_and_results_continues(client):
    r = client.chat.completions.create(
        messages=HISTORY, model=MODEL, tools=TOOLS, max_tokens=5, temperature=0
    )
    assert r.choices[0].message.content is not None and r.choices[0].finish_reason in ("stop", "length")
    # As the README shows: the SDK's own message object sent back, then the result.
    called = client.chat.completions.create(
        messages=ASK, model=MODEL, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=4
    ).choices[0]
    result = {"role": "tool", "tool_call_id": called.message.tool_calls[0].id, "content": "18 C"}
    again = client.chat.completions.create(
        messages=[*ASK, called.message, result], model=MODEL, tools=TOOLS, max_tokens=5
    )
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_langchain_binds_tools_runs_them_and_reads_structured_output(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_time(zone: Literal["CET", "UTC"]) -> str:  # bounded: a random model's strings never end
        """The time in a time zone."""
        return "14:00"

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL, max_tokens=200, seed=0)
    ask = [HumanMessage("What time is it in Paris?")]
    called = llm.bind_tools([get_time], tool_choice="required").invoke(ask)
    (call,) = called.tool_calls[:1]
    assert call["name"] == "get_time" and call["args"]["zone"] in ("CET", "UTC")
    result = get_time.invoke(call)  # LangChain runs the tool: a ToolMessage answering the call's id
    assert isinstance(result, ToolMessage)
    answer = llm.bind_tools([get_time]).invoke(ask + [called, result])
    assert isinstance(answer.content, str)

    class City(BaseModel):
        """A city and its country."""

        name: str = Field(max_length=12)
        country: str = Field(max_length=12)

    city = llm.with_structured_output(City, method="function_calling").invoke("The capital of France?")
    assert isinstance(city, City)


def test_only_bodies_that_force_calls_may_constrain():
    from textgen.frontend.structured import may_constrain

    chat = {"messages": ASK, "tools": TOOLS}
    assert not may_constrain(chat) and not may_constrain(chat | {"tool_choice": "auto"})
    assert not may_constrain(chat | {"tool_choice": "none"}) and not may_constrain([chat])
    assert may_constrain(chat | {"tool_choice": "required"})
    assert may_constrain(chat | {"tool_choice": {"type": "function", "function": {"name": "get_time"}}})


def test_each_streamed_choice_gets_its_own_calls(client):
    chunks = list(client.chat.completions.create(**ONE_CALL, n=3, seed=5, stream=True))
    for index in range(3):
        mine = [c for c in chunks if c.choices and c.choices[0].index == index]
        content, calls, reason = collect(mine)
        assert reason == "tool_calls" and content == "" and len(calls) == 1
        (call,) = calls.values()
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
