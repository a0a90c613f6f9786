"""textgen's own decoding forward (textgen/model/native.py) computes what Hugging Face's forward computes,
for the tiny GPT-2 (loaded as the server loads it) and a tiny Llama: rows in segments of different widths,
drafted tokens to verify (several queries a row), and a prompt's chunk in the same pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from textgen.engine import batch as batch_module
from textgen.engine.batch import DecodeBatch
from textgen.model.attention import use_decode_attention
from textgen.model.native import GPT2Decoding, LlamaDecoding, native_decoding

from .test_segments import prompt


def two_segments(model) -> DecodeBatch:  # type: ignore[no-untyped-def]
    vocab = model.config.vocab_size
    batch, logits = DecodeBatch.prefill(
        model, [0, 1, 3], [prompt(5, 80), prompt(9, 81), prompt(7, 84)], vocab
    )
    batch.record(logits.argmax(-1))
    long, long_logits = DecodeBatch.prefill(model, [2], [prompt(200, 82)], vocab)
    long.record(long_logits.argmax(-1))
    batch.concatenate(long, segmented=True)
    assert len(batch.segments) == 2
    for _ in range(3):
        batch.record(batch.step(model).argmax(-1))
    return batch


def hugging_face(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_module, "native_decoding", lambda model: None)


def decode_alike(
    model: Any, monkeypatch: pytest.MonkeyPatch, mine: DecodeBatch, theirs: DecodeBatch, tokens: torch.Tensor
) -> None:
    """The caches two passes left behind (textgen's, Hugging Face's) decode `tokens` alike."""
    mine.record(tokens)
    theirs.record(tokens)
    step = mine.step(model)
    with monkeypatch.context() as patch:
        hugging_face(patch)
        torch.testing.assert_close(step, theirs.step(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries", [1, 3])
def test_a_step_gives_the_logits_of_hugging_faces_forward(model, monkeypatch, queries):
    assert isinstance(native_decoding(model), (GPT2Decoding, LlamaDecoding))
    batch = two_segments(model)
    ids = torch.cat([batch.next_tokens, torch.tensor([[7, 8]] * 4)], dim=1)[:, :queries]
    mine, theirs = batch.take([0, 1, 2, 3]), batch.take([0, 1, 2, 3])
    logits, _ = mine.forward(model, ids)
    with monkeypatch.context() as patch:
        hugging_face(patch)
        expected, _ = theirs.forward(model, ids)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    decode_alike(model, monkeypatch, mine, theirs, logits[:, -1].argmax(-1))


def test_a_chunk_in_the_pass_gives_the_logits_of_hugging_faces_forward(model, monkeypatch):
    vocab = model.config.vocab_size
    batch = two_segments(model)
    long = prompt(60, 83)
    results = []
    for native in (True, False):
        rows = batch.take([0, 1, 2, 3])
        filling = DecodeBatch.start(9, long, vocab, False, staggered=True)
        filling.extend(model, long[:20])
        with monkeypatch.context() as patch:
            if not native:
                hugging_face(patch)
            results.append(rows.forward(model, rows.next_tokens, (filling, long[20:45])))
    (logits, chunk), (expected, expected_chunk) = results
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk, expected_chunk, rtol=1e-5, atol=1e-5)


def test_other_architectures_go_through_hugging_faces_forward() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    other = GPTNeoXForCausalLM(config).eval()
    use_decode_attention(other)
    assert native_decoding(other) is None


def test_a_chunk_alone_gives_the_logits_of_hugging_faces_forward(model, monkeypatch):
    """The rest of a prompt after its first chunk (or after a prefix cache hit), in a pass of its own."""
    vocab = model.config.vocab_size
    long = prompt(60, 85)
    results = []
    for native in (True, False):
        filling = DecodeBatch.start(9, long, vocab, False, staggered=True)
        filling.extend(model, long[:20])
        with monkeypatch.context() as patch:
            if not native:
                hugging_face(patch)
            results.append(filling.extend(model, long[20:]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_prompts_of_one_length_are_prefilled_through_it_with_hugging_faces_logits(model, monkeypatch):
    """Prompts of one length (no padding; a lone prompt always) go through textgen's pass, each row's
    tokens attending causally over its own; the logits, the seen tokens and the cache left behind are
    Hugging Face's. Prompts of several lengths stay with Hugging Face's forward (its padding masks)."""
    vocab = model.config.vocab_size
    passes: list[int] = []

    def counting(m):  # type: ignore[no-untyped-def]
        decoding = native_decoding(m)

        class Counting:
            layers = decoding.layers

            def __call__(self, ids, *args):  # type: ignore[no-untyped-def]
                passes.append(ids.numel())
                return decoding(ids, *args)

        return Counting()

    prompts = [prompt(6, 90), prompt(6, 91), prompt(6, 92)]
    with monkeypatch.context() as patch:
        patch.setattr(batch_module, "native_decoding", counting)
        mine, logits = DecodeBatch.prefill(model, [0, 1, 2], prompts, vocab, count_prompt=[True, False, True])
        DecodeBatch.prefill(model, [3, 4], [prompt(6, 93), prompt(4, 94)], vocab)
    assert passes == [18]  # the three prompts in one pass; the two of different lengths not
    with monkeypatch.context() as patch:
        hugging_face(patch)
        theirs, expected = DecodeBatch.prefill(
            model, [0, 1, 2], prompts, vocab, count_prompt=[True, False, True]
        )
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(mine.seen, theirs.seen)
    decode_alike(model, monkeypatch, mine, theirs, logits.argmax(-1))
