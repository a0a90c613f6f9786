"""The OpenAI-compatible API, driven by the official `openai` client against a live `bentoml serve`."""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.server import start_server
from tests.test_service import metric
from textgen.api import openai as openai_http
from textgen.frontend import openai_protocol as openai_api
from textgen.frontend.prepare import Choice, Prepared, PromptRequest
from textgen.frontend.templates import RenderedPrompt
from textgen.config import Settings
from textgen.api.guards import authorized
from textgen.engine.params import ParamError, SamplingParams
from textgen.engine.outputs import Event, GenerationResult
from textgen.frontend.templates import render_chat

PROMPT = "The quick brown fox"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is AI?"},
]


@pytest.fixture(scope="module")
def client(tiny_server):
    with tiny_server.openai() as c:
        yield c


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def complete(client, model_id, **kwargs):
    return client.completions.create(model=model_id, prompt=kwargs.pop("prompt", PROMPT), **kwargs)


# -- models --------------------------------------------------------------------------------------


def test_models_lists_the_served_model(tiny_server, client, tiny_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-gpt2"]
    assert models[0].object == "model"
    # vLLM's max_model_len: the context, as the server loaded it
    context = json.loads((tiny_model_dir / "config.json").read_text())["n_positions"]
    assert models[0].model_extra["max_model_len"] == context
    # The SDKs' models.retrieve, OpenAI's and Anthropic's
    assert client.models.retrieve("tiny-gpt2").model_dump() == models[0].model_dump()
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert "it serves 'tiny-gpt2'" in missing.value.body["message"]
    with anthropic.Anthropic(base_url=tiny_server.url, api_key="unused", max_retries=0) as claude:
        info = claude.models.retrieve("tiny-gpt2")
    assert (info.id, info.type, info.display_name) == ("tiny-gpt2", "model", "tiny-gpt2")


def test_the_routes_are_in_the_openapi_document(tiny_server):
    doc = httpx.get(f"{tiny_server.url}/docs.json", timeout=30).json()
    for route in ("/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream"):
        assert "post" in doc["paths"][route]
        body = doc["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "Speculative decoding" in body["properties"]["speculative"]["description"]

    def events(route: str) -> str | None:
        """The title of the schema a stream's events' data follow, or None: the route does not stream."""
        stream = doc["paths"][route]["post"]["responses"]["200"]["content"].get("text/event-stream")
        return stream and stream["schema"]["properties"]["data"]["contentSchema"]["anyOf"][0]["title"]

    # Chat sends chunks of its answer's shape; the Responses and Messages APIs typed events holding theirs
    assert events("/v1/chat/completions") == "ChatCompletionResponse"
    assert events("/v1/responses") == "ResponseStreamEvent" and events("/v1/messages") == "MessageStreamEvent"
    assert events("/v1/messages/count_tokens") is None


# -- completions ---------------------------------------------------------------------------------


def test_completion_shape_usage_and_length(client, model_id, tokenizer):
    r = complete(client, model_id, max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == model_id
    assert r.created > time.time() - 600
    (choice,) = r.choices
    assert choice.index == 0 and isinstance(choice.text, str)
    assert choice.finish_reason == "length"  # max_tokens → length
    assert r.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_max_tokens_defaults_to_16_as_openai(client, model_id):
    r = complete(client, model_id, temperature=0)
    assert r.usage.completion_tokens == 16 or r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= 16


def test_greedy_stream_deltas_concatenate_to_the_non_stream_text(client, model_id):
    whole = complete(client, model_id, max_tokens=30, temperature=0)
    chunks = list(
        complete(
            client,
            model_id,
            max_tokens=30,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    finishing = [c for c in text_chunks if c.choices[0].finish_reason is not None]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in text_chunks)
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_sends_no_usage_and_ends_with_done(tiny_server, model_id):
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert all('"usage"' not in e for e in events)


def test_n_choices_with_a_seed_are_reproducible_and_differ(client, model_id):
    kwargs = dict(max_tokens=12, temperature=1.0, n=3, seed=7)
    first, again = complete(client, model_id, **kwargs), complete(client, model_id, **kwargs)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) == 3
    # Choice i uses seed + i: choice 1 of seed 7 is choice 0 of seed 8.
    assert complete(client, model_id, max_tokens=12, temperature=1.0, seed=8).choices[0].text == texts[1]
    assert 3 <= first.usage.completion_tokens <= 36


def test_n_choices_stream_one_finish_reason_each(client, model_id):
    chunks = list(complete(client, model_id, max_tokens=10, temperature=0, n=2, stream=True))
    texts = {0: "", 1: ""}
    finished = {0: 0, 1: 0}
    for c in chunks:
        (choice,) = c.choices
        texts[choice.index] += choice.text
        finished[choice.index] += choice.finish_reason is not None
    assert finished == {0: 1, 1: 1}
    whole = complete(client, model_id, max_tokens=10, temperature=0)
    assert texts == {0: whole.choices[0].text, 1: whole.choices[0].text}  # greedy: both the same


def test_a_list_of_prompts(client, model_id, tokenizer):
    prompts = ["What is AI?", "Paris is the capital of"]
    r = complete(client, model_id, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        alone = complete(client, model_id, prompt=p, max_tokens=6, temperature=0)
        assert r.choices[2 * i].text == r.choices[2 * i + 1].text == alone.choices[0].text
    assert r.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)


def test_stop_cuts_before_the_stop_string(client, model_id):
    text = complete(client, model_id, max_tokens=30, temperature=0).choices[0].text
    stop = text[6:9]
    for s in (stop, [stop, "zzzz"]):
        r = complete(client, model_id, max_tokens=30, temperature=0, stop=s)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].text == text[: text.index(stop)]


def test_vllms_stop_token_ids_and_include_stop_str_in_output(client, model_id, tokenizer):
    def greedy(**extra):
        return complete(client, model_id, max_tokens=30, temperature=0, extra_body=extra).choices[0]

    whole = greedy(ignore_eos=True).text
    ids = tokenizer(whole)["input_ids"]
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])  # a token's first time
    stopped = greedy(stop_token_ids=[ids[k]])
    assert stopped.finish_reason == "stop" and stopped.text == tokenizer.decode(ids[: k + 1])
    stop = whole[6:9]
    kept = greedy(stop=stop, include_stop_str_in_output=True)  # vLLM's extras, in the body as stop is
    assert kept.text == whole[: whole.index(stop) + len(stop)]
    with pytest.raises(openai.BadRequestError) as bad:
        greedy(stop_token_ids=[len(tokenizer) + 5])
    assert bad.value.body["param"] == "stop_token_ids"


