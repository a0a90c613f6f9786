"""Speculative decoding (textgen/engine/speculative.py) on the tiny GPT-2 in float32: greedy output token for
token the same as without it, stops exact, sampled output seeded and distributed as plain sampling."""

from __future__ import annotations

import collections
import random
from dataclasses import replace

import pytest
import torch
from scipy.stats import chi2

from textgen.engine.core import Engine
from textgen.engine.params import Constraint, ParamError, SamplingParams
from textgen.engine.speculative import ngram_draft

REPETITIVE = "The quick brown fox jumps over the lazy dog. " * 4
PROMPTS = [REPETITIVE, "What is AI?", "Café 東京 🙂"]
PLAIN = dict(repetition_penalty=1.0, no_repeat_ngram_size=0)  # lets the random model loop: drafts accepted
PARAM_SETS = [
    PLAIN,
    {},  # the defaults: repetition_penalty 1.2, no_repeat_ngram_size 2 (drafts mostly rejected)
    dict(
        PLAIN, presence_penalty=0.5, frequency_penalty=0.3, logit_bias=((5, 3.0), (17, -2.0)), min_tokens=20
    ),
    dict(PLAIN, no_repeat_ngram_size=3, penalize_prompt=False),
]


class Counting:
    def __init__(self) -> None:
        self.drafted = self.accepted = 0

    def on_step(self, *args: object) -> None:
        pass

    def on_finish(self, result: object) -> None:
        pass

    def on_failure(self, kind: str) -> None:
        pass

    def on_memory(self, *args: object) -> None:
        pass

    def on_speculation(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted


@pytest.fixture(scope="module")
def counting() -> Counting:
    return Counting()


@pytest.fixture(scope="module")
def engine(loaded_tiny, counting):
    # Speculation off by default: each request says whether it wants it. Batches of up to 4 speculate.
    engine = Engine(
        loaded_tiny.model,
        loaded_tiny.tokenizer,
        context_length=loaded_tiny.context_length,
        observer=counting,
        spec_max_batch=4,
    )
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def encode(loaded_tiny):
    return lambda text: loaded_tiny.tokenizer.encode(text)


def both(engine, ids, params):
    plain = engine.submit(ids, replace(params, speculative=False))
    plain_result = plain.wait(60)
    spec = engine.submit(ids, replace(params, speculative=True))
    return (plain_result, plain.sequence.output_ids), (spec.wait(60), spec.sequence.output_ids)


def test_ngram_draft_takes_the_longest_most_recent_match():
    assert ngram_draft([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3], 2) == [5, 6]  # (2, 3): latest earlier match
    assert ngram_draft([1, 2, 3, 8, 1, 2, 3, 9, 7, 2, 3], 3) == [9, 7, 2]  # (2, 3) beats (3,) by recency
    assert ngram_draft([5, 1, 2, 3, 4, 8, 2, 3, 1, 2, 3], 2) == [4, 8]  # (1, 2, 3) preferred to (2, 3)
    assert ngram_draft([1, 2, 3], 4) == []
    assert ngram_draft([7, 7], 4) == [7]
    assert ngram_draft([1], 4) == []


@pytest.mark.parametrize("extra", PARAM_SETS, ids=["plain", "defaults", "penalties", "ngram3"])
def test_greedy_is_token_for_token_the_same(engine, encode, counting, extra):
    for prompt in PROMPTS:
        params = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True, **extra)
        (a, a_ids), (b, b_ids) = both(engine, encode(prompt), params)
        assert b_ids == a_ids and b.text == a.text and b.finish_reason == a.finish_reason


def test_drafts_are_accepted_on_a_loop_and_rejected_on_random_text(engine, encode, counting, loaded_tiny):
    before = counting.drafted, counting.accepted
    params = SamplingParams(max_new_tokens=80, temperature=0, ignore_eos=True, **PLAIN)
    (a, a_ids), (b, b_ids) = both(engine, encode(REPETITIVE), params)
    assert b_ids == a_ids
    drafted, accepted = counting.drafted - before[0], counting.accepted - before[1]
    assert accepted > 0.5 * drafted > 0  # the random model loops: most drafts are right

    rng = random.Random(0)
    vocab = len(loaded_tiny.tokenizer)
    for _ in range(3):
        ids = [rng.randrange(vocab - 1) for _ in range(60)]
        (a, a_ids), (b, b_ids) = both(engine, ids, replace(params, **{"repetition_penalty": 1.2}))
        assert b_ids == a_ids and b.text == a.text


