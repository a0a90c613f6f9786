"""Iteration-level batching on the tiny GPT-2 (fp32): batching must never change what a request gets."""

from __future__ import annotations

import dataclasses
import time

import torch

from textgen.engine.batch import DecodeBatch
from textgen.engine.handle import RequestHandle
from textgen.engine.kv_cache import cache_layers
from textgen.engine.outputs import GenerationResult
from textgen.engine.params import SamplingParams
from textgen.engine.sequence import Sequence

GREEDY = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
PROMPTS = [
    "What is AI?",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France; Rome is the capital of",
    "Café 東京 🙂",
]


def wait_for_tokens(handle: RequestHandle, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(handle.sequence.output_ids) < n:
        assert handle.sequence.finish_reason is None, "finished before the others could join"
        assert time.monotonic() < deadline
        time.sleep(0.0005)


def test_greedy_matches_hugging_face_generate(engine, encode, loaded_tiny):
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)  # penalties 1.2 and 2 on
    for prompt in PROMPTS:
        ids = encode(prompt)
        ours = engine.submit(ids, params).wait(30)
        reference = loaded_tiny.model.generate(
            torch.tensor([ids]),
            max_new_tokens=30,
            do_sample=False,
            repetition_penalty=1.2,
            no_repeat_ngram_size=2,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(ids) :]
        assert ours.completion_tokens == 30
        assert ours.text == loaded_tiny.tokenizer.decode(reference, skip_special_tokens=True)


def test_batched_equals_solo_for_prompts_joining_at_different_steps(engine, encode):
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    solo_long = engine.submit(encode(PROMPTS[0]), long).wait(30)
    solo = [engine.submit(encode(p), GREEDY).wait(30) for p in PROMPTS[1:]]

    first = engine.submit(encode(PROMPTS[0]), long)
    wait_for_tokens(first, 5)
    second = engine.submit(encode(PROMPTS[1]), GREEDY)
    wait_for_tokens(first, 20)
    third = engine.submit(encode(PROMPTS[2]), GREEDY)
    results = [first.wait(30), second.wait(30), third.wait(30)]

    assert results[0].text == solo_long.text
    assert [r.text for r in results[1:]] == [s.text for s in solo]
    assert results[0].max_batch_size == 3 and results[2].max_batch_size >= 2


def test_same_seed_same_text_alone_and_in_a_crowd(engine, encode):
    seeded = SamplingParams(max_new_tokens=30, seed=1234, ignore_eos=True)
    alone = engine.submit(encode("What is AI?"), seeded).wait(30)
    crowd = [engine.submit(encode(p), SamplingParams(max_new_tokens=35, ignore_eos=True)) for p in PROMPTS]
    mine = engine.submit(encode("What is AI?"), seeded)
    crowd += [engine.submit(encode(p), SamplingParams(max_new_tokens=25, top_k=5)) for p in PROMPTS]
    result = mine.wait(30)
    for h in crowd:
        h.wait(30)
    assert result.max_batch_size > 1
    assert result.text == alone.text and result.seed == 1234
    other_seed = engine.submit(
        encode("What is AI?"), SamplingParams(max_new_tokens=30, seed=99, ignore_eos=True)
    )
    assert other_seed.wait(30).text != alone.text


