"""Encoder-decoders in the batched engine, on a tiny random T5 (float32): batching never changes a request."""

from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import jsonschema
import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
)

from textgen.config import Settings
from textgen.engine.core import Engine, kv_reservation, widest, worst_case_widths
from textgen.engine.params import Constraint, ParamError, SamplingParams
from textgen.engine.seq2seq import Seq2SeqBatch
from textgen.frontend.prepare import Frontend, Prepared, PromptRequest
from textgen.frontend.templates import RenderedPrompt
from textgen.model.loading import LoadedModel
from textgen.model.memory import GROWTH_BLOCK, kv_budget_tokens, kv_bytes_per_token
from tests.test_engine import wait_for_tokens
from tests.test_engine_faults import Recorder

PROMPTS = [
    "What is AI?",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France; Rome is the capital of",
    "Café 東京 🙂",
]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)  # penalties 1.2 and 2 on


@pytest.fixture(scope="module")
def t5(loaded_tiny):
    config = T5Config(
        vocab_size=len(loaded_tiny.tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )
    return randomized(T5ForConditionalGeneration(config))


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():  # T5's own initialisation makes every position predict the same few tokens
        for weight in model.parameters():
            weight.normal_(0, 0.3)
    return model.eval()


def bart_config(vocab_size: int, **overrides) -> BartConfig:
    values = dict(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        pad_token_id=1,
        eos_token_id=0,
        decoder_start_token_id=0,
        forced_eos_token_id=None,
    )
    return BartConfig(**values | overrides)


@pytest.fixture(scope="module")
def engine(t5, loaded_tiny):
    engine = Engine(t5, loaded_tiny.tokenizer, context_length=256).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def encode(loaded_tiny):
    return lambda text: loaded_tiny.tokenizer.encode(text)


def reference(model, ids: list[int], new_tokens: int) -> list[int]:
    """Hugging Face `generate` with the engine's default greedy parameters."""
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=new_tokens,
        do_sample=False,
        repetition_penalty=1.2,
        no_repeat_ngram_size=2,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id,
        forced_eos_token_id=None,
    )
    return out[0, 1:].tolist()  # after the decoder's start token


def test_batched_equals_solo_equals_hugging_face_generate(engine, encode, t5):
    long = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)
    solo_long = engine.submit(encode(PROMPTS[0]), long)
    solo_text = solo_long.wait(30).text
    assert solo_long.sequence.output_ids == reference(t5, encode(PROMPTS[0]), 60)
    solo = []
    for prompt in PROMPTS[1:]:
        handle = engine.submit(encode(prompt), GREEDY)
        handle.wait(30)
        assert handle.sequence.output_ids == reference(t5, encode(prompt), 24)
        solo.append(handle.sequence.output_ids)
    assert len({tuple(ids) for ids in solo}) == len(solo) and len(set(solo_long.sequence.output_ids)) > 5

    # Prompts of different lengths joining the running batch at different steps.
    first = engine.submit(encode(PROMPTS[0]), long)
    wait_for_tokens(first, 5)
    second = engine.submit(encode(PROMPTS[1]), GREEDY)
    wait_for_tokens(first, 20)
    third = engine.submit(encode(PROMPTS[2]), GREEDY)
    results = [first.wait(30), second.wait(30), third.wait(30)]
    assert first.sequence.output_ids == solo_long.sequence.output_ids
    assert [second.sequence.output_ids, third.sequence.output_ids] == solo
    assert results[0].text == solo_text
    assert results[0].max_batch_size == 3 and results[2].max_batch_size >= 2


def test_tokens_stream_as_they_are_generated(engine, encode):
    handle = engine.submit(
        encode(PROMPTS[1]), SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)
    )
    first = handle._events.get(timeout=30)
    assert first.result is None and first.tokens < 60  # the first text arrives before the last token exists
    assert handle.wait(30).completion_tokens == 60


def test_same_seed_same_text_alone_and_in_a_crowd(engine, encode):
    seeded = SamplingParams(max_new_tokens=30, seed=1234, ignore_eos=True)
    alone = engine.submit(encode("What is AI?"), seeded).wait(30)
    crowd = [engine.submit(encode(p), SamplingParams(max_new_tokens=35, ignore_eos=True)) for p in PROMPTS]
    mine = engine.submit(encode("What is AI?"), seeded)
    crowd += [
        engine.submit(encode(p), SamplingParams(max_new_tokens=25, top_k=5, min_p=0.1)) for p in PROMPTS
    ]
    result = mine.wait(30)
    for h in crowd:
        h.wait(30)
    assert result.max_batch_size > 1
    assert result.text == alone.text and result.seed == 1234
    other = engine.submit(encode("What is AI?"), SamplingParams(max_new_tokens=30, seed=99, ignore_eos=True))
    assert other.wait(30).text != alone.text


