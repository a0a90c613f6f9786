"""Encoder-decoders in the batched engine, on a tiny random T5 (float32): batching never changes a request."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

from textgen.engine.core import Engine
from textgen.engine.params import SamplingParams
from tests.test_engine import wait_for_tokens

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
    config = BartConfig(
        vocab_size=len(loaded_tiny.tokenizer),
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
    bart = randomized(BartForConditionalGeneration(config))
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