def test_stop_strings_and_max_new_tokens_are_exact(engine, encode, loaded_tiny):
    ids = encode(REPETITIVE)
    params = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True, **PLAIN)
    free = engine.submit(ids, params)
    text = free.wait(60).text
    out_ids = free.sequence.output_ids
    for n in (1, 2, 3, 4, 7, 13):
        (a, a_ids), (b, b_ids) = both(engine, ids, replace(params, max_new_tokens=n))
        assert b.completion_tokens == a.completion_tokens == n and b_ids == a_ids == out_ids[:n]
    # Stop strings that end inside the text at several places: the same text, tokens and reason.
    decode = loaded_tiny.tokenizer.decode
    stops = {decode(out_ids[k : k + 2]) for k in (3, 10, 25)} | {decode(out_ids[30:31])}
    for stop in sorted(s for s in stops if s.strip()):
        (a, a_ids), (b, b_ids) = both(engine, ids, replace(params, stop=(stop,)))
        assert a.finish_reason == "stop" and text.startswith(a.text)
        assert (b.text, b.finish_reason, b_ids) == (a.text, a.finish_reason, a_ids)


def test_eos_ends_exactly(engine, encode, loaded_tiny):
    # Make end-of-text likely enough to be drafted and chosen somewhere in the output.
    eos = loaded_tiny.tokenizer.eos_token_id
    ids = encode(REPETITIVE) + [eos] + encode(REPETITIVE)
    for bias in (2.0, 4.0, 6.0):
        params = SamplingParams(max_new_tokens=60, temperature=0, logit_bias=((eos, bias),), **PLAIN)
        (a, a_ids), (b, b_ids) = both(engine, ids, params)
        assert (b.text, b.finish_reason, b_ids) == (a.text, a.finish_reason, a_ids)


def test_a_speculating_batch_gives_each_row_its_solo_output(engine, encode):
    params = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True, speculative=True, **PLAIN)
    prompts = [REPETITIVE, "the lazy dog the lazy dog the lazy", "Paris is the capital of France; Rome"]
    solo = [engine.submit(encode(p), params).wait(60).text for p in prompts]
    # submit_many: all rows join the same step, so they are verified together.
    handles = engine.submit_many([(encode(p), params) for p in prompts])
    results = [h.wait(60) for h in handles]
    assert [r.text for r in results] == solo
    assert max(r.max_batch_size for r in results) == 3


def test_seeded_sampling_is_reproducible(engine, encode):
    params = SamplingParams(max_new_tokens=40, seed=7, ignore_eos=True, speculative=True, **PLAIN)
    first = engine.submit(encode(REPETITIVE), params).wait(60)
    again = engine.submit(encode(REPETITIVE), params).wait(60)
    assert first.text == again.text and first.completion_tokens == 40


def exact_joint(model, ids: list[int], steps: int, temperature: float, top_k: int) -> dict[tuple, float]:
    """P(t1..t_steps) under plain top-k sampling, by enumerating every path (top_k ** steps of them)."""
    paths = {(): 1.0}
    for _ in range(steps):
        grown = {}
        for path, p in paths.items():
            with torch.no_grad():
                logits = model(torch.tensor([ids + list(path)])).logits[0, -1].float()
            probs, tokens = torch.softmax(logits / temperature, -1).topk(top_k)
            probs = probs / probs.sum()
            for q, t in zip(probs.tolist(), tokens.tolist()):
                grown[path + (t,)] = p * q
        paths = grown
    return paths


def test_sampled_output_keeps_the_models_distribution(engine, encode, counting, loaded_tiny):
    """Chi-square of the first three tokens of N seeded speculative samples against their exact
    probabilities: a correct implementation exceeds the bound with probability 1e-6."""
    # A prompt that ends in the random model's own greedy loop: its likely tokens are there to be drafted.
    looping = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True, **PLAIN)
    start = encode(REPETITIVE)
    loop = engine.submit(start, looping)
    loop.wait(60)
    ids = start + loop.sequence.output_ids
    temperature, top_k, steps, n = 1.0, 3, 3, 2000
    exact = exact_joint(loaded_tiny.model, ids, steps, temperature, top_k)
    params = SamplingParams(
        max_new_tokens=steps + 1,
        temperature=temperature,
        top_k=top_k,
        top_p=1.0,
        ignore_eos=True,
        speculative=True,
        **PLAIN,
    )
    before = counting.drafted, counting.accepted
    handles = []
    for first in range(0, n, 2):  # pairs: verified together, each keeps as many tokens as the other
        chunk = engine.submit_many([(ids, replace(params, seed=s)) for s in range(first, first + 2)])
        for h in chunk:
            h.wait(60)
        handles += chunk
    seen = collections.Counter(tuple(h.sequence.output_ids[:steps]) for h in handles)
    drafted, accepted = counting.drafted - before[0], counting.accepted - before[1]
    assert 0 < accepted < drafted  # both branches of the rejection sampler ran
    assert set(seen) <= set(exact)
    # Pool the rare outcomes so that every cell expects at least 5.
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for path, p in exact.items():
        if p * n >= 5:
            cells.append((seen[path], p * n))
        else:
            pooled_obs, pooled_exp = pooled_obs + seen[path], pooled_exp + p * n
    if pooled_exp:
        cells.append((pooled_obs, pooled_exp))
    statistic = sum((o - e) ** 2 / e for o, e in cells)
    assert statistic < chi2.ppf(1 - 1e-6, len(cells) - 1), (statistic, len(cells))


