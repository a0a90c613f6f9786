"""Chunked prefill and automatic prefix caching on the tiny GPT-2 (float32, greedy): neither may change
what a request gets, a chunked prompt lets running streams go on, a cancelled half-computed prompt leaves
nothing behind, and cached KV never crosses from one model to another."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from textgen.engine.chunking import PromptFill
from textgen.engine.core import Engine
from textgen.engine.params import SamplingParams
from textgen.engine.prefix_cache import BLOCK, PrefixCache

GREEDY = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
SHARED = (
    "You are a helpful assistant. Answer briefly and truthfully. Examples follow. Question: what is AI? "
    "Answer: the study of machines that learn, reason and act. Question: what is the weather like today? "
    "Answer: it is sunny and warm, with a light breeze. Question: "
)
SUFFIXES = ["what is the capital of France?", "what is the capital of Italy?", "Café 東京 🙂 naïve?"]


def new_engine(loaded, **kwargs) -> Engine:  # type: ignore[no-untyped-def]
    return Engine(loaded.model, loaded.tokenizer, context_length=loaded.context_length, **kwargs).start()


@pytest.fixture(scope="module")
def plain(loaded_tiny):  # type: ignore[no-untyped-def]
    """No chunking (a step may compute any number of prompt tokens) and no prefix cache: the reference."""
    engine = new_engine(loaded_tiny, max_step_tokens=1 << 20, prefix_cache_bytes=0)
    yield engine
    engine.stop()


def long_prompt(encode, n: int = 150) -> list[int]:  # type: ignore[no-untyped-def]
    ids = encode(SHARED * 4)
    assert len(ids) >= n
    return ids[:n]


def wait_until(condition, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.0005)


def test_a_long_prompt_is_computed_in_chunks_while_streams_go_on_and_gets_the_same_tokens(
    loaded_tiny, encode, plain
):
    prompt = long_prompt(encode)
    expected = plain.submit(prompt, GREEDY).wait(30).text
    expected_stream = plain.submit(encode("What is AI?"), LONG).wait(30).text
    engine = new_engine(loaded_tiny, max_step_tokens=16, prefix_cache_bytes=0)
    try:
        stream = engine.submit(encode("What is AI?"), LONG)
        wait_until(lambda: len(stream.sequence.output_ids) >= 3)
        arrived = len(stream.sequence.output_ids)
        late = engine.submit(prompt, GREEDY)
        wait_until(lambda: late.sequence.output_ids != [])
        # 150 tokens at most 16 a step: at least 9 steps, each of which gave the running stream a token.
        assert len(stream.sequence.output_ids) - arrived >= len(prompt) // 16
        assert late.wait(30).text == expected
        assert stream.wait(30).text == expected_stream
    finally:
        engine.stop()


def test_cancelling_a_half_computed_prompt_frees_it_and_the_engine_goes_on(loaded_tiny, encode, plain):
    engine = new_engine(loaded_tiny, max_step_tokens=16, prefix_cache_bytes=0)
    try:
        stream = engine.submit(encode("What is AI?"), LONG)
        wait_until(lambda: len(stream.sequence.output_ids) >= 3)
        late = engine.submit(long_prompt(encode), GREEDY)
        runner = engine.runner

        def half_done() -> bool:
            return any(
                isinstance(f, PromptFill) and f.seq is late.sequence and f.done > 0 for f in runner.filling
            )

        wait_until(half_done)
        late.cancel()
        result = late.wait(10)
        assert result.finish_reason == "cancelled" and result.completion_tokens == 0
        wait_until(lambda: not runner.filling)
        assert runner.rows == [stream.sequence]
        assert (
            engine.submit(encode(SUFFIXES[0]), GREEDY).wait(30).text
            == plain.submit(encode(SUFFIXES[0]), GREEDY).wait(30).text
        )
        assert stream.wait(30).completion_tokens == 200
    finally:
        engine.stop()


def test_a_prefix_cache_hit_gives_the_same_tokens_as_a_miss(loaded_tiny, encode, plain):
    prompts = [encode(SHARED + suffix) for suffix in SUFFIXES]
    expected = [plain.submit(p, GREEDY).wait(30).text for p in prompts]
    engine = new_engine(loaded_tiny, prefix_cache_bytes=1 << 24)
    try:
        missed = engine.submit(prompts[0], GREEDY).wait(30)  # a miss: computes and caches the prefix
        stats = engine.prefix_cache.stats
        assert stats.hit_tokens == 0 and stats.cached_blocks == len(prompts[0]) // BLOCK
        hits = [engine.submit(p, GREEDY).wait(30) for p in prompts]  # all hits
        shared = len(encode(SHARED)) // BLOCK * BLOCK
        assert stats.hit_tokens >= shared * len(prompts)
        assert [r.text for r in [missed] + hits] == [expected[0]] + expected
        # Each result says how many of its prompt's tokens the cache served (usage's cached tokens).
        assert missed.cached_tokens == 0 and all(r.cached_tokens >= shared for r in hits)
        assert sum(r.cached_tokens for r in hits) == stats.hit_tokens
        # Hits arriving together, next to a running stream, still get the same tokens.
        handles = [engine.submit(p, GREEDY) for p in prompts]
        assert [h.wait(30).text for h in handles] == expected
    finally:
        engine.stop()


def test_a_chunked_prompts_blocks_are_cached_as_its_chunks_are_computed(loaded_tiny, encode, plain):
    prompt = long_prompt(encode)
    expected = plain.submit(prompt, GREEDY).wait(30).text
    engine = new_engine(loaded_tiny, max_step_tokens=16, prefix_cache_bytes=1 << 24)
    runner = engine.runner
    cached_before_the_end = []
    complete = runner._complete

    def completing(fill, *args):  # type: ignore[no-untyped-def]
        # The prompt's last chunk is computed: what its earlier chunks left in the cache.
        cached_before_the_end.append((len(engine.prefix_cache.match(prompt)) * BLOCK, fill.done))
        return complete(fill, *args)

    runner._complete = completing
    try:
        stream = engine.submit(encode("What is AI?"), LONG)
        wait_until(lambda: len(stream.sequence.output_ids) >= 3)
        assert engine.submit(prompt, GREEDY).wait(30).text == expected
        ((cached, done),) = cached_before_the_end
        # Every block but those of the last chunk was kept as it came (not all at the end).
        assert cached >= (done - 16) // BLOCK * BLOCK > 0
        assert engine.prefix_cache.stats.cached_blocks == len(prompt) // BLOCK
        # And what was kept is right: a hit on it gives the tokens of a miss.
        assert engine.submit(prompt, GREEDY).wait(30).text == expected
        assert engine.prefix_cache.stats.hit_tokens > 0
    finally:
        engine.stop()


def test_a_prompt_too_short_for_its_beginning_to_be_reused_is_not_cached(loaded_tiny, encode):
    engine = new_engine(loaded_tiny, prefix_cache_bytes=1 << 24)
    try:
        short = encode(SHARED)[:20]  # one full block, but a hit needs more than that (the tiny model: 64)
        engine.submit(short, GREEDY).wait(30)
        assert engine.runner.chunks.worth_reusing() > len(short)
        assert engine.prefix_cache.stats.cached_blocks == 0
        long = encode(SHARED + SUFFIXES[0])
        engine.submit(long, GREEDY).wait(30)
        assert engine.prefix_cache.stats.cached_blocks == len(long) // BLOCK
    finally:
        engine.stop()


def test_the_prefix_cache_stays_within_its_budget_evicting_least_recently_used_leaves(
    loaded_tiny, encode, plain
):
    # Room for 12 blocks: every prompt below has 9 or more of its own, so each insertion evicts.
    config = loaded_tiny.model.config
    block_bytes = 2 * config.n_layer * BLOCK * config.n_embd * 4
    engine = new_engine(loaded_tiny, prefix_cache_bytes=12 * block_bytes)
    try:
        prompts = [encode(f"{i} {i} {i}. " + SHARED) for i in range(6)]
        expected = [plain.submit(p, GREEDY).wait(30).text for p in prompts]
        cache = engine.prefix_cache
        for _ in range(2):
            for prompt, text in zip(prompts, expected):
                assert engine.submit(prompt, GREEDY).wait(30).text == text
                assert cache.stats.cached_bytes <= cache.budget_bytes
        assert cache.stats.evicted_blocks > 0
        # Least recently used goes first: the prompt just served is still whole, the first one is gone.
        assert len(cache.match(prompts[-1])) == (len(prompts[-1]) - 1) // BLOCK
        assert cache.match(prompts[0]) == []
    finally:
        engine.stop()


def test_eviction_never_drops_a_block_whose_children_are_cached() -> None:
    layers, heads, dim = 2, 1, 4
    per_block = 2 * layers * heads * BLOCK * dim * 4
    cache = PrefixCache(3 * per_block, "test")

    def kv(n: int) -> list[torch.Tensor]:
        return [torch.randn(heads, n, dim) for _ in range(layers)]

    chain = list(range(3 * BLOCK + 1))
    cache.insert(chain, kv(len(chain)), kv(len(chain)))
    assert len(cache.match(chain)) == 3
    other = [1000 + t for t in range(BLOCK + 1)]
    cache.insert(other, kv(len(other)), kv(len(other)))  # evicts the chain's leaf, not its root
    assert len(cache.match(chain)) == 2 and len(cache.match(other)) == 1
    assert cache.stats.cached_bytes == 3 * per_block and cache.stats.evicted_blocks == 1
    found = cache.lookup(chain)
    assert found is not None and found.tokens == 2 * BLOCK


def test_a_hit_copies_the_cached_blocks_into_the_new_cache_in_order() -> None:
    """The buffers a hit starts from hold each layer's cached keys and values position by position (the
    blocks concatenated), then zeros up to the capacity asked for."""
    layers, heads, dim = 3, 2, 4
    cache = PrefixCache(1 << 20, "test")
    prompt = list(range(3 * BLOCK + 5))
    keys = [torch.randn(heads, len(prompt), dim) for _ in range(layers)]
    values = [torch.randn(heads, len(prompt), dim) for _ in range(layers)]
    cache.insert(prompt, keys, values)
    found = cache.lookup(prompt)
    assert found is not None and found.tokens == 3 * BLOCK
    got_keys, got_values = found.buffers(capacity=4 * BLOCK)
    assert len(got_keys) == len(got_values) == layers
    for layer in range(layers):
        for got, want in ((got_keys[layer], keys[layer]), (got_values[layer], values[layer])):
            assert got.shape == (1, heads, 4 * BLOCK, dim)
            assert torch.equal(got[0, :, : 3 * BLOCK], want[:, : 3 * BLOCK])
            assert not got[0, :, 3 * BLOCK :].any()


def test_a_hit_takes_a_partly_shared_block_up_to_the_first_different_token() -> None:
    layers, heads, dim = 2, 2, 4
    cache = PrefixCache(1 << 20, "test")
    cached = list(range(4 * BLOCK))
    keys = [torch.randn(heads, len(cached), dim) for _ in range(layers)]
    values = [torch.randn(heads, len(cached), dim) for _ in range(layers)]
    cache.insert(cached, keys, values)
    # The prompt shares 2 blocks and 5 more tokens with the cached one.
    prompt = cached[: 2 * BLOCK + 5] + [999] * 20
    assert len(cache.match(prompt)) == 2 and cache.cached_tokens(prompt) == 2 * BLOCK + 5
    found = cache.lookup(prompt)
    assert found is not None and found.tokens == 2 * BLOCK + 5
    assert cache.stats.hit_tokens == 2 * BLOCK + 5
    got_keys, got_values = found.buffers(capacity=3 * BLOCK)
    for layer in range(layers):
        assert torch.equal(got_keys[layer][0, :, : found.tokens], keys[layer][:, : found.tokens])
        assert torch.equal(got_values[layer][0, :, : found.tokens], values[layer][:, : found.tokens])
        assert not got_keys[layer][0, :, found.tokens :].any()
    # Never the prompt's last token, even when the cached block goes on with it.
    assert cache.cached_tokens(cached[: 2 * BLOCK + 5]) == 2 * BLOCK + 4
    # A prompt sharing no token of the next block gets the whole blocks only.
    assert cache.cached_tokens(cached[: 2 * BLOCK] + [999] * 20) == 2 * BLOCK


def test_a_hit_on_a_partly_shared_block_gives_the_same_tokens_as_a_miss(loaded_tiny, encode, plain):
    # The first prompt goes on past the differing block, so that block is cached whole.
    first = encode(SHARED + SUFFIXES[0] + " Answer in one word, then say in a sentence or two why it is so.")
    second = encode(SHARED + SUFFIXES[1])
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    # The prompts part inside a block, and the first prompt fills that block: it is cached whole.
    assert shared % BLOCK and len(first) >= (shared // BLOCK + 1) * BLOCK
    expected = plain.submit(second, GREEDY).wait(30).text
    engine = new_engine(loaded_tiny, prefix_cache_bytes=1 << 24)
    try:
        engine.submit(first, GREEDY).wait(30)
        assert engine.submit(second, GREEDY).wait(30).text == expected
        assert engine.prefix_cache.stats.hit_tokens == shared  # to the token, not to the block
    finally:
        engine.stop()


def test_the_prefix_cache_never_hands_one_models_kv_to_another(loaded_tiny, encode):
    """Two models with the same tokenizer (a second, perturbed copy of the tiny GPT-2) in one process: the same
    prompt, cached by both, gives each model its own tokens."""
    other = copy.deepcopy(loaded_tiny.model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    prompt = encode(SHARED + SUFFIXES[0])
    engines = [
        new_engine(loaded_tiny, prefix_cache_bytes=1 << 24, model_key="tiny"),
        Engine(
            other,
            loaded_tiny.tokenizer,
            context_length=loaded_tiny.context_length,
            prefix_cache_bytes=1 << 24,
            model_key="tiny perturbed",
        ).start(),
    ]
    try:
        first = [e.submit(prompt, GREEDY).wait(30).text for e in engines]
        again = [e.submit(prompt, GREEDY).wait(30).text for e in engines]
        assert first[0] != first[1]  # otherwise the test could not tell
        assert again == first
        assert all(e.prefix_cache.stats.hit_tokens > 0 for e in engines)
        assert engines[0].prefix_cache.root != engines[1].prefix_cache.root
    finally:
        for e in engines:
            e.stop()


def test_a_rare_slow_step_does_not_move_what_a_decoding_step_is() -> None:
    from textgen.engine.chunking import SHARED_SHARE, STEP_SAMPLES, ChunkSizer, PromptFill

    # Measured with 16 streams (GPT-2 bfloat16, 2-core Xeon): 21-22 ms steps, and a 77 ms one after a join
    # and 33 ms ones where a KV layer outgrew its buffer. The chunks are sized against the usual step.
    sizer = ChunkSizer(512)
    for seconds in [0.077, 0.021, 0.022, 0.033, 0.021] + [0.0215] * (STEP_SAMPLES - 5):
        sizer.decoded(seconds)
    assert sizer.step_seconds == pytest.approx(0.0215)
    fill = PromptFill(seq=None, batch=None, chunk=32, per_token=0.0003)  # type: ignore[arg-type]
    assert sizer.shared_budget(16, fill) == int(SHARED_SHARE * 0.0215 / 0.0003)  # what adds a share of it
    for _ in range(STEP_SAMPLES):
        sizer.decoded(0.030)  # the steps themselves got slower: the reference follows
    assert sizer.step_seconds == pytest.approx(0.030)


def test_the_chunk_fits_a_decoding_step_by_the_fitted_cost_of_a_pass() -> None:
    from textgen.engine.chunking import MIN_CHUNK, ChunkSizer

    sizer = ChunkSizer(512)
    assert sizer.budget(16) == 64  # nothing timed yet
    # Passes measured on a 2-core Xeon (GPT-2 int8): 16 tokens 25.6 ms, 128 tokens 48.8 ms.
    sizer.prefilled(16, 0.0256)
    sizer.prefilled(128, 0.0488)
    fixed, per_token = sizer.cost()  # type: ignore[misc]
    assert fixed == pytest.approx(0.0223, abs=1e-4) and per_token == pytest.approx(0.000207, rel=0.01)
    sizer.decoded(0.2)  # a slow decoding step: room for (0.9 * 200 - 22.3) / 0.207 = 761 tokens, capped
    assert sizer.budget(16) == 512 - 16
    for _ in range(2):
        sizer.decoded(0.034)  # 16 rows: room for 44 tokens, but a chunk keeps its fixed cost to a third
    assert sizer.budget(16) == int(fixed / (2 * per_token))
    assert ChunkSizer(32).budget(30) == MIN_CHUNK and ChunkSizer(0).budget(16) > 1 << 40  # 0: no chunking