def test_parameters_are_honoured(engine, encode):
    ids = encode(PROMPTS[1])
    free = engine.submit(ids, GREEDY)
    text = free.wait(30).text
    # A stop string: the text ends before it, and it is not emitted.
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = engine.submit(
        ids, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, stop=(stop,))
    )
    result = stopped.wait(30)
    assert result.finish_reason == "stop" and result.text == text[: text.index(stop)]
    # max_new_tokens
    short = engine.submit(ids, SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)).wait(30)
    assert short.finish_reason == "length" and short.completion_tokens == 3
    # logit_bias forces end-of-text (id 0); min_tokens holds it off; the count penalties run alongside.
    extras = dict(logit_bias=((0, 100.0),), presence_penalty=1.0, frequency_penalty=0.5)
    forced = engine.submit(ids, SamplingParams(max_new_tokens=8, temperature=0, **extras)).wait(30)
    assert forced.finish_reason == "eos" and forced.completion_tokens == 1
    held = engine.submit(ids, SamplingParams(max_new_tokens=8, temperature=0, min_tokens=3, **extras)).wait(
        30
    )
    assert held.finish_reason == "eos" and held.completion_tokens == 4
    # logprobs: of the chosen token, from the raw distribution, with the top alternatives.
    scored = engine.submit(ids, SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True, logprobs=2))
    result = scored.wait(30)
    assert result.logprobs is not None and len(result.logprobs) == 5
    assert [lp.token for lp in result.logprobs] == scored.sequence.output_ids
    assert all(len(lp.top) == 2 and lp.logprob is not None and lp.logprob <= 0 for lp in result.logprobs)


def test_a_request_asking_for_speculation_is_simply_not_speculated(engine, encode):
    """The seq2seq runner has no speculator (speculative.py drafts for decoder-only models): `speculative`
    true on a request (the HTTP field) is no error, the request just decodes as usual."""
    assert engine.runner.speculator is None
    ids = encode(PROMPTS[1])
    plain = engine.submit(ids, GREEDY).wait(30)
    asked = engine.submit(ids, dataclasses.replace(GREEDY, speculative=True)).wait(30)
    assert asked.finish_reason == plain.finish_reason == "length" and asked.text == plain.text


def test_cancelling_one_row_leaves_the_others_exact(engine, encode):
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    solo = [engine.submit(encode(p), params).wait(30).text for p in PROMPTS[:2]]
    handles = [engine.submit(encode(p), params) for p in PROMPTS]
    wait_for_tokens(handles[2], 3)
    handles[2].sequence.cancelled = True
    results = [h.wait(30) for h in handles]
    assert results[2].finish_reason == "cancelled"
    assert [r.text for r in results[:2]] == solo


def test_a_failing_step_fails_only_its_own_request(t5, loaded_tiny, encode):
    engine = Engine(
        t5, loaded_tiny.tokenizer, context_length=256, fault_prompt="Café", fault_after_tokens=5
    ).start()
    try:
        params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
        solo = engine.submit(encode(PROMPTS[0]), params).wait(30).text
        handles = [engine.submit(encode(p), params) for p in (PROMPTS[0], PROMPTS[2])]
        good, bad = (h.wait(30) for h in handles)
        assert bad.finish_reason == "error" and good.text == solo
    finally:
        engine.stop()