def test_settings_choose_the_default_and_reject_unknown_modes():
    from textgen.config import ConfigError, Settings

    settings = Settings.from_env(
        {"TEXTGEN_SPECULATIVE": "ngram", "TEXTGEN_SPEC_TOKENS": "4", "TEXTGEN_SPEC_MAX_BATCH": "2"}
    )
    assert (settings.speculative, settings.spec_tokens, settings.spec_max_batch) == ("ngram", 4, 2)
    assert Settings.from_env({}).speculative == Settings.speculative
    with pytest.raises(ConfigError, match="TEXTGEN_SPECULATIVE"):
        Settings.from_env({"TEXTGEN_SPECULATIVE": "medusa"})


@pytest.fixture(scope="module")
def draft_engines(loaded_tiny, tiny_model_dir, tmp_path_factory):
    """Drafts from the model itself (always right, for greedy) and from another tiny GPT-2 (mostly wrong)."""
    from tests.tiny_model import build_tiny_gpt2
    from textgen.engine.speculative import load_draft_model

    model, context = loaded_tiny.model, loaded_tiny.context_length
    other_dir = tmp_path_factory.mktemp("draft") / "other"
    build_tiny_gpt2(other_dir)
    torch.manual_seed(99)  # different weights, same tokenizer and sizes
    other = load_draft_model(str(other_dir), model, context)
    for p in other.parameters():
        p.data.normal_(0, 0.2)
    engines = {}
    for name, draft in (("self", load_draft_model(str(tiny_model_dir), model, context)), ("other", other)):
        counting = Counting()
        engines[name] = (
            Engine(
                model,
                loaded_tiny.tokenizer,
                context_length=context,
                observer=counting,
                speculative="draft",
                spec_max_batch=4,
                draft_model=draft,
            ).start(),
            counting,
        )
    yield engines
    for engine, _ in engines.values():
        engine.stop()


@pytest.mark.parametrize("extra", PARAM_SETS[:2], ids=["plain", "defaults"])
def test_draft_model_greedy_is_the_same(draft_engines, engine, encode, extra):
    params = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True, **extra)
    for prompt in PROMPTS:
        ids = encode(prompt)
        expected = engine.submit(ids, replace(params, speculative=False))
        expected.wait(60)
        for name, (drafting, counting) in draft_engines.items():
            handle = drafting.submit(ids, params)
            handle.wait(60)
            assert handle.sequence.output_ids == expected.sequence.output_ids, name
    own, own_count = draft_engines["self"]
    if extra is PARAM_SETS[0]:  # the model drafting for itself, unpenalized: every draft is right
        assert own_count.accepted == own_count.drafted > 0