def test_vllms_allowed_token_ids_bad_words_and_truncate_prompt_tokens(client, model_id, tokenizer):
    def greedy(logprobs=None, **extra):
        return complete(client, model_id, max_tokens=12, temperature=0, logprobs=logprobs, extra_body=extra)

    said = greedy(ignore_eos=True, logprobs=0).choices[0].logprobs.tokens
    # A word the answer says after a space, one token there (" quick"; "quick" alone is two here, the
    # spaced form vLLM's rule would miss): never said, at the start or after a space
    word = next(w for w in said[1:] if w[0] == " " and w[1:].isalpha())
    tokens = greedy(ignore_eos=True, bad_words=[word.strip()], logprobs=0).choices[0].logprobs.tokens
    assert len(tokens) == 12 and word not in tokens
    ids = tokenizer("".join(said))["input_ids"]
    # Sampled, only the allowed tokens come (their texts, as logprobs name them)
    allowed = sorted(set(ids))[:4]
    sampled = complete(
        client,
        model_id,
        max_tokens=10,
        temperature=1.5,
        seed=2,
        logprobs=0,
        extra_body={"allowed_token_ids": allowed, "ignore_eos": True},
    ).choices[0]
    assert set(sampled.logprobs.tokens) <= {tokenizer.decode([t]) for t in allowed}
    # The prompt's last tokens only
    long_prompt = PROMPT * 40
    kept = complete(
        client, model_id, prompt=long_prompt, max_tokens=2, extra_body={"truncate_prompt_tokens": 5}
    )
    assert kept.usage.prompt_tokens == 5
    context = client.models.retrieve(model_id).max_model_len
    with pytest.raises(openai.BadRequestError) as bad:
        complete(client, model_id, prompt=long_prompt * 10, max_tokens=2)
    assert "truncate_prompt_tokens" in bad.value.body["message"]
    fits = complete(
        client, model_id, prompt=long_prompt * 10, max_tokens=2, extra_body={"truncate_prompt_tokens": -1}
    )
    assert fits.usage.prompt_tokens == context - 2 and fits.usage.completion_tokens == 2
    for extra, param in (
        ({"allowed_token_ids": [len(tokenizer) + 1]}, "allowed_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"bad_words": [" "]}, "bad_words"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            greedy(**extra)
        assert bad.value.body["param"] == param, bad.value.body


def test_vllms_return_token_ids_and_tokens_named_by_id(client, model_id, tokenizer):
    """return_token_ids: the prompt's ids and each choice's, whole and streamed (a chunk's since the last);
    return_tokens_as_token_ids: logprobs name tokens "token_id:N"."""
    extra = {"return_token_ids": True, "ignore_eos": True}
    kw = dict(max_tokens=6, temperature=0, extra_body=extra)
    whole = complete(client, model_id, **kw).choices[0]
    assert whole.prompt_token_ids == tokenizer(PROMPT)["input_ids"] and len(whole.token_ids) == 6
    assert tokenizer.decode(whole.token_ids) == whole.text
    chunks = list(complete(client, model_id, stream=True, **kw))
    assert [t for c in chunks for t in getattr(c.choices[0], "token_ids", None) or []] == whole.token_ids
    assert chunks[0].choices[0].prompt_token_ids == whole.prompt_token_ids
    assert all(getattr(c.choices[0], "prompt_token_ids", None) is None for c in chunks[1:])
    assert not hasattr(complete(client, model_id, max_tokens=2).choices[0], "token_ids")  # only if asked

    messages = [{"role": "user", "content": "Hi"}]
    chat = dict(model=model_id, messages=messages, max_tokens=6, temperature=0, logprobs=True)
    named = extra | {"return_tokens_as_token_ids": True}
    answer = client.chat.completions.create(**chat, extra_body=named)
    ids = answer.choices[0].token_ids
    assert len(ids) == 6 and answer.prompt_token_ids and isinstance(answer.prompt_token_ids[0], int)
    assert [e.token for e in answer.choices[0].logprobs.content] == [f"token_id:{t}" for t in ids]
    chunks = list(client.chat.completions.create(**chat, extra_body=named, stream=True))
    assert chunks[0].prompt_token_ids == answer.prompt_token_ids
    assert [t for c in chunks if c.choices for t in c.choices[0].token_ids or []] == ids


def test_echo_prepends_the_prompt(client, model_id):
    plain = complete(client, model_id, max_tokens=5, temperature=0).choices[0].text
    assert (
        complete(client, model_id, max_tokens=5, temperature=0, echo=True).choices[0].text == PROMPT + plain
    )
    streamed = complete(client, model_id, max_tokens=5, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + plain


def test_textgen_extras_are_accepted_and_default_to_off(client, model_id):
    raw = complete(client, model_id, max_tokens=20, temperature=0).choices[0].text
    off = complete(
        client,
        model_id,
        max_tokens=20,
        temperature=0,
        extra_body={"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "top_k": 0},
    )
    assert off.choices[0].text == raw
    penalised = complete(
        client, model_id, max_tokens=20, temperature=0, extra_body={"repetition_penalty": 1.5}
    )
    assert penalised.choices[0].text != raw
    top_k_1 = complete(client, model_id, max_tokens=20, temperature=1.0, seed=3, extra_body={"top_k": 1})
    assert top_k_1.choices[0].text == raw
    assert complete(client, model_id, max_tokens=3, user="someone").choices


def test_speculative_is_accepted_and_keeps_greedy_text(client, model_id):
    texts = {
        flag: complete(client, model_id, max_tokens=20, temperature=0, extra_body={"speculative": flag})
        .choices[0]
        .text
        for flag in (True, False, None)
    }
    assert texts[True] == texts[False] == texts[None]
    chats = {
        flag: client.chat.completions.create(
            model=model_id, messages=CHAT, max_tokens=20, temperature=0, extra_body={"speculative": flag}
        )
        .choices[0]
        .message.content
        for flag in (True, False)
    }
    assert chats[True] == chats[False]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model_id, messages=CHAT, extra_body={"speculative": 1})
    assert exc.value.body["param"] == "speculative"


# -- chat ----------------------------------------------------------------------------------------


def test_chat_uses_the_fallback_transcript_on_a_model_without_chat_template(client, model_id, tokenizer):
    r = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    transcript = "System: Be brief.\nUser: What is AI?\nAssistant:"
    assert r.usage.prompt_tokens == len(tokenizer(transcript)["input_ids"])
    # The same as completing the transcript with the fallback's stop string.
    same = complete(client, model_id, prompt=transcript, max_tokens=20, temperature=0, stop=["\nUser:"])
    assert choice.message.content == same.choices[0].text
    assert choice.finish_reason == same.choices[0].finish_reason


def test_chat_stream_matches_non_stream(client, model_id):
    whole = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=25, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model_id,
            messages=CHAT,
            max_tokens=25,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in deltas if c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_n_and_max_completion_tokens(client, model_id):
    r = client.chat.completions.create(
        model=model_id, messages=CHAT, max_completion_tokens=4, temperature=0.8, n=2, seed=1
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens <= 8


def test_openais_bookkeeping_fields_are_accepted_and_change_nothing(client, model_id):
    """Code written for OpenAI sends store, metadata, service_tier...: accepted (a misspelt field is not)."""
    plain = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=6, temperature=0)
    kept = dict(store=True, metadata={"run": "1"}, service_tier="auto", prompt_cache_key="k", verbosity="low")
    kept |= dict(safety_identifier="user-1", prompt_cache_retention="24h", modalities=["text"])
    same = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=6, temperature=0, **kept)
    assert same.choices[0].message.content == plain.choices[0].message.content
    answer = client.responses.create(model=model_id, input="Hi", max_output_tokens=4, service_tier="auto")
    assert answer.id.startswith("resp_") and answer.usage.output_tokens <= 4
    hidden = {"include_obfuscation": False}  # the SDK's stream option: textgen pads no events anyway
    chunks = client.chat.completions.create(
        model=model_id,
        messages=CHAT,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True, **hidden},
    )
    assert [c.usage for c in chunks][-1].completion_tokens <= 4
    events = client.responses.create(
        model=model_id, input="Hi", max_output_tokens=4, stream=True, stream_options=hidden, background=False
    )
    assert [e.type for e in events][-1] in ("response.completed", "response.incomplete")
    with pytest.raises(openai.BadRequestError) as bad:  # textgen keeps no responses to run in the background
        client.responses.create(model=model_id, input="Hi", background=True)
    assert bad.value.body["param"] == "background"
    for field, value in (("modalities", ["text", "audio"]), ("stor", True)):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=model_id, messages=CHAT, extra_body={field: value})
        assert bad.value.body["param"] == field