def test_absolute_position_decoders_take_newcomers_when_the_batch_is_empty(loaded_tiny, encode):
    """BART's decoder positions come from the batch's width, so a row may not join mid-way: it waits."""
    bart = randomized(BartForConditionalGeneration(bart_config(len(loaded_tiny.tokenizer))))
    engine = Engine(bart, loaded_tiny.tokenizer, context_length=256).start()
    try:
        first = engine.submit(encode(PROMPTS[1]), GREEDY)
        wait_for_tokens(first, 2)
        later = engine.submit(encode(PROMPTS[0]), GREEDY)
        results = [first.wait(30), later.wait(30)]
        assert [r.max_batch_size for r in results] == [1, 1]
        assert first.sequence.output_ids == reference(bart, encode(PROMPTS[1]), 24)
        assert later.sequence.output_ids == reference(bart, encode(PROMPTS[0]), 24)
        together = engine.submit_many([(encode(p), GREEDY) for p in PROMPTS[:2]])  # one step takes both
        assert [h.wait(30).max_batch_size for h in together] == [2, 2]
        assert [h.sequence.output_ids for h in together] == [
            later.sequence.output_ids,
            first.sequence.output_ids,
        ]
    finally:
        engine.stop()


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_kv_bytes_per_token_is_what_a_seq2seq_batch_really_holds(kind, loaded_tiny, encode):
    """Decoder and encoder sides unlike the generic config fields: the formula must read the decoder's own."""
    vocab = len(loaded_tiny.tokenizer)
    if kind == "t5":  # d_kv 24, not d_model / heads = 16; 3 decoder layers, not the encoder's 1
        config = T5Config(
            vocab_size=vocab,
            d_model=32,
            d_ff=64,
            d_kv=24,
            num_layers=1,
            num_decoder_layers=3,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=0,
            decoder_start_token_id=0,
        )
        model = T5ForConditionalGeneration(config)
    else:  # 3 decoder layers of 4 heads, under 1 encoder layer of 2 heads
        model = BartForConditionalGeneration(
            bart_config(vocab, encoder_layers=1, decoder_layers=3, decoder_attention_heads=4)
        )
    model = randomized(model)
    per_token = kv_bytes_per_token(model)
    assert per_token == 2 * 3 * (2 * 24 if kind == "t5" else 4 * 8) * 4  # float32
    prompts = [encode(p) for p in PROMPTS]
    new_tokens = 20
    with torch.inference_mode():
        batch, logits = Seq2SeqBatch.prefill(model, list(range(3)), prompts, vocab)
        for _ in range(new_tokens - 1):  # the last token is sampled but never fed
            batch.record(logits.argmax(-1))
            logits = batch.step(model)
    encoder_width = max(len(p) for p in prompts)
    (capacity,) = {layer.capacity for layer in batch.cache.self_attention_cache.layers}
    assert new_tokens <= capacity <= new_tokens + GROWTH_BLOCK  # start token + 19 fed, and the spare room
    assert batch.kv_bytes() == per_token * 3 * (encoder_width + capacity)
    # ... which the engine's worst case for these rows covers.
    widths = [(len(p), new_tokens) for p in prompts]
    assert batch.kv_bytes() <= per_token * kv_reservation(3, widest(widths))
    # The default budget is a real one now (here every row at full context: the model is tiny) ...
    assert kv_budget_tokens(model, 256, Settings(max_batch_size=4)) == 4 * (256 + GROWTH_BLOCK)
    # ... except for an encoder-decoder whose config names no decoder shape it knows.
    unknown = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=True, model_type="other"))
    assert kv_budget_tokens(unknown, 256, Settings()) is None


def test_the_kv_budget_queues_seq2seq_requests_and_each_completes_as_alone(t5, engine, encode, loaded_tiny):
    # Long prompts with short outputs, short prompts with long ones: a batch pads both sides to their longest.
    requests = [
        (encode(PROMPTS[1]), SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)),
        (encode(PROMPTS[0]), SamplingParams(max_new_tokens=150, temperature=0, ignore_eos=True)),
        (encode(PROMPTS[2]), SamplingParams(max_new_tokens=90, temperature=0, ignore_eos=True)),
    ] * 2
    alone = [engine.submit(ids, params).wait(60).text for ids, params in requests]
    widths = [(len(ids), params.max_new_tokens) for ids, params in requests]
    assert widest(widths) == len(encode(PROMPTS[1])) + 150  # one row's prompt, another's output
    budget = kv_reservation(2, widest(widths))  # two rows of the widest mix, never three
    assert budget >= 256 + GROWTH_BLOCK and kv_reservation(3, widest(widths)) > budget
    recorder = Recorder()
    bounded = Engine(
        t5, loaded_tiny.tokenizer, context_length=256, kv_budget_tokens=budget, observer=recorder
    ).start()
    try:
        handles = bounded.submit_many(requests)
        results = [h.wait(60) for h in handles]
        assert [worst_case_widths(h.sequence, True) for h in handles] == widths
    finally:
        bounded.stop()
    assert [r.text for r in results] == alone
    assert [r.finish_reason for r in results] == ["length"] * 6
    assert max(r.max_batch_size for r in results) == 2  # they queued, and still shared steps
    assert {b for _, b in recorder.reserved} == {budget}
    assert max(reserved for reserved, _ in recorder.reserved) <= budget
    per_token = kv_bytes_per_token(t5)
    for (reserved, _), held in zip(recorder.reserved, recorder.cache_bytes):
        assert held <= reserved * per_token  # what the cache held, never more than what was reserved


# -- structured output ---------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
    },
    "required": ["color", "count"],
    "additionalProperties": False,
}


def test_json_schema_output_parses_and_validates_for_every_seed(engine, encode):
    params = [
        SamplingParams(
            max_new_tokens=60,
            temperature=1.0,
            seed=seed,
            constraint=Constraint("json_schema", json.dumps(SCHEMA)),
        )
        for seed in range(8)
    ]
    handles = engine.submit_many([(encode(PROMPTS[1]), p) for p in params])
    results = [h.wait(60) for h in handles]
    for result in results:
        assert result.finish_reason == "eos", result  # the grammar ended it, not the token budget
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert len({r.text for r in results}) > 2  # sampled: the masks constrain, they do not decide
    assert max(h.sequence.max_batch_size for h in handles) == 8  # all in one batch


