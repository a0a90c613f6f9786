"""A thinking model's reasoning apart from its answer on /v1/chat/completions (textgen/frontend/reasoning.py).

The tiny model below has a chat template that knows <think>, as Qwen3's; what it "thinks" is written by a
one-choice constraint, as a thinking model would write it.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tests.server import start_server
from tests.test_tools import A_CALL, TOOLS
from tests.tiny_model import build_tiny_gpt2
from textgen.frontend.reasoning import ReasoningStream, opened_by, split_reasoning, thinks

THINKING_TEMPLATE = (  # ChatML, with an empty thought when thinking is off, as Qwen3's
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
THOUGHT = "<think>\nParis is in France.\n</think>\n\nParis."


@pytest.mark.parametrize(
    "text, opened, expected",
    [
        (THOUGHT, False, ("\nParis is in France.\n", "Paris.")),
        ("\n<think>a</think>b", False, ("a", "b")),
        ("a</think>\n\nb", True, ("a", "b")),  # the prompt opened <think> (DeepSeek-R1's template)
        ("<think>cut sh", False, ("cut sh", "")),  # the budget ended inside the thought
        ("Paris.", False, (None, "Paris.")),
        ("<thinking> is a word", False, (None, "<thinking> is a word")),
        ("<thi", False, (None, "<thi")),
    ],
)
def test_the_answer_is_split_whole_and_streamed_alike(text, opened, expected):
    assert split_reasoning(text, opened) == expected
    for size in (1, 2, 5):
        stream, reasoning, content = ReasoningStream(opened), "", ""
        for i in range(0, len(text), size):
            said, answered = stream.feed(text[i : i + size])
            reasoning, content = reasoning + said, content + answered
        said, answered = stream.finish()
        assert ((reasoning + said) or None, content + answered) == expected


def test_which_templates_think_and_which_prompts_opened_a_thought(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not thinks(tok)
    tok.chat_template = THINKING_TEMPLATE
    assert thinks(tok)
    assert opened_by("<|im_start|>assistant\n<think>\n") and not opened_by("<think>\n\n</think>\n\n")
    assert not opened_by("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory, cache_dir):
    model = build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-thinker", n_positions=1024)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = THINKING_TEMPLATE
    tok.save_pretrained(model)
    env = {"MODEL_NAME": str(model), "TEXTGEN_CACHE_DIR": str(cache_dir), "TEXTGEN_THREADS": "1"}
    with start_server(env) as server:
        yield server


def chat(server, said: str, **body):
    body = {"messages": [{"role": "user", "content": "Capital of France?"}], "guided_choice": [said], **body}
    return server.client().post("/v1/chat/completions", json=body)


def streamed(server, said: str, **body) -> tuple[str, str, list, str]:
    reasoning = content = ""
    calls, reason = [], None
    with server.client() as client:
        body = {
            "messages": [{"role": "user", "content": "Capital of France?"}],
            "guided_choice": [said],
            **body,
        }
        with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                (choice,) = json.loads(line[6:])["choices"]
                delta = choice["delta"]
                reasoning += delta.get("reasoning_content") or ""
                content += delta.get("content") or ""
                calls += delta.get("tool_calls") or []
                reason = choice["finish_reason"] or reason
    return reasoning, content, calls, reason


def test_reasoning_content_apart_from_the_answer_streamed_or_not(thinking_server):
    message = chat(thinking_server, THOUGHT).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "\nParis is in France.\n" and message["content"] == "Paris."
    assert streamed(thinking_server, THOUGHT) == ("\nParis is in France.\n", "Paris.", [], "stop")
    plain = chat(thinking_server, "Paris.").json()["choices"][0]["message"]
    assert plain["content"] == "Paris." and "reasoning_content" not in plain


def test_a_thought_then_a_tool_call(thinking_server):
    said = "<think>The weather tool.</think>\n" + A_CALL
    choice = chat(thinking_server, said, tools=TOOLS).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["reasoning_content"] == "The weather tool."
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    reasoning, content, calls, reason = streamed(thinking_server, said, tools=TOOLS)
    assert (reasoning, content, reason) == ("The weather tool.", "", "tool_calls")
    assert [c["function"]["name"] for c in calls] == ["get_weather"]


def test_thinking_turned_off_by_the_template_leaves_the_answer_whole(thinking_server):
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    message = chat(thinking_server, "Paris.", **off).json()["choices"][0]["message"]
    assert message["content"] == "Paris." and "reasoning_content" not in message


def test_the_responses_api_gives_the_thought_as_a_reasoning_item():
    import asyncio

    from tests.test_openai import FakeHandle, collect, result
    from textgen.api import openai_responses
    from textgen.engine.outputs import Event
    from textgen.engine.params import SamplingParams
    from textgen.frontend.openai_protocol import AnswerStream, split_answer
    from textgen.frontend.prepare import Choice, Prepared, PromptRequest
    from textgen.frontend.responses_protocol import ResponseShape, ResponsesRequest, output_items
    from textgen.frontend.templates import RenderedPrompt

    reasoning, text, reply = split_answer(THOUGHT, False, None)
    assert [i["type"] for i in output_items(text, reply, reasoning)] == ["reasoning", "message"]
    request = ResponsesRequest.model_validate({"input": "Capital of France?"})
    params = SamplingParams(max_new_tokens=20)
    prepared = Prepared(PromptRequest([RenderedPrompt("abc")], params), [[1, 2, 3]], [Choice(0, params)])
    pieces = ["<thi", "nk>\nParis is ", "in France.\n</th", "ink>\n\nPar", "is."]
    handle = FakeHandle([Event(p) for p in pieces] + [Event("", result("eos"))])
    events = asyncio.run(
        collect(
            openai_responses._events(ResponseShape(request, "m"), prepared, handle, AnswerStream(False, None))
        )
    )
    data = [json.loads(e.removeprefix("data: ")) for e in events]
    kinds = [d["type"] for d in data]
    assert kinds[2:4] == ["response.output_item.added", "response.reasoning_text.delta"]
    assert "".join(d["delta"] for d in data if d["type"] == "response.reasoning_text.delta") == (
        "\nParis is in France.\n"
    )
    assert "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta") == "Paris."
    final = data[-1]["response"]
    assert data[-1]["type"] == "response.completed" and [i["type"] for i in final["output"]] == [
        "reasoning",
        "message",
    ]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "\nParis is in France.\n"}]
    # Sent back as input, as the Agents SDK does, a reasoning item is left out of the conversation.
    again = ResponsesRequest.model_validate(
        {"input": [final["output"][0], {"role": "user", "content": "And Italy?"}]}
    )
    assert [m.role for m in again.to_chat().messages] == ["user"]
