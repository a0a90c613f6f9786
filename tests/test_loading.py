"""Model resolution and loading, through the real code paths, with no Hub."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.pytorch_utils import Conv1D

from textgen.config import DTYPES, ConfigError, Settings, available_cores
from textgen.engine.core import Engine
from textgen.model.loading import configure_threads, load_model
from textgen.model.native import compile_state, compiled_dtype, native_decoding, start_compiling
from textgen.model.source import ModelLoadError, resolve_model
from textgen.engine.params import SamplingParams
from textgen.model.cpu import detect_cpu, this_cpu
from textgen.model.formats import int8_dense_dtype
from textgen.model.linear import Linear, TanhGELU, fbgemm_float16, onednn_bfloat16, use_linear
from textgen.model.quantize import (
    DENSE_ROWS,
    ONEDNN_PACK_ROWS,
    PACKED_DENSE_ROWS,
    Int8Embedding,
    Int8Linear,
    onednn_output_layer,
    weight_levels,
)


def test_local_directory_loads_a_causal_lm(loaded_tiny, tiny_model_dir):
    assert loaded_tiny.model_id == "tiny-gpt2"
    assert loaded_tiny.context_length == 256
    assert not loaded_tiny.is_encoder_decoder
    assert loaded_tiny.tokenizer.pad_token is not None  # GPT-2 has none; padding needs one
    assert next(loaded_tiny.model.parameters()).dtype == torch.float32


def test_no_weight_keeps_the_model_files_mapping(loaded_tiny, tiny_model_dir):
    """float32 weights load from safetensors without a copy; textgen copies those it keeps, so the file's
    mapping (and every page loading read through it) goes once loaded. Tied weights stay one tensor."""
    from textgen.model.loading import own_file_backed_tensors

    model = loaded_tiny.model
    assert own_file_backed_tensors(model) == 0  # nothing left on a file's mapping
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with open("/proc/self/maps") as maps:
        assert not [
            line for line in maps if line.rstrip().endswith(str(tiny_model_dir / "model.safetensors"))
        ]


def test_owning_file_backed_tensors_copies_each_storage_once(tmp_path):
    """Tensors on a file's mapping are copied (views of one storage share one copy: tied weights stay
    tied), with their values, offsets and strides; the process's own tensors are left as they are."""
    import mmap

    from textgen.model.loading import own_file_backed_tensors

    path = tmp_path / "weights"
    path.write_bytes(torch.arange(64, dtype=torch.float32).numpy().tobytes())
    with open(path, "r+b") as file:
        mapped = torch.frombuffer(mmap.mmap(file.fileno(), 0), dtype=torch.float32)
    module = torch.nn.Module()
    module.embed = torch.nn.Parameter(mapped[:32].view(4, 8), requires_grad=False)
    module.transposed = torch.nn.Parameter(mapped[32:].view(8, 4).t(), requires_grad=False)
    module.tied = module.embed
    module.register_buffer("own", torch.ones(3))
    module.register_buffer("numpy", torch.from_numpy(torch.zeros(2).numpy()))  # not resizable, but ours
    own, numpy = module.own.data_ptr(), module.numpy.data_ptr()
    assert own_file_backed_tensors(module) == 64 * 4  # one storage under both views, copied once
    assert module.tied is module.embed
    assert module.embed.untyped_storage().data_ptr() == module.transposed.untyped_storage().data_ptr()
    torch.testing.assert_close(module.embed, torch.arange(32.0).view(4, 8))
    torch.testing.assert_close(module.transposed, torch.arange(32.0, 64.0).view(8, 4).t())
    assert module.own.data_ptr() == own and module.numpy.data_ptr() == numpy
    assert own_file_backed_tensors(module) == 0


def _resident_kb(path) -> int:
    """This process's resident KB of its mappings of `path` (/proc/self/smaps)."""
    resident, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                resident += int(fields[1])
    return resident