def test_the_guide_follows_the_decoder_not_the_encoder_prompt(engine, encode):
    # The prompt is itself a complete answer: a guide fed the encoder's tokens would be finished before the
    # first step (and an empty output would not parse).
    answer = '{"color": "red", "count": 3}'
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    handle = engine.submit(
        encode(answer), SamplingParams(max_new_tokens=60, temperature=0, constraint=constraint)
    )
    result = handle.wait(30)
    assert result.finish_reason == "eos" and result.completion_tokens > 5
    jsonschema.validate(json.loads(result.text), SCHEMA)
    # The decoder's tokens alone, replayed through a fresh guide, are a complete sentence of the grammar.
    replay = engine.grammars.guide(constraint)
    for token in handle.sequence.output_ids:
        replay.advance(token)  # raises if the token broke the grammar
    assert replay.matcher.is_accepting()


def test_regex_and_choice_hold_and_free_rows_are_untouched(engine, encode):
    pattern = r"[A-Z][a-z]{2,6} (is|was) [0-9]{1,3}"
    choices = ["sunny and warm", "cold", "raining"]
    free = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    alone = engine.submit(encode(PROMPTS[0]), free).wait(30).text
    for seed in range(5):
        regex = SamplingParams(
            max_new_tokens=40, seed=seed, temperature=1.0, constraint=Constraint("regex", pattern)
        )
        choice = SamplingParams(
            max_new_tokens=40,
            seed=seed,
            temperature=1.0,
            constraint=Constraint("choice", json.dumps(choices)),
        )
        handles = engine.submit_many(
            [(encode(PROMPTS[1]), regex), (encode(PROMPTS[2]), choice), (encode(PROMPTS[0]), free)]
        )
        text, chosen, unconstrained = (h.wait(30).text for h in handles)
        assert re.fullmatch(pattern, text), text
        assert chosen in choices
        assert unconstrained == alone  # float32, greedy: a free row's text is its own


def frontend_for(model, tokenizer) -> Frontend:
    loaded = LoadedModel(model, tokenizer, "tiny-t5", "test", 256, "float32")
    return Frontend(loaded, Settings(max_batch_size=4, speculative="off"))


def constrained(constraint: Constraint) -> PromptRequest:
    params = SamplingParams(max_new_tokens=40, temperature=0, constraint=constraint)
    return PromptRequest([RenderedPrompt(PROMPTS[1], user_text=PROMPTS[1])], params)


def test_the_frontend_takes_structured_requests_for_an_encoder_decoder(t5, loaded_tiny):
    frontend = frontend_for(t5, loaded_tiny.tokenizer)
    try:
        frontend.warmup()
        schema = Constraint("json_schema", json.dumps(SCHEMA), "structured_outputs.json")
        (prepared,) = frontend.prepare([constrained(schema)])
        assert isinstance(prepared, Prepared), prepared
        result = frontend.submit(prepared)[0].wait(30)
        jsonschema.validate(json.loads(result.text), SCHEMA)
        # What does not compile is still a 400 naming the field.
        (error,) = frontend.prepare([constrained(Constraint("regex", "(", "guided_regex"))])
        assert isinstance(error, ParamError) and error.field == "guided_regex"
    finally:
        frontend.close()


def test_a_t5_tokenizer_cannot_be_constrained_and_the_400_says_why(t5, caplog):
    """T5's own tokenizer (SentencePiece, a Metaspace decoder, no byte fallback) is one llguidance cannot
    index: the refusal is the tokenizer's, with the reason, and the server still starts. The vocabulary is
    indexed when a request first asks for structured output, not at start: the log says it then, once."""
    frontend = frontend_for(t5, T5Tokenizer())
    unavailable = "structured output is not available"
    try:
        frontend.warmup()
        assert not any(unavailable in r.getMessage() for r in caplog.records)
        for _ in range(2):
            (error,) = frontend.prepare([constrained(Constraint("choice", '["a"]', "guided_choice"))])
            assert isinstance(error, ParamError) and error.field == "guided_choice"
            assert "Metaspace" in error.message and "T5" in error.message and "byte fallback" in error.message
        assert sum(unavailable in r.getMessage() for r in caplog.records) == 1
        # ignore_eos: the random tiny T5 may well draw its EOS first (CI, session 36: 1 token of 3)
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        plain = PromptRequest([RenderedPrompt("Hello", user_text="Hello")], params)
        (prepared,) = frontend.prepare([plain])
        assert frontend.submit(prepared)[0].wait(30).completion_tokens == 3  # free text is unaffected
    finally:
        frontend.close()
