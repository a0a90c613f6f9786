"""The running batch in segments (textgen/engine/batch.py) on the tiny GPT-2, float32, greedy: rows of very
different lengths decode in segments of their own, and every row computes what it computes alone, whatever
the segments do around it (join, merge, leave, undo a step, verify drafts)."""

from __future__ import annotations

import random
import time

import pytest
import torch

from textgen.engine import batch as batch_module
from textgen.engine.batch import DecodeBatch
from textgen.engine.speculative import commit, verify_forward
from textgen.model.attention import use_decode_attention

VOCAB_USED = 500  # the tiny tokenizer's vocabulary is 512


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB_USED) for _ in range(length)]


def start(model, prompts: list[list[int]], rows: list[int]) -> DecodeBatch:  # type: ignore[no-untyped-def]
    batch, logits = DecodeBatch.prefill(model, rows, prompts, model.config.vocab_size)
    batch.record(logits.argmax(-1))
    return batch


def solo(model, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:  # type: ignore[no-untyped-def]
    """Greedy tokens of one prompt decoded alone (the first from its prefill, then `steps` more), and the
    logits of its decoding steps [steps, V]."""
    batch = start(model, [ids], [0])
    tokens, logits = [int(batch.next_tokens[0, 0])], []
    for _ in range(steps):
        logits.append(batch.step(model)[0])
        batch.record(logits[-1].argmax(-1, keepdim=True))
        tokens.append(int(batch.next_tokens[0, 0]))
    return tokens, torch.stack(logits) if logits else torch.zeros(0)


class Decoder:
    """A segmented batch of rows with their greedy tokens so far, keyed by row name."""

    def __init__(self, model) -> None:  # type: ignore[no-untyped-def]
        self.model, self.batch, self.tokens, self.logits = model, None, {}, {}

    def join(self, name: int | list[int], ids: list[int] | list[list[int]]) -> None:
        """One row, or rows prefilled together (`name` a list, `ids` their prompts)."""
        names, prompts = (name, ids) if isinstance(name, list) else ([name], [ids])
        fresh = start(self.model, prompts, names)
        for row, token in zip(names, fresh.next_tokens[:, 0].tolist()):
            self.tokens[row], self.logits[row] = [token], []
        if self.batch is None:
            self.batch = fresh
        else:
            self.batch.concatenate(fresh, segmented=True)

    def step(self, times: int = 1) -> None:
        for _ in range(times):
            logits = self.batch.step(self.model)
            self.batch.record(logits.argmax(-1))
            for name, token, row_logits in zip(
                self.batch.rows, self.batch.next_tokens[:, 0].tolist(), logits
            ):
                self.tokens[name].append(token)
                self.logits[name].append(row_logits)

    def leave(self, name: int) -> None:
        self.batch.filter([i for i, row in enumerate(self.batch.rows) if row != name])


def check_against_solo(model, decoder: Decoder, prompts: dict[int, list[int]]) -> None:  # type: ignore[no-untyped-def]
    """Same tokens, and logits equal to float32 rounding (a mask or a row mix-up moves them far more)."""
    for name, tokens in decoder.tokens.items():
        expected_tokens, expected_logits = solo(model, prompts[name], len(tokens) - 1)
        assert tokens == expected_tokens, f"row {name}"
        if decoder.logits[name]:
            torch.testing.assert_close(
                torch.stack(decoder.logits[name]), expected_logits, rtol=1e-4, atol=1e-4
            )


def test_a_long_row_joins_short_ones_in_a_segment_of_its_own_and_every_row_decodes_as_alone(model):
    prompts = {0: prompt(5, 0), 1: prompt(9, 1), 2: prompt(170, 2), 3: prompt(12, 3), 4: prompt(7, 4)}
    prompts[5] = prompt(8, 5)
    decoder = Decoder(model)
    decoder.join(0, prompts[0])
    decoder.join([1, 4, 5], [prompts[1], prompts[4], prompts[5]])  # a few columns apart: merged with row 0
    assert len(decoder.batch.segments) == 1
    decoder.step(3)
    decoder.join(2, prompts[2])  # 170 against 12: four rows would be padded by ~160 columns each
    assert [len(s) for s in decoder.batch.segments] == [4, 1]
    assert decoder.batch.segments[0].width < 20  # the short rows were not re-laid to 170 positions
    decoder.step(2)
    decoder.join(3, prompts[3])  # close to the short rows: it goes to their segment, before the long row
    assert [len(s) for s in decoder.batch.segments] == [5, 1]
    assert decoder.batch.rows == [0, 1, 4, 5, 3, 2]
    decoder.step(6)
    decoder.leave(2)  # the long row's segment goes with it
    assert len(decoder.batch.segments) == 1
    decoder.step(2)
    check_against_solo(model, decoder, prompts)


@pytest.fixture
def split_easily(monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment of its own for any join that would pad more than 64 positions (a few rows of the tiny
    model's 256 positions could not reach the real limit)."""
    monkeypatch.setattr(batch_module, "MERGE_PADDING", 64)


def test_beyond_the_segment_limit_the_cheapest_pair_is_merged(model, split_easily):
    lengths = [4, 45, 90, 135, 180]  # groups of 4 rows: merging any two pads 4 x 41 columns or more
    prompts = {4 * g + i: prompt(n, 4 * g + i) for g, n in enumerate(lengths) for i in range(4)}
    decoder = Decoder(model)
    for g in range(len(lengths)):
        names = list(range(4 * g, 4 * g + 4))
        decoder.join(names, [prompts[name] for name in names])
        assert len(decoder.batch.segments) == min(g + 1, batch_module.MAX_SEGMENTS)
        decoder.step()
    assert sum(len(s) for s in decoder.batch.segments) == len(prompts)
    assert sorted(len(s) for s in decoder.batch.segments) == [4, 4, 4, 8]
    decoder.leave(9)  # rows leave from the middle of the batch and of a merged segment
    decoder.leave(0)
    decoder.step(2)
    check_against_solo(model, decoder, prompts)


def test_a_failed_step_is_undone_in_every_segment(model, split_easily):
    decoder = Decoder(model)
    decoder.join(0, prompt(6, 20))
    decoder.join(1, prompt(160, 21))
    assert len(decoder.batch.segments) == 2
    decoder.step(2)
    batch = decoder.batch
    checkpoint = batch.checkpoint()
    first = batch.step(model)
    batch.rollback(checkpoint)
    assert [s.width for s in batch.segments] == [m.shape[1] for m in checkpoint.masks]
    torch.testing.assert_close(batch.step(model), first, rtol=0, atol=0)
    alone = batch.take([1])  # the retry path: one row copied out of its segment
    assert alone.rows == [1] and len(alone.segments) == 1


def test_verifying_drafts_across_segments_equals_feeding_them_one_by_one(model, split_easily):
    decoder = Decoder(model)
    decoder.join(0, prompt(7, 30))
    decoder.join(1, prompt(170, 31))
    decoder.step(2)
    drafts = [prompt(3, 32), prompt(3, 33)]
    reference = decoder.batch.take([0, 1])
    expected = []
    for j in range(4):
        expected.append(reference.step(model))
        if j < 3:
            reference.record(torch.tensor([drafts[0][j], drafts[1][j]]))
    batch = decoder.batch
    widths = [s.width for s in batch.segments]
    logits = verify_forward(model, batch, drafts)
    torch.testing.assert_close(logits, torch.stack(expected, 1), rtol=1e-4, atol=1e-4)
    commit(batch, 4, [drafts[0][:2], drafts[1][:2]])  # one draft accepted, then the next input
    assert [s.width for s in batch.segments] == [w + 2 for w in widths]


def test_a_chunk_in_the_decoding_pass_gives_what_it_gives_apart(model, split_easily):
    """A prompt's chunk computed in the decoding step's pass: the rows' logits are the step's, the chunk's
    are what computing it on its own gives, and its cache goes on as if it had been."""
    decoder = Decoder(model)
    decoder.join([0, 1], [prompt(6, 70), prompt(9, 71)])
    decoder.join(2, prompt(120, 72))
    decoder.step(2)
    long = prompt(90, 73)
    reference, mixed = (DecodeBatch.start(9, long, model.config.vocab_size, False) for _ in range(2))
    expected_rows = decoder.batch.take([0, 1, 2]).step(model)
    for done, n in ((0, 30), (30, 40), (70, 20)):  # the first chunk creates the prompt's cache
        expected_chunk = reference.extend(model, long[done : done + n])
        rows, chunk = decoder.batch.forward(model, decoder.batch.next_tokens, (mixed, long[done : done + n]))
        decoder.batch.record(rows[:, -1].argmax(-1))
        torch.testing.assert_close(chunk, expected_chunk, rtol=1e-4, atol=1e-4)
        if done == 0:
            torch.testing.assert_close(rows[:, -1], expected_rows, rtol=1e-4, atol=1e-4)
    assert mixed.width == reference.width == 90
    mixed.record(chunk.argmax(-1))
    reference.record(expected_chunk.argmax(-1))
    torch.testing.assert_close(mixed.step(model), reference.step(model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("staggered", [False, True])
def test_a_prompt_filled_chunk_by_chunk_never_reads_the_room_its_chunks_have_not_written(model, staggered):
    """A long prompt's room is reserved at once but not zeroed ahead of its chunks (a 1000-token room
    zeroed in one step cost the running streams a 35-90 ms gap): every reader, Hugging Face's attention
    (a chunk alone) and textgen's (a chunk in the decoding pass), gets its written part only. Proved by
    filling the unwritten room with NaN: the logits stay those of the whole prompt at once."""
    vocab = model.config.vocab_size
    long = prompt(100, 74)
    whole, expected = DecodeBatch.prefill(model, [9], [long], vocab)
    filling = DecodeBatch.start(9, long, vocab, False, staggered=staggered)
    decoder = Decoder(model)
    decoder.join([0, 1], [prompt(6, 75), prompt(9, 76)])
    filling.extend(model, long[:16])  # the first chunk makes each layer: the room comes with the second
    filling.extend(model, long[16:40])
    for layer in filling.segments[0].layers():
        assert layer.length < layer.unwritten <= layer.capacity - 1  # the room is there, not yet zeroed
        layer._keys[:, :, layer.length : layer.unwritten] = float("nan")
        layer._values[:, :, layer.length : layer.unwritten] = float("nan")
    rows, _ = decoder.batch.forward(model, decoder.batch.next_tokens, (filling, long[40:70]))
    decoder.batch.record(rows[:, -1].argmax(-1))
    last = filling.extend(model, long[70:])
    torch.testing.assert_close(last, expected, rtol=1e-4, atol=1e-4)
    for layer in filling.segments[0].layers():  # past the prompt, its spare room: zeros
        assert layer.length >= layer.unwritten and not layer._keys[:, :, layer.length :].any()


def test_a_model_with_its_own_attention_keeps_one_segment(loaded_tiny):
    """The segments need textgen's decode attention; another attention gets one left-padded cache."""
    model = loaded_tiny.model
    model.set_attn_implementation("sdpa")
    try:
        batch = start(model, [prompt(5, 40)], [0])
        batch.concatenate(start(model, [prompt(150, 41)], [1]), segmented=False)
        assert len(batch.segments) == 1
        tokens = [int(batch.next_tokens[1, 0])]
        for _ in range(3):
            batch.record(batch.step(model).argmax(-1))
            tokens.append(int(batch.next_tokens[1, 0]))
        assert tokens == solo(model, prompt(150, 41), 3)[0]
    finally:
        use_decode_attention(model)


def test_the_engine_puts_a_long_prompt_in_a_segment_of_its_own_and_everyone_gets_the_same_text(
    loaded_tiny, encode
):
    from textgen.engine.core import Engine
    from textgen.engine.params import SamplingParams

    streams = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    late = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    short = [encode(text) for text in ("What is AI?", "Paris is the", "The quick brown fox", "Rome")]
    long = prompt(170, 50)

    def run(engine: Engine) -> tuple[list[str], str, int]:
        handles = [engine.submit(ids, streams) for ids in short]
        deadline = time.monotonic() + 30
        while min(len(h.sequence.output_ids) for h in handles) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        arrival = engine.submit(long, late)
        most = 0
        while arrival.sequence.finish_reason is None:
            batch = engine.runner.batch
            most = max(most, len(batch.segments) if batch is not None else 0)
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        return [h.wait(30).text for h in handles], arrival.wait(30).text, most

    results, passes_apart = [], []
    for segmented in (True, False):
        engine = Engine(loaded_tiny.model, loaded_tiny.tokenizer, context_length=loaded_tiny.context_length)
        if not segmented:
            engine.runner.model.set_attn_implementation("sdpa")  # one left-padded cache
        apart = engine.runner._advance
        calls: list[int] = []
        engine.runner._advance = lambda fill, chunk: calls.append(chunk) or apart(fill, chunk)
        engine.start()
        try:
            results.append(run(engine))
        finally:
            engine.stop()
            use_decode_attention(loaded_tiny.model)
        passes_apart.append(len(calls))
    (texts, text, most), (plain_texts, plain_text, plain_most) = results
    assert most == 2 and plain_most == 1
    # Segmented, every chunk of the long prompt shared a decoding step's pass; otherwise each had its own.
    assert passes_apart[0] == 0 and passes_apart[1] >= 2
    assert (texts, text) == (plain_texts, plain_text)


def test_a_long_prompt_whose_shared_pass_fails_fails_alone(loaded_tiny, encode):
    """The chunk shares the streams' pass; when that pass fails because of the long prompt, both are undone
    and done apart: the prompt fails, the streams go on with the text they get alone."""
    from textgen.engine.core import Engine
    from textgen.engine.params import SamplingParams

    streams = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)
    short = [encode(text) for text in ("What is AI?", "Paris is the")]
    poisoned = encode("POISON ") + prompt(160, 60)
    expected = []
    engine = Engine(loaded_tiny.model, loaded_tiny.tokenizer, context_length=loaded_tiny.context_length)
    engine.start()
    try:
        expected = [engine.submit(ids, streams).wait(30).text for ids in short]
    finally:
        engine.stop()
    engine = Engine(
        loaded_tiny.model,
        loaded_tiny.tokenizer,
        context_length=loaded_tiny.context_length,
        fault_prompt="POISON",
    ).start()
    try:
        handles = [engine.submit(ids, streams) for ids in short]
        deadline = time.monotonic() + 30
        while min(len(h.sequence.output_ids) for h in handles) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        bad = engine.submit(poisoned, SamplingParams(max_new_tokens=5, temperature=0))
        assert bad.wait(30).finish_reason == "error"
        assert [h.wait(30).text for h in handles] == expected
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def deep_model():  # type: ignore[no-untyped-def]
    """A tiny GPT-2 of 8 layers: two layers share each phase of the capacity (the tiny models have two)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=512, n_embd=32, n_layer=8, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    use_decode_attention(model)
    return model


def test_the_layers_outgrow_their_caches_at_different_steps_through_joins_and_leaves(deep_model):
    """Each layer keeps its capacity at its own phase of CAPACITY_STEP, and the layers that share a phase
    take turns, so one step never copies more than one layer's cache (on a VM the whole cache copied in one
    step made it ten times a normal step, and three layers of 16 rows of ~150 positions doubled it), and a
    row never holds more than GROWTH_BLOCK spare positions (the engine's memory budget counts on it)."""
    from textgen.engine.kv_cache import CAPACITY_STEP, phase_of
    from textgen.model.memory import GROWTH_BLOCK

    model = deep_model
    prompts = {name: prompt(6 + 3 * name, name) for name in range(4)}
    decoder = Decoder(model)
    decoder.join([0, 1], [prompts[0], prompts[1]])
    grown_at: dict[int, list[int]] = {}  # step -> the layers that took a bigger buffer at it
    before = None
    for step in range(3 * CAPACITY_STEP):
        if step == 20:
            decoder.join(2, prompts[2])  # a merge re-lays every layer: each keeps its phase
        if step == 50:
            decoder.join(3, prompts[3])
        if step == 70:
            decoder.leave(0)
        decoder.step()
        (segment,) = decoder.batch.segments
        layers = segment.layers()
        for i, layer in enumerate(layers):
            assert layer.capacity % CAPACITY_STEP == phase_of(i), f"layer {i} at step {step}"
            assert segment.width <= layer.capacity <= segment.width + GROWTH_BLOCK
        capacities = [layer.capacity for layer in layers]
        if before is not None and step not in (20, 50, 70):
            grown_at[step] = [i for i, (a, b) in enumerate(zip(before, capacities)) if b != a]
        before = capacities
    growths = [layers for layers in grown_at.values() if layers]
    assert len(growths) >= 16  # every layer outgrew its room, more than once
    assert all(len(layers) == 1 for layers in growths), grown_at
    check_against_solo(model, decoder, prompts)


def test_a_prompt_computed_in_chunks_then_outgrows_its_room_one_layer_at_a_time(deep_model):
    """A long prompt's layers reserve rooms staggered like the batch's capacities: once it decodes, they do
    not all outgrow them at the same step (a 1000-token row copied 37 MB at once)."""
    model, vocab = deep_model, deep_model.config.vocab_size
    long = prompt(70, 77)
    filling = DecodeBatch.start(0, long, vocab, False, staggered=True)
    for done in range(0, 70, 30):
        logits = filling.extend(model, long[done : done + 30])
    filling.record(logits.argmax(-1))
    tokens = [int(filling.next_tokens[0, 0])]
    before = [layer.capacity for layer in filling.segments[0].layers()]
    grown = []
    for _ in range(40):
        filling.record(filling.step(model).argmax(-1))
        tokens.append(int(filling.next_tokens[0, 0]))
        capacities = [layer.capacity for layer in filling.segments[0].layers()]
        grown.append(sum(a != b for a, b in zip(before, capacities)))
        before = capacities
    assert sum(grown) >= 8 and max(grown) == 1, grown
    assert tokens == solo(model, long, 40)[0]


def test_a_decoding_step_leaves_no_garbage_cycles(model):
    """Each pass's cache must be freed when the pass ends, not at Python's next full collection: cycles held
    200-800 MB of dropped KV after workload W (64 clients, GPT-2)."""
    import gc

    decoder = Decoder(model)
    decoder.join([0, 1], [prompt(5, 50), prompt(40, 51)])
    decoder.join(2, prompt(120, 52))  # a segment of its own: a pass over two segments
    decoder.step()
    # Twice: a model an earlier test dropped is freed by the first collection, and the weakref callback
    # that drops its decoding pass (textgen/model/native.py) makes that pass garbage for the second.
    gc.collect()
    gc.collect()
    gc.disable()
    try:
        decoder.step(3)
        decoder.leave(2)
        decoder.step(2)
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable == 0