def test_copied_weights_leave_the_files_pages(tmp_path):
    """Copying a tensor out of a file's mapping lets go of the mapping's pages it read, at once (loading
    never holds the file resident beside its copies); the values read are the file's."""
    import mmap

    from textgen.model.loading import own_file_backed_tensors

    path = tmp_path / "weights"
    values = torch.arange(4 << 20, dtype=torch.float32)  # 16 MB
    path.write_bytes(values.numpy().tobytes())
    with open(path, "r+b") as file:
        mapped = torch.frombuffer(mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE), dtype=torch.float32)
    module = torch.nn.Module()
    module.first = torch.nn.Parameter(mapped[: 2 << 20], requires_grad=False)
    module.second = torch.nn.Parameter(mapped[2 << 20 :], requires_grad=False)
    assert torch.equal(torch.cat([module.first, module.second]), values)  # every page read
    assert _resident_kb(path) >= 15 << 10
    assert own_file_backed_tensors(module) == 16 << 20  # one storage: copied once, then its pages dropped
    assert _resident_kb(path) <= 8  # the partial pages at the ends at most
    torch.testing.assert_close(torch.cat([module.first, module.second]), values)
    torch.testing.assert_close(mapped, values)  # the mapping reads the file again


def test_replacing_projections_frees_each_old_weight_before_the_next_is_laid_out():
    """use_linear's re-laid copies replace the old weights one at a time: loading holds one layer's
    weight twice at most, not the whole model's (float32 GPT-2: +324 MB at the peak)."""
    import weakref

    from textgen.model.linear import replace_projections

    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), *(Conv1D(8, 8) for _ in range(4)))
    model.get_input_embeddings = lambda: model[0]
    old = []

    def make(layer, weight, bias, pack):
        assert all(ref() is None for ref in old[:-1])  # every weight replaced before this one is gone
        old.append(weakref.ref(layer.weight))
        return Linear(weight, bias, pack=False)

    replace_projections(model, make)
    assert len(old) == 4 and all(isinstance(layer, Linear) for layer in model[1:])
    assert all(ref() is None for ref in old)


def test_threads_are_set_and_logged(caplog):
    before = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="textgen.model.loading"):
        configure_threads(1)
    assert torch.get_num_threads() == 1
    assert "torch uses 1 intra-op thread(s)" in caplog.text
    torch.set_num_threads(before)


def test_bfloat16_is_selectable(tiny_model_dir, cache_dir):
    settings = Settings(model_name=str(tiny_model_dir), threads=1, dtype="bfloat16", cache_dir=cache_dir)
    loaded = load_model(settings, resolve_model(settings))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    layer = loaded.model.transformer.h[0].attn.c_attn  # was a Conv1D, weight [in, out]
    assert layer.weight.shape == (192, 64)  # [out, in], as nn.Linear: oneDNN's layout
    # Packed once for oneDNN where it computes bfloat16 (not re-laid at every product), else plain.
    assert layer.packed == onednn_bfloat16() and layer.weight.is_mkldnn == layer.packed
    # The output layer is the input embeddings (tied): never packed, so never a second copy.
    assert loaded.model.lm_head.weight is loaded.model.get_input_embeddings().weight
    assert not loaded.model.lm_head.packed


def assert_generates(loaded, prompt: list[int], tokens: int = 6) -> None:
    """The engine serves the loaded model: `tokens` greedy tokens after `prompt`."""
    engine = Engine(loaded.model, loaded.tokenizer, context_length=loaded.context_length).start()
    try:
        params = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)
        assert engine.submit(prompt, params).wait(30).completion_tokens == tokens
    finally:
        engine.stop()