def test_draft_model_must_share_the_vocabulary(loaded_tiny, tmp_path):
    from tests.tiny_model import build_tiny_gpt2
    from textgen.engine.speculative import load_draft_model

    small = build_tiny_gpt2(tmp_path / "small", vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary"):
        load_draft_model(str(small), loaded_tiny.model, loaded_tiny.context_length)


def test_the_server_default_covers_greedy_requests_and_sampled_ones_that_ask():
    from textgen.engine.speculative import Speculator

    on, off = Speculator("ngram"), Speculator("off")
    greedy, sampled = SamplingParams(temperature=0), SamplingParams(seed=1)
    assert on.wants(greedy) and not off.wants(greedy)
    # A seed's text must not change under a server setting, nor depend on the batch: sampled rows opt in.
    assert not on.wants(sampled) and on.wants(replace(sampled, speculative=True))
    assert off.wants(replace(sampled, speculative=True)) and not on.wants(replace(greedy, speculative=False))
    assert not on.wants(replace(greedy, logprobs=2, speculative=True))  # logprobs: never
    assert not on.wants(replace(greedy, constraint=Constraint("regex", "[ab]+"), speculative=True))


# -- the request field (`speculative` on /generate and the OpenAI bodies), through the frontend ---------------


@pytest.fixture(scope="module")
def frontend_off(loaded_tiny):
    """The frontend of a server started with TEXTGEN_SPECULATIVE=off, counting drafted tokens as /metrics does."""
    from textgen.config import Settings
    from textgen.frontend.prepare import Frontend

    counting = Counting()
    frontend = Frontend(
        loaded_tiny, Settings(threads=1, dtype="float32", speculative="off"), observer=counting
    )
    yield frontend, counting
    frontend.close()


def run_body(frontend, request_class, body: dict) -> str:
    """A request body as the HTTP routes take it (pydantic, then the one door), run to its end: the text."""
    return run_prepared(frontend, request_class, body)[1].text


def run_prepared(frontend, request_class, body: dict):
    """As run_body: the prepared request and its result."""
    from textgen.frontend.prepare import Prepared

    request = request_class.model_validate(body)
    (prepared,) = frontend.prepare(
        [request.to_prompt_request(frontend.tokenizer, frontend.sampling_defaults)]
    )
    assert isinstance(prepared, Prepared), prepared
    (handle,) = frontend.submit(prepared)
    return prepared, handle.wait(60)


def test_the_request_field_turns_speculation_on_and_off_per_request(frontend_off):
    from textgen.frontend.generate_protocol import GenerateRequest
    from textgen.frontend.openai_protocol import CompletionRequest

    frontend, counting = frontend_off
    body = dict(
        prompt=REPETITIVE, template="none", max_new_tokens=40, temperature=0, ignore_eos=True, **PLAIN
    )

    def drafted_by(request_class, body: dict) -> tuple[str, int]:
        before = counting.drafted
        text = run_body(frontend, request_class, body)
        return text, counting.drafted - before

    default, none_by_default = drafted_by(GenerateRequest, body)
    null, none_for_null = drafted_by(GenerateRequest, {**body, "speculative": None})
    off, none_when_off = drafted_by(GenerateRequest, {**body, "speculative": False})
    on, drafted = drafted_by(GenerateRequest, {**body, "speculative": True})
    assert none_by_default == none_for_null == none_when_off == 0  # the server's default is off
    assert drafted > 0 and on == off == default == null  # greedy: the same text, speculated or not
    # A sampled request may ask for it too (its default is never to speculate); top_k 1 makes it loop like
    # greedy, so that prompt lookup finds drafts.
    sampled = {**body, "temperature": 0.8, "top_k": 1, "seed": 1}
    _, sampled_drafts = drafted_by(GenerateRequest, {**sampled, "speculative": True})
    assert sampled_drafts > 0
    # The OpenAI bodies carry it the same way (SHARED_SAMPLING_FIELDS).
    completion = dict(prompt=REPETITIVE, max_tokens=40, temperature=0, ignore_eos=True)
    plain, none = drafted_by(CompletionRequest, completion)
    spec, some = drafted_by(CompletionRequest, {**completion, "speculative": True})
    assert none == 0 and some > 0 and spec == plain


def test_a_prediction_drafts_the_answer_and_changes_nothing(frontend_off):
    """OpenAI's Predicted Outputs: the predicted text is a source of drafts (with the server's speculation
    off, a prediction turns it on for its request), and greedy output stays what it is without one. Its
    usage counts the drafts the model checked: accepted when kept, rejected when not."""
    from textgen.frontend.openai_protocol import ChatCompletionRequest, usage_body
    from textgen.frontend.usage import TokenCounts

    frontend, counting = frontend_off
    ask = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "temperature": 0}
    ask |= {"ignore_eos": True, "stop": []}

    def answer(**body) -> tuple[str, int, int]:
        before = counting.drafted, counting.accepted
        prepared, result = run_prepared(frontend, ChatCompletionRequest, {**ask, **body})
        drafted, accepted = counting.drafted - before[0], counting.accepted - before[1]
        details = usage_body(TokenCounts.of(prepared, [result]))["completion_tokens_details"]
        counted = accepted, drafted - accepted
        if "prediction" not in body or body.get("speculative") is False:
            assert counted == (0, 0)
        assert (details["accepted_prediction_tokens"], details["rejected_prediction_tokens"]) == counted
        return result.text, drafted, accepted

    plain, drafted, _ = answer()
    assert drafted == 0  # the server's default is off
    predicted, drafted, accepted = answer(prediction={"type": "content", "content": plain})
    assert predicted == plain and accepted > 0.5 * drafted > 0
    parts = {
        "type": "content",
        "content": [{"type": "text", "text": "unrelated words, "}, {"type": "text", "text": plain}],
    }
    assert answer(prediction=parts)[0] == plain
    assert answer(prediction={"type": "content", "content": "zebra " * 40})[0] == plain  # a wrong one
    assert answer(prediction={"type": "content", "content": plain}, speculative=False)[1:] == (0, 0)
    # The server's limit on a prompt's characters holds for a prediction too
    long = ChatCompletionRequest.model_validate(
        {**ask, "prediction": {"type": "content", "content": "x" * 32001}}
    )
    (refused,) = frontend.prepare([long.to_prompt_request(frontend.tokenizer)])
    assert isinstance(refused, ParamError) and refused.field == "prediction"