def test_stop_string_spanning_two_tokens_stops_and_is_not_emitted(engine, encode, loaded_tiny):
    ids = encode(PROMPTS[1])
    free = engine.submit(ids, GREEDY)
    text = free.wait(30).text
    out_ids = free.sequence.output_ids
    decode = loaded_tiny.tokenizer.decode

    def boundary_stop(k: int) -> str | None:
        """Last char of token k + first char of token k+1, if that is where it first occurs."""
        head, nxt = decode(out_ids[: k + 1]), decode([out_ids[k + 1]])
        if not head or not text.startswith(head) or not nxt or not (head[-1] + nxt[0]).isprintable():
            return None
        stop = head[-1] + nxt[0]
        return stop if text.find(stop) == len(head) - 1 else None

    k, stop = next((k, s) for k in range(2, len(out_ids) - 1) if (s := boundary_stop(k)))
    expected = text[: text.index(stop)]

    handle = engine.submit(
        ids, SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True, stop=(stop,))
    )
    deltas, result = [], None
    while result is None:
        event = handle._events.get(timeout=30)
        deltas.append(event.text)
        result = event.result
    assert result.finish_reason == "stop"
    assert result.text == expected and "".join(deltas) == expected
    assert result.completion_tokens == k + 2  # stopped at the token that completed the stop string


def test_short_request_after_a_long_one_finishes_first(engine, encode):
    long = engine.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=250, ignore_eos=True))
    wait_for_tokens(long, 3)
    short = engine.submit(encode(PROMPTS[1]), SamplingParams(max_new_tokens=5, ignore_eos=True)).wait(30)
    assert short.finish_reason == "length" and short.completion_tokens == 5
    assert long.sequence.finish_reason is None  # still generating
    assert long.wait(30).completion_tokens == 250


def test_cancelled_request_leaves_the_batch_at_the_next_step(engine, encode):
    handle = engine.submit(encode(PROMPTS[0]), SamplingParams(max_new_tokens=250, ignore_eos=True))
    wait_for_tokens(handle, 3)
    handle.cancel()
    result = handle.wait(10)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 250
    deadline = time.monotonic() + 2
    while engine.stats.running and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.stats.running == 0