@pytest.mark.parametrize("layers", ["bfloat16", "float32"])
def test_int8head_formats_quantize_the_output_layer_alone(layers, tiny_model_dir, cache_dir):
    """bfloat16-int8head and float32-int8head: the layers in their dtype, the output layer int8 (in float32
    with no dense copy, and the tied input embeddings int8 rows too: no float matrix left; in bfloat16 its
    dense copy the embeddings' own storage), and logits those of bfloat16 or float32 within the int8 rounding
    of the output layer's weights and inputs, for few rows and many."""
    dtype = f"{layers}-int8head"
    compute = getattr(torch, layers)
    settings = Settings(model_name=str(tiny_model_dir), threads=1, dtype=dtype, cache_dir=cache_dir)
    loaded = load_model(settings, resolve_model(settings))
    model = loaded.model
    assert loaded.dtype == dtype
    assert [m for m in model.modules() if isinstance(m, Int8Linear)] == [model.lm_head]
    # oneDNN's int8 product where this CPU has AMX for it, FBGEMM's elsewhere
    assert (model.lm_head.onednn_packed is not None) == onednn_output_layer()
    lookup = model.get_input_embeddings()
    vocabulary = model.config.vocab_size * model.config.n_embd
    tensors = [*model.parameters(), *model.buffers()]
    tables = {t.data_ptr(): t.dtype for t in tensors if t.is_floating_point() and t.numel() == vocabulary}
    if layers == "float32":  # no dense copy, and the lookup reads int8 rows: no float matrix left
        assert model.lm_head.dense is None and isinstance(lookup, Int8Embedding) and not tables
    else:  # the dense copy is the lookup's own table (tied), not a second one
        assert model.lm_head.weight.data_ptr() == lookup.weight.data_ptr()
        assert list(tables.values()) == [torch.bfloat16]
    blocks = [m for m in model.modules() if isinstance(m, Linear)]
    # the blocks' products, and bfloat16's dense copy of the output layer
    assert len(blocks) == 4 * 2 + (layers == "bfloat16") and all(m.weight.dtype == compute for m in blocks)
    reference = load_model(dataclasses.replace(settings, dtype=layers), resolve_model(settings))
    ids = torch.tensor([loaded.tokenizer.encode("What is AI? Artificial intelligence is")])
    table = reference.model.get_input_embeddings().weight
    assert (lookup(ids[0]) - table[ids[0]]).abs().max() <= table[ids[0]].abs().amax() / 254 + 1e-6
    assert lookup(ids).dtype == compute
    hidden = torch.randn(DENSE_ROWS + 1, model.config.n_embd, dtype=compute)
    with torch.inference_mode():
        logits = model(ids).logits  # every position through the int8 product
        one = model.lm_head(model.transformer.ln_f(model.transformer(ids).last_hidden_state[:, -1:]))
        many = model.lm_head(hidden)  # FBGEMM's too in float32, the dense copy's in bfloat16
        few = torch.cat([model.lm_head(hidden[i : i + 1]) for i in range(3)])  # a row at a time
        expected = reference.model(ids).logits[0, -1].float()
        expected_many = reference.model.lm_head(hidden).float()
    # Logits in float32, for one row and many alike: the engine samples in float32.
    assert logits.dtype == one.dtype == many.dtype == torch.float32
    got = logits[0, -1]
    assert (one.flatten() - expected).abs().max() <= 0.03 * expected.abs().max()
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()
    assert (many - expected_many).abs().max() <= 0.03 * expected_many.abs().max()
    assert (few - many[:3]).abs().max() <= 0.03 * expected_many.abs().max()
    assert model.transformer(ids).last_hidden_state.dtype == compute  # only the output layer's
    assert_generates(loaded, ids[0].tolist())