def test_a_prediction_from_the_sdk_keeps_greedy_output(client, model_id):
    # OpenAI's Predicted Outputs (tests/test_speculative.py: the drafts they make)
    greedy = dict(
        model=model_id, messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    plain = client.chat.completions.create(**greedy)
    text = plain.choices[0].message.content
    predicted = client.chat.completions.create(**greedy, prediction={"type": "content", "content": text})
    assert predicted.choices[0].message.content == text
    # Its usage says how much of the prediction the model checked and kept (the SDK's typed fields)
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens >= 0
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=model_id, messages=CHAT, prediction={"type": "content", "content": [{"type": "image"}]}
        )
    assert bad.value.body["param"] == "prediction.content"


def test_usage_counts_the_prompt_tokens_the_prefix_cache_served(tiny_server, client, model_id):
    """Each dialect's own field: OpenAI's prompt_tokens_details.cached_tokens (within prompt_tokens), the
    Responses API's input_tokens_details.cached_tokens, Anthropic's cache_read_input_tokens (apart from
    input_tokens, as Anthropic counts). A prompt's second sending is served from the cache."""
    text = "Question: what is the weather like on the coast in spring? Answer: mild and windy. " * 4
    twice = [complete(client, model_id, prompt=text + "Question:", max_tokens=2) for _ in range(2)]
    assert twice[0].usage.prompt_tokens_details.cached_tokens == 0
    cached = twice[1].usage.prompt_tokens_details.cached_tokens
    assert 16 * (twice[1].usage.prompt_tokens // 16 - 1) <= cached < twice[1].usage.prompt_tokens
    chat = dict(model=model_id, messages=[{"role": "user", "content": text + "Why?"}], max_tokens=2)
    answers = [client.chat.completions.create(**chat) for _ in range(2)]
    assert answers[1].usage.prompt_tokens_details.cached_tokens >= 16
    asked = dict(model=model_id, input=text + "When?", max_output_tokens=2)
    responses = [client.responses.create(**asked) for _ in range(2)]
    assert responses[1].usage.input_tokens_details.cached_tokens >= 16
    with anthropic.Anthropic(base_url=tiny_server.url, api_key="unused", max_retries=0) as claude:
        message = dict(model=model_id, messages=[{"role": "user", "content": text + "How?"}])
        whole = claude.messages.count_tokens(**message).input_tokens
        again = claude.messages.create(**message, max_tokens=2)
        with claude.messages.stream(**message, max_tokens=2) as stream:
            streamed = stream.get_final_message()
    for usage in (again.usage, streamed.usage):
        assert usage.cache_read_input_tokens >= 16  # the chat answers' template and text
        assert usage.input_tokens + usage.cache_read_input_tokens == whole


def test_chat_continues_a_final_assistant_message(client, model_id):
    """vLLM's continue_final_message: the transcript ends with the assistant's words, not a new turn."""
    messages = [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "AI is"}]
    r = client.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=8,
        temperature=0,
        extra_body={"continue_final_message": True},
    )
    same = complete(
        client, model_id, prompt="User: What is AI?\nAssistant: AI is", max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content == same.choices[0].text
    assert r.usage.prompt_tokens == same.usage.prompt_tokens


def test_fallback_template_renders_a_plain_transcript():
    rendered = openai_api.render_fallback_chat(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert rendered.text == "System: S\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant:"
    assert rendered.stop == ("\nUser:",) and rendered.add_special_tokens


def test_a_model_chat_template_is_used_when_present(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    messages = [openai_api.ChatMessage(role="user", content="What is AI?")]
    rendered = openai_api.render_messages(messages, tok)
    assert rendered.text == "<|user|>What is AI?\n<|assistant|>"
    assert rendered == render_chat([{"role": "user", "content": "What is AI?"}], tok)
    assert not rendered.add_special_tokens and rendered.stop == ()


def test_chat_template_kwargs_reach_the_template(tiny_model_dir, client, model_id):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (  # as Qwen3's: an empty thought when thinking is off
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    )
    messages = [openai_api.ChatMessage(role="user", content="Hi")]
    assert openai_api.render_messages(messages, tok).text == "<|user|>Hi\n<|assistant|>"
    off = openai_api.render_messages(messages, tok, template_options={"enable_thinking": False})
    assert off.text == "<|user|>Hi\n<|assistant|><think></think>"
    with pytest.raises(ParamError) as exc:  # textgen's own arguments stay textgen's
        openai_api.render_messages(messages, tok, template_options={"add_generation_prompt": False})
    assert exc.value.field == "chat_template_kwargs"
    with pytest.raises(openai.BadRequestError) as bad:  # GPT-2 has no template to take them
        client.chat.completions.create(
            model=model_id, messages=CHAT, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
        )
    assert bad.value.body["param"] == "chat_template_kwargs"
    # A thinking switch has nothing to turn on a model without a template: the answer is unchanged.
    plain = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=6, temperature=0)
    switched = client.chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=6, temperature=0, reasoning_effort="none"
    )
    assert switched.choices[0].message.content == plain.choices[0].message.content


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=9.0), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=300), "max_tokens"),  # more than the tiny model's context of 256
        (dict(n=0), "n"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-2.1), "frequency_penalty"),
        (dict(logit_bias={"abc": 1}), "logit_bias"),
        (dict(logit_bias={"5": 101}), "logit_bias"),
        (dict(logit_bias={"100000": -1}), "logit_bias"),  # beyond the tiny model's 512 tokens
        (dict(extra_body={"min_p": 1.5}), "min_p"),
        (dict(max_tokens=5, extra_body={"min_tokens": 6}), "min_tokens"),
        (dict(max_tokens=5, extra_body={"max_completion_tokens": 6}), "max_completion_tokens"),
        (dict(extra_body={"ignore_eos": "yes"}), "ignore_eos"),
        (dict(extra_body={"speculative": "yes"}), "speculative"),
        (dict(stop=[""]), "stop"),
        (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
        (dict(extra_body={"top_k": -1}), "top_k"),
        (dict(extra_body={"logit_bias_typo": 1}), "logit_bias_typo"),
        (dict(prompt=" "), "prompt"),
        (dict(prompt=[1, 2, 99999]), "prompt"),  # a token id beyond the vocabulary
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(client, model_id, kwargs, param):
    with pytest.raises(openai.BadRequestError) as exc:
        complete(client, model_id, **kwargs)
    error = exc.value.body
    assert exc.value.status_code == 400
    assert error["param"] == param and param in error["message"]
    assert error["type"] == "invalid_request_error"


def test_invalid_chat_parameters(client, model_id):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model_id, messages=[{"role": "robot", "content": "x"}])
    assert exc.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model_id, messages=[])
    assert exc.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=5, max_completion_tokens=6)
    assert (
        exc.value.body["param"] == "max_completion_tokens" and "max_tokens (5)" in exc.value.body["message"]
    )
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=model_id, messages=CHAT, max_completion_tokens=4, extra_body={"min_tokens": 5}
        )
    assert exc.value.body["message"] == "min_tokens (5) must be at most max_completion_tokens (4)"


