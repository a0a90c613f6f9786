"""float32-int8head's KV cache in float16 (textgen/model/formats.py CACHE_DTYPES): every way keys and values
enter the cache (a prompt through Hugging Face's pass or textgen's, a prompt computed in chunks, decoding
steps, a row joining the batch, a lone stream's compiled pass) stores them in float16, attention reads them
there, and the logits are those of the same model caching float32, within float16's rounding. Other formats
and encoder-decoders keep the dtype they compute in."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from textgen.config import Settings
from textgen.engine.batch import DecodeBatch
from textgen.model.attention import cache_dtype, store_keys_as
from textgen.model.compiled import MAX_TOKENS
from textgen.model.formats import CACHE_DTYPES
from textgen.model.loading import load_model
from textgen.model.memory import kv_bytes_per_token
from textgen.model.native import native_decoding
from textgen.model.source import resolve_model

from .test_segments import prompt

STEPS = 50  # past the first growth of every layer's buffers (kv_cache.CAPACITY_STEP)


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, cache_dir: Path) -> tuple[Any, Any]:
    """The tiny GPT-2 as float32-int8head, caching float16 as served and float32 as it would without; its
    products oneMKL's on every CPU (on AMD's they would be oneDNN's packed ones, which the compiled pass
    below cannot take: `packs_float32`)."""
    settings = Settings(
        model_name=str(tiny_model_dir), threads=1, dtype="float32-int8head", cache_dir=cache_dir
    )
    with mock.patch("textgen.model.formats.float32_packing", lambda cpu: "oneMKL's products here"):
        half = load_model(settings, resolve_model(settings)).model
        with mock.patch("textgen.model.loading.CACHE_DTYPES", {}):
            full = load_model(settings, resolve_model(settings)).model
    return half, full


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Logits within float16's rounding of the keys, values and queries (2^-11 relative each): at most 0.5%
    of the logits' largest, where the tiny model measured up to 0.26%; a lone pass that wrote zeros for its
    keys gave 1.2%."""
    assert ours.dtype == theirs.dtype == torch.float32
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) <= 0.005 * scale, float((ours - theirs).abs().max()) / scale


def stored(batch: DecodeBatch) -> set[torch.dtype]:
    return {t.dtype for s in batch.segments for layer in s.layers() for t in (layer.keys, layer.values)}


def test_float32_int8head_caches_float16_and_costs_half_the_bytes(models: tuple[Any, Any]) -> None:
    half, full = models
    assert cache_dtype(half) == torch.float16 and cache_dtype(full) is None
    assert 2 * kv_bytes_per_token(half) == kv_bytes_per_token(full)  # the KV budget counts what is stored


@torch.inference_mode()
@pytest.mark.parametrize("lengths", [(5, 9, 13), (7, 7, 7)], ids=["hugging-face-pass", "textgens-pass"])
def test_prompts_and_steps_store_float16_for_float32s_logits(
    models: tuple[Any, Any], lengths: tuple[int, ...]
) -> None:
    """Prompts of several lengths go through Hugging Face's pass (left-padded), of one length through
    textgen's; then steps, a prompt computed in chunks joins, and more steps."""
    half, full = models
    vocab = half.config.vocab_size
    prompts = [prompt(n, seed) for seed, n in enumerate(lengths)]
    (ours, mine), (theirs, logits) = (DecodeBatch.prefill(m, [0, 1, 2], prompts, vocab) for m in models)
    close(mine, logits)
    long = prompt(40, 9)
    for step in range(STEPS):
        token = logits.argmax(-1)  # float32's tokens for both: the two batches stay in step
        ours.record(token)
        theirs.record(token)
        if step == 10:  # a prompt computed in chunks joins
            fills = [DecodeBatch.start(3, long, vocab, False, None, True, cache_dtype(m)) for m in models]
            for done in range(0, len(long), 16):
                firsts = [fill.extend(m, long[done : done + 16]) for fill, m in zip(fills, models)]
            close(*firsts)
            assert stored(fills[0]) == {torch.float16} and stored(fills[1]) == {torch.float32}
            for fill, batch in zip(fills, (ours, theirs)):
                fill.record(firsts[1].argmax(-1))
                batch.concatenate(fill, segmented=True)
        mine, logits = ours.step(half), theirs.step(full)
        close(mine, logits)
    assert stored(ours) == {torch.float16} and stored(theirs) == {torch.float32}
    assert len(ours) == len(theirs) == 4


@torch.inference_mode()
def test_a_lone_streams_compiled_pass_reads_and_writes_float16(
    models: tuple[Any, Any], cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled pass of a lone row takes the cache's float16 buffers (exported for them) and computes
    the eager pass's logits, its prompt and each step, within float16's rounding."""
    half, _ = models
    monkeypatch.setattr("textgen.model.compiled.lone_tokens", lambda cpu: MAX_TOKENS)
    lone = native_decoding(half).lone
    assert lone.compile(torch.float32, cache_dir), lone.state
    lone.steps = lone.many = 0
    vocab = half.config.vocab_size
    try:
        ours, mine = DecodeBatch.prefill(half, [0], [prompt(7, 80)], vocab)
        saved, lone.compiled = lone.compiled, None  # the eager pass, as before compiling
        eager, logits = DecodeBatch.prefill(half, [0], [prompt(7, 80)], vocab)
        lone.compiled = saved
        close(mine, logits)
        for _ in range(STEPS):
            token = logits.argmax(-1)
            ours.record(token)
            eager.record(token)
            mine = ours.step(half)
            lone.compiled = None
            logits = eager.step(half)
            lone.compiled = saved
            close(mine, logits)
        assert lone.many == 1 and lone.steps == STEPS  # the prompt and every step took the compiled pass
        assert stored(ours) == {torch.float16}
    finally:
        lone.compiled, lone.state = None, "off"


def test_encoder_decoders_and_other_formats_cache_what_they_compute(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    """T5's attention is its own, which takes keys in its own dtype: no cache dtype is set for it; and the
    formats that promise float32's numbers (float32, float32-packed) or compute in bfloat16 set none. The
    loaded model says what its cache holds (the log, GET /info)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)
    t5 = T5ForConditionalGeneration(config).eval()
    assert not store_keys_as(t5, torch.float16) and cache_dtype(t5) is None
    every = ("float32", "float32-packed", "bfloat16", "bfloat16-int8head", "int8", *CACHE_DTYPES)
    for dtype in every:
        settings = Settings(model_name=str(tiny_model_dir), threads=1, dtype=dtype, cache_dir=cache_dir)
        loaded = load_model(settings, resolve_model(settings))
        computed = str(loaded.model.dtype).removeprefix("torch.")  # int8's: its dense copy's
        # GET /info's kv_cache_dtype says what the cache holds
        if dtype in CACHE_DTYPES:  # float32-int8head's and float16-int8head's
            assert cache_dtype(loaded.model) == torch.float16 and loaded.kv_cache_dtype == "float16"
        else:
            assert cache_dtype(loaded.model) is None and loaded.kv_cache_dtype == computed, dtype