def test_float32_packed_packs_the_float32_products_for_onednn_and_float32_does_not(
    loaded_tiny, tiny_model_dir, cache_dir
):
    """float32-packed: the same float32 weights, every product packed for oneDNN (the output layer as a copy
    of its own: the embeddings stay plain for the lookup); logits within float32 rounding of float32's, which
    keeps F.linear (its batch invariance: tests/test_engine.py), and the engine generates with it."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    settings = Settings(
        model_name=str(tiny_model_dir), threads=1, dtype="float32-packed", cache_dir=cache_dir
    )
    loaded = load_model(settings, resolve_model(settings))
    model = loaded.model
    assert loaded.dtype == "float32-packed" and loaded.dtype_reason.startswith("float32-packed: set by")
    blocks = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(blocks) == 4 * 2 + 1
    assert all(m.packed and m.weight.dtype == torch.float32 for m in blocks)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # plain, for the lookup
    assert not any(m.packed for m in loaded_tiny.model.modules() if isinstance(m, Linear))  # float32
    ids = torch.tensor([loaded.tokenizer.encode("What is AI? Artificial intelligence is")])
    with torch.inference_mode():
        got, expected = model(ids).logits[0], loaded_tiny.model(ids).logits[0]
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert_generates(loaded, ids[0].tolist())


def test_float32_int8head_packs_its_layers_where_float32_packed_is_for_the_cpu(
    loaded_tiny, tiny_model_dir, cache_dir, monkeypatch
):
    """On AMD's CPUs (`float32_packing` says packing is for this one) float32-int8head's float32 layers are
    packed for oneDNN as float32-packed's are, its output layer and embeddings int8 and its KV cache float16
    all the same; its lone row then decodes eagerly (the compiled pass cannot take opaque weights), with
    logits within the int8 output layer's rounding of float32's."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    monkeypatch.setattr("textgen.model.formats.float32_packing", lambda cpu: None)
    settings = Settings(
        model_name=str(tiny_model_dir), threads=1, dtype="float32-int8head", cache_dir=cache_dir
    )
    loaded = load_model(settings, resolve_model(settings))
    model = loaded.model
    blocks = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(blocks) == 4 * 2 and all(m.packed and m.weight.dtype == torch.float32 for m in blocks)
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.get_input_embeddings(), Int8Embedding)
    assert loaded.kv_cache_dtype == "float16"
    assert start_compiling(model, loaded.dtype, cache_dir) == (
        "off: float32-int8head decodes eagerly (its float32 products are oneDNN's packed ones here)"
    )
    # Its batch's attention over the float16 cache compiles, where the CPU has no float16 arithmetic.
    attention = native_decoding(model).attention
    if attention.thread is not None:
        attention.thread.join()
    wanted = ("off: ",) if this_cpu().native_fp16 else ("compiled in ", "loaded from the cache in ")
    assert compile_state(model, "attention").startswith(wanted), compile_state(model, "attention")
    ids = torch.tensor([loaded.tokenizer.encode("What is AI? Artificial intelligence is")])
    with torch.inference_mode():
        got, expected = model(ids).logits[0, -1], loaded_tiny.model(ids).logits[0, -1]
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()
    assert_generates(loaded, ids[0].tolist())


def test_float16_int8head_keeps_its_layers_weights_in_float16_for_fbgemm(
    loaded_tiny, tiny_model_dir, cache_dir
):
    """float16-int8head (`auto` on AMD's AVX2 CPUs): every block product's weight is FBGEMM's float16 copy
    and no float32 one is left, the output layer and embeddings are int8 and the KV cache float16 as
    float32-int8head's; its lone row's pass compiles as float32-int8head's does on Intel's CPUs; logits within
    the int8 output layer's rounding of float32's."""
    if not fbgemm_float16():
        pytest.skip("torch without FBGEMM")
    settings = Settings(
        model_name=str(tiny_model_dir), threads=1, dtype="float16-int8head", cache_dir=cache_dir
    )
    loaded = load_model(settings, resolve_model(settings))
    model = loaded.model
    assert loaded.dtype == "float16-int8head"
    blocks = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(blocks) == 4 * 2 and all(m.float16 is not None for m in blocks)
    assert all(
        m.weight.dtype == torch.float32 and m.weight.shape == (m.out_features, m.in_features) for m in blocks
    )
    # the blocks' float32 weights went: the position embeddings are the one float matrix left
    assert [name for name, t in model.named_parameters() if t.dim() == 2] == ["transformer.wpe.weight"]
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.get_input_embeddings(), Int8Embedding)
    assert loaded.kv_cache_dtype == "float16"
    assert compiled_dtype(loaded.dtype) == torch.float32  # its pass compiles (tests/test_compiled.py)
    ids = torch.tensor([loaded.tokenizer.encode("What is AI? Artificial intelligence is")])
    with torch.inference_mode():
        got, expected = model(ids).logits[0, -1], loaded_tiny.model(ids).logits[0, -1]
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()
    assert_generates(loaded, ids[0].tolist())