def test_content_parts_other_than_text_are_refused_naming_the_message(client, model_id):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    messages = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model_id, messages=messages, max_tokens=2)
    error = exc.value.body
    assert error["param"] == "messages.1.content" and error["type"] == "invalid_request_error"
    assert "messages.1.content.1" in error["message"] and "'image_url'" in error["message"]
    assert "text only" in error["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": [{"type": "text"}]}], max_tokens=2
        )
    assert exc.value.body["param"] == "messages.0.content"


# -- vLLM's and OpenAI's other parameters ------------------------------------------------------------------


def test_content_parts_are_the_same_as_a_string(client, model_id):
    as_parts = [
        CHAT[0],
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "AI?"}]},
    ]
    as_string = [CHAT[0], {"role": "user", "content": "What is\nAI?"}]  # parts are joined by newlines
    kwargs = dict(model=model_id, max_completion_tokens=12, temperature=0)
    parts = client.chat.completions.create(messages=as_parts, **kwargs)
    string = client.chat.completions.create(messages=as_string, **kwargs)
    assert parts.choices[0].message.content == string.choices[0].message.content
    # the same prompt: the second is served from the prefix cache, so only their cached tokens differ
    assert parts.usage.model_dump(exclude={"prompt_tokens_details"}) == string.usage.model_dump(
        exclude={"prompt_tokens_details"}
    )


