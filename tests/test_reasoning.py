"""A thinking model's reasoning apart from its answer on /v1/chat/completions (textgen/frontend/reasoning.py).

The tiny model below has a chat template that knows <think> and opens it (as DeepSeek-R1's); what a thinking
model writes after it is scripted into the routes' streams in-process, since a grammar (which could write it
live) leaves a model no room for a thought.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tests.server import start_server
from tests.test_tools import A_CALL
from tests.tiny_model import build_tiny_gpt2
from textgen.frontend.reasoning import ReasoningStream, opened_by, split_reasoning, thinks

# ChatML that opens the thought (as DeepSeek-R1's), or writes an empty one when thinking is off (as Qwen3's);
# a reasoning effort given to it is written in a system line first (as gpt-oss's)
THINKING_TEMPLATE = (
    "{% if reasoning_effort is defined %}<|im_start|>system\nReasoning: {{ reasoning_effort }}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
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


def chat(server, **body):
    body = {"messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 8, **body}
    return server.client().post("/v1/chat/completions", json=body | {"temperature": 0}).json()["choices"][0]


def streamed(server, **body) -> tuple[str, str]:
    reasoning = content = ""
    body = {"messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 8, **body}
    with server.client() as client:
        with client.stream(
            "POST", "/v1/chat/completions", json=body | {"stream": True, "temperature": 0}
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    (choice,) = json.loads(line[6:])["choices"]
                    reasoning += choice["delta"].get("reasoning_content") or ""
                    content += choice["delta"].get("content") or ""
    return reasoning, content


def test_a_prompt_that_opened_a_thought_answers_with_reasoning_streamed_or_not(thinking_server):
    # The template opens <think> (as DeepSeek-R1's); the random model never closes it within 8 tokens.
    choice = chat(thinking_server)
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == ""
    assert choice["message"]["reasoning_content"]
    assert streamed(thinking_server) == (choice["message"]["reasoning_content"], "")
    off = chat(thinking_server, chat_template_kwargs={"enable_thinking": False})["message"]
    assert off["content"] and "reasoning_content" not in off  # the template closed the thought itself


def test_anthropics_messages_api_answers_with_a_thinking_block(thinking_server):
    import anthropic

    thought = chat(thinking_server)["message"]["reasoning_content"]
    ask = dict(
        model="tiny-thinker", messages=[{"role": "user", "content": "Capital of France?"}], max_tokens=8
    )
    with anthropic.Anthropic(base_url=thinking_server.url, api_key="unused", max_retries=0) as client:
        whole = client.messages.create(**ask, extra_body={"temperature": 0})
        with client.messages.stream(**ask, extra_body={"temperature": 0}) as stream:
            kinds = {e.delta.type for e in stream if e.type == "content_block_delta"}
            final = stream.get_final_message()
        off = client.messages.create(
            **ask, extra_body={"temperature": 0, "chat_template_kwargs": {"enable_thinking": False}}
        )
    (block,) = whole.content
    assert block.type == "thinking" and block.thinking == thought and whole.stop_reason == "max_tokens"
    assert kinds == {"thinking_delta"} and final.content == whole.content
    assert [b.type for b in off.content] == ["text"] and off.content[0].text


def test_every_dialects_thinking_switch_turns_the_thought_off_and_on(thinking_server):
    import anthropic
    import openai

    ask = {"messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 8}
    usage: dict[str, int] = {}

    def answer(**body) -> tuple[str | None, str]:
        with thinking_server.client() as client:
            r = client.post("/v1/chat/completions", json=ask | body | {"temperature": 0})
        usage[json.dumps(body)] = r.json()["usage"]["prompt_tokens"]
        message = r.json()["choices"][0]["message"]
        return message.get("reasoning_content"), message["content"]

    on, off = answer(), answer(chat_template_kwargs={"enable_thinking": False})
    assert on[0] and off[0] is None and off[1]
    assert answer(reasoning_effort="none") == off
    high = answer(reasoning_effort="high")  # thinking on, and the effort given to the template
    assert high[0] and usage['{"reasoning_effort": "high"}'] > usage["{}"]
    low = answer(reasoning_effort="low")
    both = {"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}}
    assert answer(**both)[0]  # chat_template_kwargs wins over the switch

    url = thinking_server.url
    with anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0) as client:
        ask["model"] = "tiny-thinker"
        disabled = client.messages.create(**ask, thinking={"type": "disabled"}, extra_body={"temperature": 0})
        greedy = {"temperature": 0}
        enabled = client.messages.create(
            **ask, thinking={"type": "enabled", "budget_tokens": 1024}, extra_body=greedy
        )
        effort = {**greedy, "output_config": {"effort": "low"}}
        lowly = client.messages.create(**ask, thinking={"type": "adaptive"}, extra_body=effort)
    assert [(b.type, b.text) for b in disabled.content] == [("text", off[1])]
    # on, with Anthropic's default effort ("high") or output_config's, given to the template as chat's
    assert [(b.type, b.thinking) for b in enabled.content] == [("thinking", high[0])]
    prompt = enabled.usage.input_tokens + enabled.usage.cache_read_input_tokens  # as Anthropic counts
    assert prompt == usage['{"reasoning_effort": "high"}']
    assert [(b.type, b.thinking) for b in lowly.content] == [("thinking", low[0])]
    prompt = lowly.usage.input_tokens + lowly.usage.cache_read_input_tokens
    assert prompt == usage['{"reasoning_effort": "low"}']

    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        request = dict(input="Capital of France?", max_output_tokens=8, temperature=0)
        quiet = client.responses.create(**request, reasoning={"effort": "none"})
        thought = client.responses.create(**request, reasoning={"effort": "high", "summary": "auto"})
    assert [i.type for i in quiet.output] == ["message"] and quiet.output_text == off[1]
    assert thought.output[0].type == "reasoning" and thought.output[0].content[0].text == high[0]


def thought(opened: bool, budget: int | None, pieces: list[str]):
    from textgen.engine.params import Thinking
    from textgen.engine.thinking import Thought

    state = Thought(Thinking("<think>", "</think>", (1, 2, 3), opened, budget))
    forced = []
    for piece in pieces:
        if state.forced() is not None:
            forced.append(state.forced())
            state.advance("")
        else:
            state.advance(piece)
    return state, forced


def test_a_thought_is_found_in_the_text_counted_and_closed_at_its_budget():
    # The model opens and closes it, each tag split across tokens: the tokens between, the closing ones too
    state, forced = thought(False, None, ["\n", "<th", "ink>", "a", "b", "</", "think", ">", "c", "d"])
    assert state.over and state.tokens == 5 and forced == []
    # As the answer is split (frontend/reasoning.py): a thought opens the answer or there is none
    state, _ = thought(False, 2, ["Hi ", "<think>", "a", "b", "c", "d"])
    assert state.over and state.tokens == 0 and state.forced() is None
    # Opened by the prompt; a budget of 3: the closing tag's tokens are forced, one a step, then nothing
    state, forced = thought(True, 3, ["a", "b", "c", "x", "x", "x", "d", "e"])
    assert forced == [1, 2, 3] and state.over and state.tokens == 6 and state.forced() is None
    state, forced = thought(True, 0, ["x", "x", "x", "a"])  # 0: closed before any thought
    assert forced == [1, 2, 3] and state.tokens == 3
    state, forced = thought(False, 2, [" ", "<think>", "d", "e", "x", "x", "x", "f"])
    assert forced == [1, 2, 3] and state.tokens == 5  # counted from its opening
    state, forced = thought(True, 4, ["a", "</think>", "b", "c", "d", "e"])
    assert forced == [] and state.tokens == 2  # closed by the model within its budget


def test_a_thinking_budget_closes_the_thought_and_the_answer_follows(thinking_server, tiny_model_dir):
    """vLLM's thinking_token_budget on chat, Anthropic's thinking.budget_tokens: after that many tokens of
    thought, </think> is forced and the model answers. usage counts the thought's tokens."""
    import anthropic

    greedy = {"max_tokens": 20, "ignore_eos": True}
    with thinking_server.client() as client:

        def ask(**body):
            r = client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Capital of France?"}], "temperature": 0}
                | greedy
                | body,
            ).json()
            return r["choices"][0]["message"], r["usage"]

        free, free_usage = ask()
        bounded, usage = ask(thinking_token_budget=5)
        closed, closed_usage = ask(thinking_token_budget=0)
        refused = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "thinking_token_budget": -1},
        )
    # The random model never closes its thought within 20 tokens; bounded, it says its 5 tokens of it
    assert free["content"] == "" and free_usage["completion_tokens_details"]["reasoning_tokens"] == 20
    tag = len(AutoTokenizer.from_pretrained(tiny_model_dir)("</think>")["input_ids"])  # the same vocabulary
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 5 + tag
    assert free["reasoning_content"].startswith(bounded["reasoning_content"]) and bounded["content"]
    assert usage["completion_tokens"] == 20  # the budget bounds the thought, max_tokens the whole answer
    assert closed_usage["completion_tokens_details"]["reasoning_tokens"] == tag and closed["content"]
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "thinking_token_budget"
    streamed_thought = streamed(thinking_server, thinking_token_budget=5, max_tokens=20, ignore_eos=True)
    assert streamed_thought == (bounded["reasoning_content"], bounded["content"])

    message = dict(
        model="tiny-thinker", max_tokens=20, messages=[{"role": "user", "content": "Capital of France?"}]
    )
    extra = {"temperature": 0}  # the Messages API has no ignore_eos; greedy, this model writes no EOS here
    with anthropic.Anthropic(base_url=thinking_server.url, api_key="unused", max_retries=0) as claude:
        budgeted = claude.messages.create(
            **message, thinking={"type": "enabled", "budget_tokens": 5}, extra_body=extra
        )
        with pytest.raises(anthropic.BadRequestError) as bad:
            claude.messages.create(**message, thinking={"type": "enabled", "budget_tokens": -3})
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in budgeted.content] == [
        ("thinking", bounded["reasoning_content"]),
        ("text", bounded["content"]),
    ]
    assert bad.value.body["error"]["message"].startswith("thinking.budget_tokens")

    with thinking_server.openai() as client:  # the Responses API counts the thought too
        answer = client.responses.create(input="Capital of France?", max_output_tokens=8, temperature=0)
    assert answer.usage.output_tokens_details.reasoning_tokens == answer.usage.output_tokens == 8


