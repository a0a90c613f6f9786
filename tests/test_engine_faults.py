"""Faults and memory inside the engine (tiny GPT-2, float32, in process): a failing step fails only its own
sequences, the KV budget bounds the running batch, a consumer that falls behind holds bounded memory."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from textgen.engine.core import Engine, kv_reservation, worst_case_tokens
from textgen.engine.handle import MAX_BUFFERED_EVENTS, EventBuffer
from textgen.engine.params import SamplingParams
from textgen.engine.outputs import Event, GenerationResult
from textgen.model.memory import GROWTH_BLOCK, kv_bytes_per_token

POISON = "POISONED"
PROMPTS = [
    "What is AI?",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Rome is",
    "Language models predict the next token",
    f"{POISON} What is the weather like today?",
    "Batching many requests together keeps",
    "Café 東京 🙂",
    "Stop strings end generation early.",
]
GREEDY = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)


class Recorder:
    """An engine observer that keeps what it is told."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.reserved: list[tuple[int, int | None]] = []
        self.cache_bytes: list[int] = []

    def on_step(self, batch_size: int, tokens: int, seconds: float, running: int, waiting: int) -> None:
        pass

    def on_finish(self, result: GenerationResult) -> None:
        pass

    def on_failure(self, kind: str) -> None:
        self.failures.append(kind)

    def on_memory(self, reserved_tokens: int, budget_tokens: int | None, cache_bytes: int) -> None:
        self.reserved.append((reserved_tokens, budget_tokens))
        self.cache_bytes.append(cache_bytes)

    def on_prefix_cache(self, stats: object) -> None:
        pass


def new_engine(loaded, **kwargs) -> Engine:
    return Engine(loaded.model, loaded.tokenizer, context_length=loaded.context_length, **kwargs).start()


@pytest.fixture(scope="module")
def clean_texts(loaded_tiny) -> dict[tuple[str, SamplingParams], str]:
    """Each prompt's text from an engine without faults, submitted all together (the reference)."""
    engine = new_engine(loaded_tiny)
    try:
        out = {}
        for params in (GREEDY, SamplingParams(max_new_tokens=40, seed=7, ignore_eos=True)):
            handles = engine.submit_many([(loaded_tiny.tokenizer.encode(p), params) for p in PROMPTS])
            for prompt, handle in zip(PROMPTS, handles):
                out[prompt, params] = handle.wait(60).text
        return out
    finally:
        engine.stop()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(params=[0, 5], ids=["at-prefill", "at-decode-step-5"])
def faulty_engine(request, loaded_tiny, recorder) -> Iterator[Engine]:
    engine = new_engine(loaded_tiny, observer=recorder, fault_prompt=POISON, fault_after_tokens=request.param)
    yield engine
    engine.stop()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-top-p"])
def test_a_failing_step_fails_only_its_own_sequence(
    faulty_engine, loaded_tiny, clean_texts, recorder, sampled, caplog
):
    params = SamplingParams(max_new_tokens=40, seed=7, ignore_eos=True) if sampled else GREEDY
    caplog.set_level(logging.INFO, logger="textgen")
    handles = faulty_engine.submit_many([(loaded_tiny.tokenizer.encode(p), params) for p in PROMPTS])
    results = {prompt: h.wait(60) for prompt, h in zip(PROMPTS, handles)}

    poisoned = next(p for p in PROMPTS if POISON in p)
    failed = results.pop(poisoned)
    assert failed.finish_reason == "error" and "InjectedFault" in failed.error
    assert failed.completion_tokens == faulty_engine.runner.faults.after_tokens  # stopped where it failed
    for prompt, result in results.items():
        assert result.finish_reason == "length" and result.completion_tokens == 40, prompt
        assert result.text == clean_texts[prompt, params], prompt  # as if nothing had happened
    assert recorder.failures == ["batch", "request"]  # the batched step, then the poisoned row alone

    # Logged once, by request id, and never with a prompt.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    (error,) = errors
    assert handles[PROMPTS.index(poisoned)].request_id in error.getMessage()
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert not any(prompt in logged for prompt in PROMPTS)