def test_eos_ends_a_request_unless_ignored(loaded_tiny):
    tokenizer = loaded_tiny.tokenizer
    eos = tokenizer.eos_token_id
    word = tokenizer.encode(" Paris")

    def run(params: SamplingParams) -> list:
        events = []
        seq = Sequence([1, 2], params, tokenizer, {eos}, 256, events.append)
        for token in word + [eos] + word:
            if seq.finish_reason is None:
                seq.append(token)
        return events

    events = run(SamplingParams(max_new_tokens=10))
    assert events[-1].result.finish_reason == "eos"
    assert events[-1].result.text == " Paris"  # the end-of-text token adds no text
    events = run(SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert events[-1].result is None  # still going: EOS was just another token


def test_answers_may_repeat_their_question_when_the_prompt_is_not_penalized(loaded_tiny):
    """no_repeat_ngram_size and repetition_penalty see only the answer when a template frames the prompt."""
    tokenizer = loaded_tiny.tokenizer
    question = tokenizer.encode("the capital of France")
    for penalize, banned_after_of in ((True, True), (False, False)):
        params = SamplingParams(no_repeat_ngram_size=2, penalize_prompt=penalize)
        seq = Sequence(question, params, tokenizer, set(), 256, lambda event: None)
        seq.append(question[2])  # "... of" again: is " France" (which followed " of" in the prompt) banned?
        assert (question[3] in seq.banned_tokens()) is banned_after_of
    vocab = loaded_tiny.model.config.vocab_size
    with torch.inference_mode():
        batch, _ = DecodeBatch.prefill(
            loaded_tiny.model, ["counted", "free"], [question, question], vocab, count_prompt=[True, False]
        )
    assert batch.seen[0, question].all() and not batch.seen[1].any()  # what the repetition penalty sees


def test_prefill_zeroes_only_the_padding_of_shorter_prompts(loaded_tiny):
    vocab = loaded_tiny.model.config.vocab_size
    with torch.inference_mode():
        batch, _ = DecodeBatch.prefill(loaded_tiny.model, ["long", "short"], [[5, 6, 7, 8], [9, 10]], vocab)
    for layer in cache_layers(batch.segments[0].cache):
        for cached in (layer.keys, layer.values):
            assert not cached[1, :, :2].any()  # the short row's two padding positions
            assert cached[1, :, 2:].abs().sum(-1).all() and cached[0].abs().sum(-1).all()


def test_min_tokens_holds_off_end_of_text_and_stop_strings(loaded_tiny):
    tokenizer = loaded_tiny.tokenizer
    eos = tokenizer.eos_token_id
    paris, middle = tokenizer.encode(" Paris"), tokenizer.encode(" the capital")
    params = SamplingParams(max_new_tokens=40, min_tokens=len(paris) + len(middle), stop=(" Paris",))
    events = []
    seq = Sequence([1, 2], params, tokenizer, {eos}, 256, events.append)
    for token in paris + middle:
        assert eos in seq.banned_tokens()  # end-of-text is not sampled yet
        seq.append(token)
        assert seq.finish_reason is None  # " Paris" came too early to stop the text
    assert eos not in seq.banned_tokens()
    for token in paris:
        seq.append(token)
    result = events[-1].result
    assert result.finish_reason == "stop" and result.text == " Paris the capital"
    assert "".join(e.text for e in events) == result.text


def test_stop_token_ids_end_the_text_as_end_of_text_does_and_stop_strings_may_stay(loaded_tiny):
    """vLLM's stop_token_ids (held off by min_tokens, not by ignore_eos; the token's text stays, as vLLM's
    does for a token that is not special) and include_stop_str_in_output."""
    tokenizer = loaded_tiny.tokenizer
    eos = tokenizer.eos_token_id
    words = tokenizer.encode(" Paris is the capital")

    def run(params: SamplingParams, tokens: list[int]) -> tuple[list, GenerationResult]:
        events: list = []
        seq = Sequence([1, 2], params, tokenizer, {eos}, 256, events.append)
        for token in tokens:
            seq.append(token)
            if seq.finish_reason is not None:
                break
        return events, events[-1].result

    stop = words[2]  # " the"
    events, result = run(SamplingParams(max_new_tokens=40, stop_token_ids=(stop,), ignore_eos=True), words)
    assert result.finish_reason == "stop" and result.completion_tokens == 3
    assert result.text == " Paris is the" and "".join(e.text for e in events) == result.text
    held = SamplingParams(max_new_tokens=40, stop_token_ids=(stop,), min_tokens=4)
    seq = Sequence([1, 2], held, tokenizer, {eos}, 256, lambda e: None)
    assert {stop, eos} <= seq.banned_tokens()  # neither is sampled before min_tokens
    _, result = run(held, words + words)
    assert result.completion_tokens == len(words) + 3  # the first " the" came too early
    # The stop string that ended the text, returned with it on request
    kept = SamplingParams(max_new_tokens=40, stop=(" is",), include_stop_str_in_output=True)
    events, result = run(kept, words)
    assert result.text == " Paris is" and "".join(e.text for e in events) == " Paris is"
    assert run(SamplingParams(max_new_tokens=40, stop=(" is",)), words)[1].text == " Paris"


def test_special_tokens_are_left_out_of_the_text_unless_asked_for(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    words = tokenizer.encode(" Paris is")

    def text(**params) -> str:
        events: list = []
        seq = Sequence(
            [1, 2], SamplingParams(max_new_tokens=8, **params), tokenizer, {50256}, 256, events.append
        )
        for token in [*words, end, *words, 50256]:
            seq.append(token)
            if seq.finish_reason is not None:
                break
        assert "".join(e.text for e in events) == events[-1].result.text  # streamed as returned
        return events[-1].result.text

    assert text() == " Paris is Paris is"
    assert text(skip_special_tokens=False) == " Paris is<|im_end|> Paris is"  # not end-of-text's
    assert text(skip_special_tokens=False, stop_token_ids=(end,)) == " Paris is<|im_end|>"


def test_min_tokens_and_logit_bias_in_the_engine(engine, encode, loaded_tiny):
    eos = loaded_tiny.tokenizer.eos_token_id
    ids = encode(PROMPTS[0])
    # A bias of 100 makes end-of-text the only choice: it ends the text at once, or right after min_tokens.
    forced = SamplingParams(max_new_tokens=20, temperature=0, logit_bias=((eos, 100.0),))
    at_once = engine.submit(ids, forced).wait(30)
    assert at_once.finish_reason == "eos" and at_once.completion_tokens == 1
    held = engine.submit(
        ids, SamplingParams(max_new_tokens=20, temperature=0, min_tokens=6, logit_bias=((eos, 100.0),))
    )
    result = held.wait(30)
    assert result.finish_reason == "eos" and result.completion_tokens == 7
    assert eos not in held.sequence.output_ids[:6]


def test_a_bad_words_last_token_is_banned_after_the_rest_of_it(loaded_tiny):
    from textgen.engine.speculative import banned_after

    params = SamplingParams(bad_words_ids=((7,), (5, 6, 9)), no_repeat_ngram_size=0)
    seq = Sequence([5, 6], params, loaded_tiny.tokenizer, set(), 256, lambda event: None)
    assert seq.banned_tokens() == {7}  # a one-token word always; the prompt's "5 6" does not count
    seq.append(5)
    assert seq.banned_tokens() == {7}
    seq.append(6)
    assert seq.banned_tokens() == {7, 9}
    assert banned_after(seq, [8]) == {7} and banned_after(seq, [5, 6]) == {7, 9}  # as drafts are checked


def test_allowed_token_ids_and_bad_words_in_the_engine(engine, encode):
    """vLLM's allowed_token_ids: the only tokens sampled; bad_words (as token sequences): a word's last
    token is never sampled right after the rest of it."""
    ids = encode(PROMPTS[0])
    allowed = tuple(range(100, 140))
    free = dict(temperature=1.5, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, ignore_eos=True)
    handle = engine.submit(ids, SamplingParams(max_new_tokens=30, seed=1, allowed_token_ids=allowed, **free))
    handle.wait(30)
    assert len(handle.sequence.output_ids) == 30 and set(handle.sequence.output_ids) <= set(allowed)
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    plain = engine.submit(ids, greedy)
    plain.wait(30)
    out = plain.sequence.output_ids
    pair = (out[0], out[1])
    banned = engine.submit(ids, dataclasses.replace(greedy, bad_words_ids=(pair,)))
    banned.wait(30)
    got = banned.sequence.output_ids
    assert got[0] == out[0] and got[1] != out[1] and len(got) == 12
    assert pair not in set(zip(got, got[1:]))


def greedy_with_count_penalties(
    model, ids: list[int], n: int, frequency: float, presence: float
) -> list[int]:
    """OpenAI's definition, one full forward pass per token: logit -= frequency * count + presence."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            for token in set(out):
                logits[token] -= frequency * out.count(token) + presence
            out.append(int(logits.argmax()))
    return out


def test_presence_and_frequency_penalties_are_exact_alone_and_in_a_batch(engine, encode, loaded_tiny):
    def params(frequency: float, presence: float) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=25,
            temperature=0,
            ignore_eos=True,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            frequency_penalty=frequency,
            presence_penalty=presence,
        )

    ids = [encode(p) for p in PROMPTS]
    wanted = [(1.5, 0.5), (0.0, 0.0), (-0.5, 2.0)]
    expected = [greedy_with_count_penalties(loaded_tiny.model, i, 25, f, p) for i, (f, p) in zip(ids, wanted)]
    plain = greedy_with_count_penalties(loaded_tiny.model, ids[0], 25, 0.0, 0.0)
    assert expected[0] != plain  # the penalty changed the text, so the comparison below means something
    handles = [engine.submit(i, params(f, p)) for i, (f, p) in zip(ids, wanted)]
    results = [handle.wait(30) for handle in handles]
    assert [h.sequence.output_ids for h in handles] == expected
    assert results[0].max_batch_size == 3  # all three shared the steps