@pytest.mark.parametrize("rows", [1, 3, 40, 97])
def test_float16_linear_is_float32_arithmetic_on_float16_weights(rows):
    """FBGEMM's float16 product (float16-int8head's layers): x Wᵀ + b with W rounded to float16 and nothing
    else, at one row and many, 2-D or 3-D, in float32, laid out as F.linear lays it."""
    if not fbgemm_float16():
        pytest.skip("torch without FBGEMM")
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    layer = Linear(weight.clone(), bias, float16=True)
    assert layer.float16 is not None and not layer.packed
    x = torch.randn(rows, 64)
    expected = torch.nn.functional.linear(x, weight.half().float(), bias)
    for shaped in (x, x.view(1, rows, 64)):
        got = layer(shaped)
        assert got.dtype == torch.float32 and got.shape == (*shaped.shape[:-1], 96) and got.is_contiguous()
        torch.testing.assert_close(got.reshape(rows, 96), expected, rtol=1e-5, atol=1e-4)
    # a weight that is also the input embeddings (pack=False) stays float32's
    assert Linear(weight.clone(), bias, pack=False, float16=True).float16 is None


@pytest.mark.parametrize("rows", [1, 3, 40, 96, 97])
@pytest.mark.parametrize("pack", [True, False])
def test_bfloat16_linear_equals_the_plain_product(rows, pack):
    """Packed or not, at one row (torch.mv where not packed), a few (W·xᵀ where not packed) or many, with 2-D
    or 3-D inputs: the product F.linear computes, within bfloat16's rounding of the output, laid out as
    F.linear lays it (contiguous)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    layer = Linear(weight.clone(), bias, pack=pack)
    x = torch.randn(rows, 64).bfloat16()
    expected = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    for shaped in (x, x[None], x[:, None]):
        got = layer(shaped)
        assert got.shape == (*shaped.shape[:-1], 96) and got.dtype == torch.bfloat16 and got.is_contiguous()
        assert (got.float().reshape(rows, 96) - expected).abs().max() <= 0.02 * expected.abs().max()


def test_int8_quantizes_every_linear_layer_and_still_generates(tiny_model_dir, cache_dir):
    settings = Settings(model_name=str(tiny_model_dir), threads=1, dtype="int8", cache_dir=cache_dir)
    loaded = load_model(settings, resolve_model(settings))
    modules = list(loaded.model.modules())
    assert not any(isinstance(m, (Conv1D, torch.nn.Linear)) for m in modules)
    quantized = [m for m in modules if isinstance(m, Int8Linear)]
    # qkv, attention output, MLP in and out in each of the 2 blocks, and the output layer
    assert len(quantized) == 4 * 2 + 1
    # The dense copy (large batches) in bfloat16 only where this CPU computes it natively.
    assert all(m.weight.dtype == int8_dense_dtype(detect_cpu()) for m in quantized)
    assert all(hasattr(m, "packed") for m in quantized)
    # Smoothed by a calibration pass over the model's own tokenizer (SmoothQuant)
    assert any(bool((m.input_scale != 1).any()) for m in quantized)
    # float32 logits; every other layer's outputs in its inputs' dtype
    assert [m for m in quantized if m.out_dtype is not None] == [loaded.model.lm_head]
    assert loaded.model.lm_head.out_dtype == torch.float32
    engine = Engine(loaded.model, loaded.tokenizer, context_length=loaded.context_length).start()
    try:
        ids = loaded.tokenizer.encode("What is AI?")
        result = engine.submit(ids, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)).wait(30)
        assert result.completion_tokens == 6
    finally:
        engine.stop()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_mlp_applies_its_activation_inside_the_product(family, tiny_model_dir):
    """GPT-2's tanh GELU and Llama's SiLU move into the packed product before them (fuse_activations): the
    activation module becomes a no-op and the bfloat16 model still computes what the float32 one does."""
    if not onednn_bfloat16():
        pytest.skip("oneDNN computes no bfloat16 on this CPU: nothing is packed, nothing fused")
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    else:
        config = LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
        model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 500, (1, 12))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        fused = use_linear(copy.deepcopy(model).to(torch.bfloat16))
        got = fused(input_ids=ids).logits.float()
    mlp = fused.transformer.h[0].mlp if family == "gpt2" else fused.model.layers[0].mlp
    product, activation = (mlp.c_fc, mlp.act) if family == "gpt2" else (mlp.gate_proj, mlp.act_fn)
    assert isinstance(activation, torch.nn.Identity) and product.activation[0] in ("gelu", "swish")
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_float16_layers_take_the_tanh_gelu_in_one_kernel_and_float32_keeps_transformers(tiny_model_dir):
    """After FBGEMM's float16 products GPT-2's GELU is torch's one kernel (TanhGELU), which computes what
    transformers' seven ops do up to rounding; float32 layers keep transformers' module (Hugging Face's
    logits bit for bit)."""
    if not fbgemm_float16():
        pytest.skip("this torch has no FBGEMM float16 products")
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        halves = use_linear(copy.deepcopy(model), float16=True)
        assert isinstance(halves.transformer.h[0].mlp.act, TanhGELU)
        got = halves(input_ids=ids).logits
        for block in halves.transformer.h:  # the same float16 products with transformers' GELU
            block.mlp.act = NewGELUActivation()
        expected = halves(input_ids=ids).logits
        plain = use_linear(copy.deepcopy(model))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(plain.transformer.h[0].mlp.act, NewGELUActivation)


@pytest.mark.parametrize("levels", [127, 63])
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, PACKED_DENSE_ROWS, 40, DENSE_ROWS])
def test_int8_linear_is_close_to_the_float_product(rows, compute, levels):
    # The compute dtype is the loaded model's: bfloat16 on CPUs that have it natively, else float32.
    if levels > weight_levels():
        pytest.skip("FBGEMM here has no VNNI: 8-bit weights would overflow its kernel")
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    layer = Int8Linear(weight.to(compute), bias, levels=levels)
    x = torch.randn(rows, 1, 64).to(compute)
    expected = torch.nn.functional.linear(x.float(), weight, bias)
    got = layer(x)
    assert got.shape == (rows, 1, 96) and got.dtype == compute
    # int8 weights keep ~1/254 of each row's largest weight (1/126 at 7 bits), activations ~1/255 of their
    # row's range; the error adds up over 64 products
    assert (got.float() - expected).norm() / expected.norm() < (0.02 if levels == 127 else 0.03)


@pytest.mark.parametrize("rows", [1, 3, ONEDNN_PACK_ROWS, 40])
def test_int8_product_through_onednn_is_fbgemms(rows):
    """oneDNN's int8 product (the output layer's on AMX CPUs) quantizes the activations as FBGEMM does: a
    lone row on its own range, several each on theirs (a row 1000x the others, a row all positive), so it
    computes FBGEMM's numbers up to rounding, as close to the float product. 7-bit weights where oneDNN
    here has neither AMX nor VNNI: its AVX2 and AVX-512 kernels add pairs of products in 16 bits, as
    FBGEMM's do (8-bit weights there: 5% off instead of 0.3%)."""
    levels = 127 if onednn_output_layer() else 63
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(rows, 64)
    x[0] *= 1000
    x[-1] = x[-1].abs() + 1  # every value positive
    expected = torch.nn.functional.linear(x, weight, bias)
    onednn = Int8Linear(weight, bias, levels=levels, dense=False, out_dtype=torch.float32, onednn=True)
    assert onednn.onednn_packed is not None and onednn.packed is None
    got = onednn(x)
    assert got.shape == (rows, 96) and got.dtype == torch.float32
    for row in range(rows):
        error = (got[row] - expected[row]).norm() / expected[row].norm()
        assert error < (0.02 if levels == 127 else 0.03), (row, error)
    if levels <= weight_levels():  # FBGEMM here takes these weights
        fbgemm = Int8Linear(weight, bias, levels=levels, dense=False, out_dtype=torch.float32)
        assert (got - fbgemm(x)).norm() <= 1e-3 * expected.norm()
        tiny = x[:1] * 1e-7  # a lone row finer than FBGEMM's smallest step (SMALL_SCALE)
        assert (onednn(tiny) - fbgemm(tiny)).norm() <= 1e-3 * fbgemm(tiny).norm()