def test_a_lone_failing_request_fails_and_the_engine_goes_on(loaded_tiny, recorder):
    engine = new_engine(loaded_tiny, observer=recorder, fault_prompt=POISON, fault_after_tokens=3)
    try:
        failed = engine.submit(loaded_tiny.tokenizer.encode(f"{POISON} alone"), GREEDY).wait(60)
        assert failed.finish_reason == "error" and failed.completion_tokens == 3
        assert recorder.failures == ["request"]  # nothing to retry: it was alone
        after = engine.submit(loaded_tiny.tokenizer.encode("What is AI?"), GREEDY).wait(60)
        assert after.finish_reason == "length" and after.completion_tokens == 40
    finally:
        engine.stop()


def test_the_kv_budget_bounds_the_running_batch_and_every_request_completes(loaded_tiny, recorder):
    context = loaded_tiny.context_length
    budget = kv_reservation(2, context) + GROWTH_BLOCK  # two full contexts, not three
    engine = new_engine(loaded_tiny, observer=recorder, kv_budget_tokens=budget)
    try:
        prompt = loaded_tiny.tokenizer.encode("What is AI?")
        full = SamplingParams(max_new_tokens=context - len(prompt), ignore_eos=True)
        short = SamplingParams(max_new_tokens=5, ignore_eos=True)
        handles = engine.submit_many([(prompt, full)] * 5 + [(prompt, short)] * 3)
        results = [h.wait(120) for h in handles]
    finally:
        engine.stop()
    assert [r.finish_reason for r in results] == ["length"] * 8
    assert max(r.max_batch_size for r in results) == 2  # a third full context never joined
    assert all(reserved <= budget for reserved, _ in recorder.reserved)
    assert max(reserved for reserved, _ in recorder.reserved) == kv_reservation(2, context)
    assert {b for _, b in recorder.reserved} == {budget}
    # The cache really held what was reserved for, and no more.
    per_token = kv_bytes_per_token(loaded_tiny.model)
    assert 0 < max(recorder.cache_bytes) <= kv_reservation(2, context) * per_token


def test_a_budget_below_one_context_is_refused(loaded_tiny):
    with pytest.raises(ValueError, match="one full context"):
        Engine(
            loaded_tiny.model,
            loaded_tiny.tokenizer,
            context_length=loaded_tiny.context_length,
            kv_budget_tokens=loaded_tiny.context_length,
        )


def test_worst_case_counts_the_prompt_and_every_token_it_may_generate(loaded_tiny):
    engine = Engine(loaded_tiny.model, loaded_tiny.tokenizer, context_length=loaded_tiny.context_length)
    seq = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=10)).sequence
    assert worst_case_tokens(seq) == 13
    capped = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4000)).sequence
    assert worst_case_tokens(capped) == loaded_tiny.context_length  # the context caps max_new_tokens


def test_a_consumer_that_falls_behind_holds_a_bounded_number_of_events():
    buffer = EventBuffer()
    for i in range(1000):
        buffer.put(Event(f"{i} ", tokens=i + 1, token_ids=[i]))
    final = GenerationResult("", "length", 1, 1000, 0, 0.0, 0.0, 0.0, 1)
    buffer.put(Event("end", final, tokens=1000))
    assert len(buffer) == MAX_BUFFERED_EVENTS + 1
    events = [buffer.get_nowait() for _ in range(len(buffer))]
    assert "".join(e.text for e in events) == "".join(f"{i} " for i in range(1000)) + "end"  # nothing lost
    assert [t for e in events for t in e.token_ids] == list(range(1000))  # nor a token id
    assert events[-2].tokens == 1000  # the count so far, as the newest folded event had it
    assert events[-1].result is final


def test_a_result_only_consumer_keeps_no_text_events(loaded_tiny):
    engine = new_engine(loaded_tiny)
    try:
        handle = engine.submit(loaded_tiny.tokenizer.encode("What is AI?"), GREEDY)
        result = handle.wait(60)
        time.sleep(0.01)
        assert result.completion_tokens == 40 and len(handle._events) == 0
    finally:
        engine.stop()


def test_a_finished_request_is_freed_without_the_cyclic_garbage_collector(loaded_tiny):
    """No reference cycle through the handle: finished requests (and their generators' native state) go as
    soon as their consumer drops them, not at the next full collection (bench/soak.py found the growth)."""
    import gc
    import weakref

    engine = new_engine(loaded_tiny)
    gc.disable()
    try:
        handle = engine.submit(loaded_tiny.tokenizer.encode("What is AI?"), GREEDY)
        handle.wait(60)
        time.sleep(0.05)  # the engine thread has let go of the finished row
        sequence = weakref.ref(handle.sequence)
        del handle
        assert sequence() is None
    finally:
        gc.enable()
        engine.stop()