def test_an_answer_a_grammar_forces_is_never_a_thought(thinking_server):
    forced = "not a thought</think>Paris."  # what the grammar allows is the answer, whatever it looks like
    message = chat(thinking_server, guided_choice=[forced], max_tokens=100)["message"]
    assert message["content"] == forced and "reasoning_content" not in message


def test_a_thought_then_a_tool_call_streamed_or_not():
    import asyncio

    from tests.test_openai import FakeHandle, collect, plan, result
    from textgen.api import openai as openai_http
    from textgen.engine.outputs import Event
    from textgen.frontend.openai_protocol import Call, choice_body
    from textgen.frontend.tools import ToolUse
    from tests.test_tools import use

    said = "<think>The weather tool.</think>\n" + A_CALL
    call = Call("chat", "chatcmpl-x", 0, "m", stream=True, include_usage=False, tools=use(), thinking=False)
    whole = choice_body(call, 0, said, "stop")
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    assert whole["message"]["reasoning_content"] == "The weather tool."
    assert whole["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    _, prepared = plan(1)
    pieces = [said[i : i + 4] for i in range(0, len(said), 4)]
    handle = FakeHandle([Event(p) for p in pieces] + [Event("", result("eos"))])
    events = asyncio.run(collect(openai_http._events(call, prepared, [handle])))
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "The weather tool."
    assert "".join(d.get("content") or "" for d in deltas) == ""  # the blank line after </think> is neither
    calls = [t for d in deltas for t in d.get("tool_calls") or []]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert isinstance(call.tools, ToolUse)


def test_the_responses_api_gives_the_thought_as_a_reasoning_item():
    import asyncio

    from tests.test_openai import FakeHandle, collect, result
    from textgen.api import openai_responses
    from textgen.engine.outputs import Event
    from textgen.engine.params import SamplingParams
    from textgen.frontend.answer import AnswerStream, split_answer
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
    assert all(d["logprobs"] == [] for d in data if d["type"] == "response.output_text.delta")
    # Sent back as input, as the Agents SDK does, a reasoning item is left out of the conversation.
    again = ResponsesRequest.model_validate(
        {"input": [final["output"][0], {"role": "user", "content": "And Italy?"}]}
    )
    assert [m.role for m in again.to_chat().messages] == ["user"]


def test_a_thoughts_tokens_are_not_scored_as_the_message(tiny_model_dir):
    """The Responses API's message logprobs: the tokens of its text, not the thought's before it, in a whole
    answer (replayed token by token) as in its stream."""
    import asyncio

    from tests.test_openai import FakeHandle, collect, result
    from textgen.api import openai_responses
    from textgen.engine.outputs import Event, TokenLogprob
    from textgen.engine.params import SamplingParams
    from textgen.frontend.answer import AnswerStream
    from textgen.frontend.prepare import Choice, Prepared, PromptRequest
    from textgen.frontend.responses_protocol import ResponseShape, ResponsesRequest, message_logprobs
    from textgen.frontend.templates import RenderedPrompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(THOUGHT)["input_ids"]
    scores = [TokenLogprob(t, -float(i)) for i, t in enumerate(ids)]
    answer = result("eos", completion_tokens=len(ids))
    answer.logprobs = scores
    params = SamplingParams(max_new_tokens=20, logprobs=0)
    entries = message_logprobs(tok, [], params, answer, False, None)
    tokens = [e["token"] for e in entries]
    assert "".join(tokens).lstrip() == "Paris." and "</" not in "".join(tokens)
    assert [e["logprob"] for e in entries] == [-float(i) for i in range(len(ids) - len(tokens), len(ids))]
    assert message_logprobs(tok, [], params, answer, None, None)[0]["token"] == tok.decode(ids[:1])

    request = ResponsesRequest.model_validate(
        {"input": "Capital of France?", "include": ["message.output_text.logprobs"]}
    )
    prepared = Prepared(PromptRequest([RenderedPrompt("abc")], params), [[1, 2, 3]], [Choice(0, params)])
    events = [Event(tok.decode([t]), logprobs=[s]) for t, s in zip(ids, scores)]
    handle = FakeHandle(events + [Event("", result("eos"))])
    stream = openai_responses._events(
        ResponseShape(request, "m"), prepared, handle, AnswerStream(False, None), tok
    )
    data = [json.loads(e.removeprefix("data: ")) for e in asyncio.run(collect(stream))]
    streamed = [e for d in data if d["type"] == "response.output_text.delta" for e in d["logprobs"]]
    assert streamed == entries
    assert data[-1]["response"]["output"][1]["content"][0]["logprobs"] == entries