def test_the_output_layer_goes_to_onednn_only_with_amx():
    """FBGEMM has no AMX kernel; oneDNN's multiplies the output layer faster there from a few rows up (as
    fast at one). Without AMX (Zen 4's AVX512-VNNI, Zen 3's AVX2, or oneDNN capped below AMX) FBGEMM's
    stays."""
    from tests.test_cpu import MACHINES

    amx, zen4, zen3 = (detect_cpu(MACHINES[n]) for n in ("sapphire-rapids", "epyc-zen4", "epyc-zen3"))
    capped = detect_cpu(MACHINES["sapphire-rapids"], env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"})
    assert onednn_output_layer(amx) == torch.backends.mkldnn.is_available()
    assert not any(onednn_output_layer(cpu) for cpu in (zen4, zen3, capped))


def test_smoothing_moves_an_outlier_channel_into_the_weights():
    """One input channel 50x the others takes most of each row's 8-bit range; smoothed by the calibration
    peaks, the product is closer to the float one (and exactly the same math: W s, x / s)."""
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    x = torch.randn(16, 64)
    x[:, 3] *= 50
    expected = torch.nn.functional.linear(x, weight)
    errors = {}
    for name, peaks in (("plain", None), ("smoothed", x.abs().amax(dim=0))):
        got = Int8Linear(weight, None, input_peaks=peaks)(x)
        errors[name] = float((got - expected).norm() / expected.norm())
    assert errors["smoothed"] < 0.6 * errors["plain"], errors


def test_int8_rows_are_quantized_as_if_alone():
    """A row's int8 product is as precise beside other rows as alone: next to one 1000x larger, or to rows
    whose values all lean to one side. FBGEMM quantizes a product's activations on one range for all its
    rows; scaled by its largest |value| alone, a row leaning the other way lost up to half its steps."""
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    layer = Int8Linear(weight, None)
    x = torch.randn(6, 64)
    x[0] *= 1000
    x[2] = x[2].abs() + 1  # every value positive
    x[3] = -x[3].abs() * 0.01  # every value negative, and small
    expected = torch.nn.functional.linear(x, weight)
    got = layer(x)
    for row in range(len(x)):
        alone = layer(x[row : row + 1])[0]
        batched_error, alone_error = (
            (y - expected[row]).norm() / expected[row].norm() for y in (got[row], alone)
        )
        assert batched_error < 0.04 and batched_error <= 1.1 * alone_error, (row, batched_error, alone_error)


def test_gpt2_alias_means_the_default_hub_model(cache_dir):
    with pytest.raises(ModelLoadError) as err:  # no Hub here: the error shows what was tried
        resolve_model(Settings(model_name="gpt2", cache_dir=cache_dir))
    assert "Hugging Face Hub id 'openai-community/gpt2'" in str(err.value)


@pytest.mark.parametrize(
    "name,tried",
    [
        ("/nowhere/model.gguf", "tried GGUF file /nowhere/model.gguf: FileNotFoundError"),
        ("someone/missing-model", "tried Hugging Face Hub id 'someone/missing-model'"),
    ],
)
def test_unloadable_model_name_says_what_was_tried_and_what_to_do(name, tried, cache_dir):
    with pytest.raises(ModelLoadError) as err:
        resolve_model(Settings(model_name=name, cache_dir=cache_dir))
    message = str(err.value)
    assert f"Could not load MODEL_NAME='{name}'" in message and tried in message
    assert "Set MODEL_NAME to a Hub id" in message


def test_directory_without_a_model_is_rejected(tmp_path, cache_dir):
    with pytest.raises(ModelLoadError, match="tried local model directory"):
        resolve_model(Settings(model_name=str(tmp_path), cache_dir=cache_dir))


def test_bad_configuration_names_the_variable():
    with pytest.raises(ConfigError, match="TEXTGEN_THREADS must be a whole number, got 'two'"):
        Settings.from_env({"TEXTGEN_THREADS": "two"})
    with pytest.raises(
        ConfigError,
        match="TEXTGEN_DTYPE must be one of float32, float32-packed, float32-int8head, float16-int8head, bf",
    ):
        Settings.from_env({"TEXTGEN_DTYPE": "fp8"})
    settings = Settings.from_env({"MODEL_NAME": " gpt2 ", "TEXTGEN_THREADS": "2"})
    assert settings.model_name == "gpt2" and settings.threads == 2


@pytest.mark.parametrize("dtype", [dtype for dtype in DTYPES if dtype != "auto"])
def test_encoder_decoder_models_load_with_seq2seq_class_and_generate(
    dtype, tmp_path, tiny_model_dir, cache_dir
):
    """In every format (bfloat16 packs T5's products, whose feed-forward reads its output layer's dtype)."""
    t5_dir = tmp_path / "tiny-t5"
    shutil.copytree(tiny_model_dir, t5_dir, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = T5Config(
        vocab_size=512,
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(t5_dir)
    settings = Settings(model_name=str(t5_dir), threads=1, dtype=dtype, cache_dir=cache_dir)
    loaded = load_model(settings, resolve_model(settings))
    assert loaded.is_encoder_decoder and loaded.dtype == dtype
    engine = Engine(loaded.model, loaded.tokenizer, context_length=loaded.context_length).start()
    try:
        ids = loaded.tokenizer.encode("What is AI?")
        greedy = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
        first, again = engine.submit(ids, greedy).wait(30), engine.submit(ids, greedy).wait(30)
        assert first.finish_reason == "length" and first.completion_tokens == 8
        assert first.text == again.text
        sampled = SamplingParams(max_new_tokens=8, seed=5, ignore_eos=True)
        assert engine.submit(ids, sampled).wait(30).text == engine.submit(ids, sampled).wait(30).text
        # OpenAI's and vLLM's extras reach the seq2seq runner too: end-of-text (id 0), forced by
        # logit_bias, is held off by min_tokens; the count penalties and min_p run alongside.
        extras = dict(min_tokens=3, logit_bias=((0, 100.0),), presence_penalty=1.0, frequency_penalty=0.5)
        held = engine.submit(ids, SamplingParams(max_new_tokens=8, temperature=0, **extras)).wait(30)
        assert held.finish_reason == "eos" and held.completion_tokens == 4
        held = engine.submit(ids, SamplingParams(max_new_tokens=8, seed=5, min_p=0.5, **extras)).wait(30)
        assert held.finish_reason == "eos" and held.completion_tokens == 4
    finally:
        engine.stop()


@pytest.mark.real_model
def test_offline_default_is_smollm2_with_one_warning_and_a_cached_conversion(cache_dir, caplog):
    settings = Settings(model_name=None, threads=2, cache_dir=cache_dir)
    source = resolve_model(settings)  # converts the GGUF unless an earlier test did
    assert source.model_id == "SmolLM2-135M-Instruct"
    assert "openai-community/gpt2" not in source.location and source.fallback_reason
    assert "sha256" in source.origin

    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        again = resolve_model(settings)
        loaded = load_model(settings, again)
    seconds = time.perf_counter() - start
    assert seconds <= 10, f"a start from the converted cache took {seconds:.1f} s"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "offline default" in r.message]
    assert len(warnings) == 1
    assert "Set MODEL_NAME" in warnings[0].message
    assert loaded.tokenizer.chat_template and loaded.context_length == 8192


@pytest.mark.real_model
def test_without_the_hub_the_default_falls_back_at_once_not_after_retries(cache_dir, tmp_path):
    """HF_HUB_OFFLINE unset and the Hub unreachable (here: a closed port on loopback), nothing cached: one
    request, then SmolLM2; huggingface_hub's own retries (5, sleeping 23 s in all) never start."""
    from tests.server import ROOT, free_port

    script = (
        "from pathlib import Path; from textgen.config import Settings;"
        "from textgen.model.source import resolve_model;"
        f"s = resolve_model(Settings(model_name=None, cache_dir=Path({str(cache_dir)!r})));"
        "print(s.model_id); print(s.fallback_reason)"
    )
    # No HF_HUB_OFFLINE, and no cache location but the empty HF_HOME (a cached GPT-2 would be served).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "HF_HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model_id, reason = done.stdout.strip().splitlines()[-2:]
    assert model_id == "SmolLM2-135M-Instruct" and "Connection refused" in reason, done.stdout
    assert "Retrying" not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, 1.5 CPUs: 2 threads
        ({"cpu.max": "max 100000\n"}, 4),  # no limit: the affinity's 4 cores
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1, 1 CPU
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # v1 unlimited
        ({}, 4),  # no cgroup files
    ],
)
def test_default_threads_follow_the_container_cpu_limit(tmp_path, monkeypatch, files, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert available_cores(tmp_path) == expected