def test_max_completion_tokens_on_both_routes_and_both_names_when_equal(client, model_id):
    r = complete(client, model_id, temperature=0, extra_body={"max_completion_tokens": 7, "ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    both = complete(
        client,
        model_id,
        temperature=0,
        max_tokens=7,
        extra_body={"max_completion_tokens": 7, "ignore_eos": True},
    )
    assert both.choices[0].text == r.choices[0].text
    chat = client.chat.completions.create(
        model=model_id,
        messages=CHAT,
        max_tokens=6,
        max_completion_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage.completion_tokens == 6 and chat.choices[0].finish_reason == "length"


def test_ignore_eos_and_min_tokens(client, model_id, tokenizer):
    eos = str(tokenizer.eos_token_id)
    # A bias of 100 makes end-of-text the model's only choice.
    ends = complete(client, model_id, max_tokens=10, temperature=0, logit_bias={eos: 100})
    assert ends.usage.completion_tokens == 1 and ends.choices[0].finish_reason == "stop"
    held = complete(
        client, model_id, max_tokens=10, temperature=0, logit_bias={eos: 100}, extra_body={"min_tokens": 4}
    )
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"
    ignored = complete(
        client, model_id, max_tokens=10, logit_bias={eos: 100}, extra_body={"ignore_eos": True}
    )
    assert ignored.usage.completion_tokens == 10 and ignored.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(
        model=model_id,
        messages=CHAT,
        max_tokens=10,
        temperature=0,
        logit_bias={eos: 100},
        extra_body={"min_tokens": 3},
    )
    assert chat.usage.completion_tokens == 4 and chat.choices[0].finish_reason == "stop"


def test_logit_bias_presence_and_frequency_penalties(client, model_id, tokenizer):
    (word,) = tokenizer.encode(" the")
    forced = complete(
        client, model_id, max_tokens=6, logit_bias={str(word): 100}, extra_body={"ignore_eos": True}
    )
    assert forced.choices[0].text == " the" * 6
    raw = complete(client, model_id, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    penalised = complete(
        client,
        model_id,
        max_tokens=20,
        temperature=0,
        frequency_penalty=2,
        presence_penalty=2,
        extra_body={"ignore_eos": True},
    )
    assert penalised.choices[0].text != raw.choices[0].text
    same = complete(client, model_id, max_tokens=20, temperature=0, presence_penalty=0, frequency_penalty=0)
    assert same.choices[0].text == complete(client, model_id, max_tokens=20, temperature=0).choices[0].text


def test_min_p_one_is_greedy(client, model_id):
    greedy = complete(client, model_id, max_tokens=15, temperature=0)
    sampled = complete(client, model_id, max_tokens=15, temperature=1.5, seed=3, extra_body={"min_p": 1.0})
    assert sampled.choices[0].text == greedy.choices[0].text


def test_stop_null_is_accepted(tiny_server, model_id):
    for path, body in (
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": CHAT}),
    ):
        response = httpx.post(
            f"{tiny_server.url}{path}",
            json={**body, "model": model_id, "max_tokens": 3, "stop": None},
            timeout=60,
        )
        assert response.status_code == 200, response.text


def test_continuous_usage_stats_count_each_chunks_tokens(tiny_server, model_id):
    body = {
        "model": model_id,
        "messages": CHAT,
        "max_tokens": 8,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 8  # the last is the usage chunk
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {chunks[-1]["usage"]["prompt_tokens"]}


def test_special_token_strings_users_write_are_text(tiny_server, model_id, tokenizer):
    """Role integrity: "<|endoftext|>" in a message or a /generate prompt is 7 characters, not the token."""
    text = "Hi<|endoftext|>there"
    as_text = len(tokenizer(text, split_special_tokens=True)["input_ids"])
    parsed = len(tokenizer(text)["input_ids"])
    assert as_text > parsed

    def prompt_tokens(path: str, body: dict) -> int:
        response = httpx.post(f"{tiny_server.url}{path}", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    generate = {"prompt": text, "template": "none", "max_new_tokens": 1}
    assert prompt_tokens("/generate", generate) == as_text
    chat = {"model": model_id, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    transcript = f"User: {text}\nAssistant:"
    assert prompt_tokens("/v1/chat/completions", chat) == len(
        tokenizer(transcript, split_special_tokens=True)["input_ids"]
    )
    # A raw completion prompt is the client's own markup: its special tokens stay tokens, as in vLLM.
    assert prompt_tokens("/v1/completions", {"model": model_id, "prompt": text, "max_tokens": 1}) == parsed


def test_generate_takes_the_new_parameters(tiny_server, tokenizer):
    eos = str(tokenizer.eos_token_id)
    body = {
        "prompt": PROMPT,
        "template": "none",
        "max_new_tokens": 10,
        "temperature": 0,
        "min_tokens": 4,
        "logit_bias": {eos: 100},
        "min_p": 0.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
    }
    answer = httpx.post(f"{tiny_server.url}/generate", json=body, timeout=60).json()
    assert answer["finish_reason"] == "eos" and answer["usage"]["completion_tokens"] == 5
    refused = httpx.post(f"{tiny_server.url}/generate", json={**body, "min_tokens": 11}, timeout=60)
    assert refused.status_code == 400 and refused.json()["detail"][0]["loc"] == ["min_tokens"]
    refused = httpx.post(f"{tiny_server.url}/generate", json={**body, "logit_bias": {"x": 1}}, timeout=60)
    assert refused.status_code == 400 and refused.json()["detail"][0]["loc"] == ["logit_bias"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert exc.value.body["param"] == "model" and "tiny-gpt2" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT, max_tokens=2)


def test_model_may_be_omitted(tiny_server):
    body = {"prompt": PROMPT, "max_tokens": 2}
    response = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["model"] == "tiny-gpt2"


def test_the_server_still_answers_after_errors(client, model_id):
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            complete(client, model_id, temperature=-1)
    assert complete(client, model_id, max_tokens=2).usage.completion_tokens <= 2


def test_a_disconnected_stream_cancels_every_choice(tiny_server, model_id):
    cancelled = 'textgen_requests_finished_total{reason="cancelled"}'
    before = metric(tiny_server, cancelled)
    body = {"model": model_id, "prompt": "What is AI?", "max_tokens": 240, "n": 2, "stream": True}
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 3
    while metric(tiny_server, cancelled) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Both choices leave at the next step (unless one happened to end on its own first).
    assert metric(tiny_server, cancelled) >= before + 1
    assert metric(tiny_server, "textgen_running_sequences") == 0


def test_a_client_that_gives_up_on_a_completion_cancels_it(tiny_server, model_id):
    cancelled = 'textgen_requests_finished_total{reason="cancelled"}'
    before = metric(tiny_server, cancelled)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{tiny_server.url}/v1/chat/completions",
            json={"model": model_id, "messages": CHAT, "max_tokens": 200, "n": 3, "temperature": 1},
            timeout=httpx.Timeout(5, read=0.05),
        )
    deadline = time.monotonic() + 3
    while metric(tiny_server, cancelled) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(tiny_server, cancelled) >= before + 1
    assert metric(tiny_server, "textgen_running_sequences") == 0


class FakeHandle:
    """Stands in for an engine RequestHandle: scripted events, and a record of cancel()."""

    def __init__(self, events):
        self.events = events
        self.cancelled = False

    async def stream(self):
        for event in self.events:
            await asyncio.sleep(0)
            yield event

    def cancel(self):
        self.cancelled = True


def result(reason, completion_tokens=2, error=None):
    return GenerationResult("", reason, 3, completion_tokens, 0, 0.0, 0.0, 0.0, 1, error=error)


def plan(choices):
    params = SamplingParams(max_new_tokens=5)
    call = openai_api.Call("completion", "cmpl-x", 0, "m", stream=True, include_usage=True)
    request = PromptRequest([RenderedPrompt("abc")], params, n=choices)
    return call, Prepared(request, [[1, 2, 3]], [Choice(0, params) for _ in range(choices)])


async def collect(events):
    return [e async for e in events]


def test_an_error_after_the_stream_started_is_an_error_event_and_cancels_the_rest():
    failing = FakeHandle([Event("Hel"), Event("", result("error", error="RuntimeError: boom"))])
    other = FakeHandle([Event("a")] * 50 + [Event("", result("length"))])
    events = asyncio.run(collect(openai_http._events(*plan(2), [failing, other])))
    assert events[-1].startswith("data: ")
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["type"] == "server_error" and "boom" in last["error"]["message"]
    assert "data: [DONE]\n\n" not in events
    assert failing.cancelled and other.cancelled  # nobody keeps generating for a dead stream


def test_eos_is_reported_as_stop_and_usage_counts_the_prompt_once():
    handles = [FakeHandle([Event("x"), Event("y", result("eos", 2))]) for _ in range(2)]
    events = asyncio.run(collect(openai_http._events(*plan(2), handles)))
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert sorted(r for r in reasons if r) == ["stop", "stop"]
    usage = chunks[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (3, 4, 7)


# -- API key ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, cache_dir):
    env = {
        "MODEL_NAME": str(tiny_model_dir),
        "TEXTGEN_CACHE_DIR": str(cache_dir),
        "TEXTGEN_THREADS": "1",
        "TEXTGEN_API_KEY": "s3cret-key",
    }
    with start_server(env) as server:
        yield server


def test_api_key_setting_and_check():
    assert Settings.from_env({}).api_key is None
    settings = Settings.from_env({"TEXTGEN_API_KEY": " k3y "})
    assert settings.api_key == "k3y" and "k3y" not in repr(settings)
    assert authorized(None, None)  # no key configured: open
    assert authorized("k3y", "Bearer k3y")
    assert authorized("k3y", "bearer k3y")
    for header in (None, "", "k3y", "Bearer", "Bearer k3", "Basic k3y"):
        assert not authorized("k3y", header)
    assert authorized("k3y", None, "k3y") and authorized("k3y", "Bearer wrong", " k3y ")  # Anthropic's header
    for header in (None, "", "k3", "Bearer k3y"):
        assert not authorized("k3y", None, header)


KEY = {"Authorization": "Bearer s3cret-key"}


def test_api_key_is_required_when_configured(keyed_server):
    def client(key):
        return keyed_server.openai(api_key=key, timeout=60)

    for key in ("wrong", "s3cret-ke", "s3cret-key2"):
        with pytest.raises(openai.AuthenticationError) as exc:
            client(key).completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=2)
        assert "TEXTGEN_API_KEY" in exc.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            client(key).chat.completions.create(model="tiny-gpt2", messages=CHAT, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client(key).models.list()
    no_header = httpx.post(f"{keyed_server.url}/v1/completions", json={"prompt": PROMPT}, timeout=60)
    assert no_header.status_code == 401 and no_header.json()["error"]["code"] == "invalid_api_key"

    # Anthropic's clients send the key as X-Api-Key, and get its errors in Anthropic's shape.
    ask = dict(model="tiny-gpt2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with anthropic.Anthropic(base_url=keyed_server.url, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            wrong.messages.create(**ask)
    assert refused.value.body["error"]["type"] == "authentication_error"
    assert "X-Api-Key" in refused.value.body["error"]["message"]
    with anthropic.Anthropic(base_url=keyed_server.url, api_key="s3cret-key", max_retries=0) as right:
        assert right.messages.create(**ask).content
    good = client("s3cret-key")
    assert good.models.list().data[0].id == "tiny-gpt2"
    assert good.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=2).choices
    assert good.chat.completions.create(model="tiny-gpt2", messages=CHAT, max_tokens=2).choices
    # Every route but health and metrics is behind the key.
    body = {"prompt": PROMPT, "max_new_tokens": 2}
    for path in ("/generate", "/generate_stream"):
        refused = httpx.post(f"{keyed_server.url}{path}", json=body)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["detail"][0]["loc"] == ["header", "authorization"]
        assert httpx.post(f"{keyed_server.url}{path}", json=body, headers=KEY).is_success
    for path in ("/info", "/docs.json", "/"):
        assert httpx.get(f"{keyed_server.url}{path}").status_code == 401
        assert httpx.get(f"{keyed_server.url}{path}", headers=KEY).is_success
    for path in ("/livez", "/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{keyed_server.url}{path}").status_code == 200


def test_the_ui_client_sends_the_api_key(keyed_server):
    from ui.client import TextgenClient, TextgenError

    with TextgenClient(keyed_server.url, api_key="s3cret-key") as client:
        assert client.request_schema().templates
        assert client.generate({"prompt": PROMPT, "max_new_tokens": 2}).text is not None
    with TextgenClient(keyed_server.url, api_key="") as client, pytest.raises(TextgenError) as exc:
        client.generate({"prompt": PROMPT, "max_new_tokens": 2})
    assert "TEXTGEN_API_KEY" in str(exc.value)


# -- a real chat model -----------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_answers_with_its_chat_template(cache_dir):
    with start_server({"MODEL_NAME": "", "TEXTGEN_CACHE_DIR": str(cache_dir)}) as server:
        client = server.openai()
        model = client.models.list().data[0].id
        assert model == "SmolLM2-135M-Instruct"
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=30,
        )
        assert "Paris" in r.choices[0].message.content
