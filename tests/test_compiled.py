"""A lone stream's compiled pass (textgen/model/compiled.py): it computes what the eager pass computes,
for GPT-2 and Llama, for a prompt and for each step across the cache's growth; it is cached under a key of
the program, its weights, the machine and torch, and a restart loads it; the server compiles it in the
background, in a process of its own, for bfloat16, float32-int8head and float16-int8head only; and a failed
compile leaves the eager pass."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from textgen.config import ConfigError, Settings
from textgen.engine.batch import DecodeBatch
from textgen.engine.params import SamplingParams
from textgen.model import float16_op
from textgen.model.attention import compiled_attention_wins
from textgen.model.compiled import MAX_TOKENS, _compile, lone_tokens
from textgen.model.cpu import detect_cpu, this_cpu
from textgen.model.loading import load_model
from textgen.model.native import (
    attention_dtype,
    compile_state,
    compiled_dtype,
    native_decoding,
    start_compiling,
)
from textgen.model.source import resolve_model

from .test_segments import prompt

STEPS = 80  # past the traced capacity (compiled.EXAMPLE_CAPACITY) and past the cache's first growth


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's compile cache: each model's step compiles once, later tests load it."""
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture
def compiled(model, packages, monkeypatch):  # type: ignore[no-untyped-def]
    """The conftest's tiny GPT-2 or Llama with its lone row's pass compiled in float32 (exact up to rounding:
    the batch's float32 passes never compile, see the module), uncompiled again afterwards. Its passes take
    prompts on any CPU here (`lone_tokens` says where they do when serving): what they compute is tested,
    not how fast."""
    monkeypatch.setattr("textgen.model.compiled.lone_tokens", lambda cpu: MAX_TOKENS)
    lone = native_decoding(model).lone
    assert lone.compile(torch.float32, packages), lone.state
    lone.steps = lone.many = 0
    yield lone
    lone.compiled, lone.state = None, "off"


@pytest.fixture
def untraced(monkeypatch):  # type: ignore[no-untyped-def]
    """torch.export fails in this process (a process compiling apart traces as usual): what passes with it
    traced nothing here."""

    def no_export(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a pass was traced in this process")

    monkeypatch.setattr(torch.export, "export", no_export)


@contextlib.contextmanager
def eagerly(lone) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Passes in the block take the eager path, as if `lone` had not compiled."""
    saved, lone.compiled = lone.compiled, None
    try:
        yield
    finally:
        lone.compiled = saved


@torch.inference_mode()  # as the engine runs its passes, and as the graph is traced
def test_the_compiled_pass_gives_the_eager_logits_for_a_prompt_and_as_the_cache_grows(model, compiled):
    vocab = model.config.vocab_size
    ours, mine = DecodeBatch.prefill(model, [0], [prompt(7, 80)], vocab)
    assert compiled.many == 1  # the prompt's pass took the compiled path
    with eagerly(compiled):
        eager, logits = DecodeBatch.prefill(model, [0], [prompt(7, 80)], vocab)
    torch.testing.assert_close(mine, logits, rtol=1e-5, atol=1e-5)
    capacities = set()
    for _ in range(STEPS):
        token = logits.argmax(-1)
        ours.record(token)
        eager.record(token)
        mine = ours.step(model)
        with eagerly(compiled):
            logits = eager.step(model)
        torch.testing.assert_close(mine, logits, rtol=1e-5, atol=1e-5)
        capacities.add(ours.segments[0].layers()[0].capacity)
    assert compiled.steps == STEPS  # every step took the compiled path
    assert len(capacities) > 1  # the buffers grew: one program for every capacity
    for mine, theirs in zip(ours.segments[0].layers(), eager.segments[0].layers()):
        assert mine.length == theirs.length == 7 + STEPS
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)


def test_a_lone_streams_speculation_verifies_through_the_compiled_pass(model, compiled, loaded_tiny):
    """Greedy with n-gram drafts: a verification pass of several tokens goes through the compiled pass (and
    its rejected tokens are cut from the buffers it wrote), for the tokens the eager passes give."""
    from textgen.engine.core import Engine

    engine = Engine(model, loaded_tiny.tokenizer, context_length=256, speculative="ngram").start()
    try:
        ids = (prompt(6, 85) * 4)[:20]  # a loop to draft from
        params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True, repetition_penalty=1.0)
        ours = engine.submit(ids, params)
        ours.wait(60)
        assert compiled.many > 1  # the prompt's pass and verifications
        with eagerly(compiled):
            eager = engine.submit(ids, params)
            eager.wait(60)
    finally:
        engine.stop()
    assert ours.sequence.output_ids == eager.sequence.output_ids


def test_the_program_takes_several_tokens_only_where_passes_of_several_take_it(model, monkeypatch):
    """Exported with the number of tokens dynamic where `lone_tokens` lets prompts through, else for one
    token, the program a step alone had before (no AMX: the Zen 4's step keeps the program measured there)."""
    lone = native_decoding(model).lone

    def tokens_dimension(several: int) -> object:
        monkeypatch.setattr("textgen.model.compiled.lone_tokens", lambda cpu: several)
        program = lone.export(torch.float32)
        hidden = next(
            node for node in program.graph.nodes if node.op == "placeholder" and node.name == "hidden"
        )
        return hidden.meta["val"].shape[0]

    assert tokens_dimension(1) == 1
    assert isinstance(tokens_dimension(MAX_TOKENS), torch.SymInt)


@torch.inference_mode()
def test_a_float32_pass_reads_the_models_own_weights(model, compiled):
    """A float32 package holds no weights: the program reads the model's own tensors where they are (the
    weights are in memory once), so a weight changed in place changes its next pass as it does the eager
    one's. (bfloat16's package holds its weights as laid out for its kernels.)"""
    vocab = model.config.vocab_size
    assert compiled.weights(torch.float32) is not None and compiled.weights(torch.bfloat16) is None
    body = model.base_model
    weight = (body.ln_f if hasattr(body, "ln_f") else body.norm).weight  # the final norm's
    _, before = DecodeBatch.prefill(model, [0], [prompt(7, 80)], vocab)
    saved = weight.clone()
    weight.mul_(2.0)
    try:
        _, mine = DecodeBatch.prefill(model, [0], [prompt(7, 80)], vocab)
        with eagerly(compiled):
            _, eager = DecodeBatch.prefill(model, [0], [prompt(7, 80)], vocab)
    finally:
        weight.copy_(saved)
    assert compiled.many == 2  # both through the compiled pass
    torch.testing.assert_close(mine, eager, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mine, before, rtol=1e-3, atol=1e-3)


def test_a_restart_loads_the_step_it_compiled_before(compiled, packages):
    """The fixture compiled (or, for the second test of a model, loaded) the step into the cache: compiling
    again, as a restarted server does, loads that package instead of compiling."""
    assert compiled.compile(torch.float32, packages)
    assert compiled.state.startswith("loaded from the cache in "), compiled.state
    assert not list((packages / "compiled").glob("partial-*"))


@torch.inference_mode()
def test_the_program_is_called_without_pytree_at_every_call(compiled, monkeypatch):
    """AOTInductor's own runner flattens its arguments with torch's pytree at every call (0.11-0.13 ms of a
    lone stream's step); textgen's calls its loader with them flattened in place, for the same outputs."""
    from torch.utils import _pytree

    from textgen.model.compiled import Runner

    kv_heads, head_dim = compiled.kv_shape
    positions = torch.tensor([3])
    hidden = compiled.embed(torch.tensor([5]), positions)
    buffers = [
        (torch.randn(1, kv_heads, 8, head_dim), torch.randn(1, kv_heads, 8, head_dim))
        for _ in range(compiled.layers)
    ]
    runner = compiled.compiled
    assert isinstance(runner, Runner)
    theirs = runner.aoti_runner(hidden, positions, [(k.clone(), v.clone()) for k, v in buffers])

    def no_pytree(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("pytree flattened the arguments of a call")

    monkeypatch.setattr(_pytree, "tree_flatten", no_pytree)
    torch.testing.assert_close(runner(hidden, positions, buffers), theirs, rtol=0, atol=0)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="finds the loaded library by /proc")
def test_loading_leaves_no_unpacked_copy_in_the_temp_dir(compiled):
    """AOTInductor unpacks a package into a directory of the temp dir to load it, and removed it only when
    the runner was destroyed, which a server's exit never does (~250 MB left in /tmp per program and start):
    the directory is gone once loaded, while its library stays mapped (and the step computes: every other
    test of the module runs it after this removal)."""
    mapped = {
        line.split(maxsplit=5)[5].removesuffix(" (deleted)")
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "/aotinductor_" in line
    }
    assert mapped, "the compiled step's library is not mapped from an unpacked directory"
    assert not [path for path in mapped if Path(path).exists()]


@torch.inference_mode()
def test_the_cache_key_is_the_program_with_its_weights_the_machine_and_torch(model, monkeypatch):
    """The key is had without tracing the pass (`makings`): it changes with a weight's value, the model's
    configuration, textgen's model code, inductor's options, the CPU's flags and torch's version."""
    from textgen.model import compiled as module

    steps = native_decoding(model).lone
    cpu = detect_cpu()
    options = module.inductor_options(cpu)

    def key(dtype: torch.dtype = torch.float32, **changes) -> str:  # type: ignore[no-untyped-def]
        return module._package_key(
            *steps.makings(dtype), changes.get("options", options), changes.get("cpu", cpu)
        )

    first = key()
    assert key() == first  # the same pass
    body = model.base_model
    weights = (body.ln_f if hasattr(body, "ln_f") else body.norm).weight  # the final norm's
    saved = weights.clone()
    with torch.no_grad():
        weights[0] += 1.0  # one weight changed, the shapes the same
    try:
        assert key() != first
    finally:
        with torch.no_grad():
            weights.copy_(saved)
    assert key() == first  # restored
    # The norms' epsilon, which no tensor shows: the model's configuration reaches the pass.
    epsilon = next(name for name in steps.config if "eps" in name)
    assert steps.config[epsilon] == getattr(model.config, epsilon)
    steps.config[epsilon] = 1e-3
    try:
        assert key() != first
    finally:
        steps.config[epsilon] = getattr(model.config, epsilon)
    assert key() == first
    assert key(torch.bfloat16) != first
    assert key(options={**options, "max_autotune_gemm_backends": "ATEN"}) != first
    assert key(cpu=dataclasses.replace(cpu, flags=frozenset({"sse2"}), raw_flags=None)) != first
    monkeypatch.setattr(module, "_code_fingerprint", lambda: "other code")
    assert key() != first
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert key() != first


def test_the_cache_key_reads_projections_packed_for_onednn() -> None:
    """A bfloat16 projection's weight packed for oneDNN (where oneDNN computes bfloat16) is neither a
    parameter nor a buffer; the key still reads its values: two models alike but for one projection's weights
    (a merged LoRA fine-tune) get two packages."""
    from textgen.model import compiled as module
    from textgen.model.linear import Linear

    cpu = detect_cpu()
    options = module.inductor_options(cpu)
    weight = torch.randn(16, 8).bfloat16()
    changed = weight.clone()
    changed[3, 5] += 1.0

    def key(projection: torch.Tensor) -> str:
        body = torch.nn.Sequential(Linear(projection, torch.zeros(16, dtype=torch.bfloat16)))
        return module._package_key({}, module._held_tensors(body), options, cpu)

    assert key(weight) == key(weight.clone())
    assert key(changed) != key(weight)


def test_a_restart_finds_the_package_without_tracing_the_pass(compiled, packages, untraced):
    """Tracing holds the GIL for seconds (SmolLM2: 8 s on the AMX Xeon) and the server's engine steps beside
    the thread that loads the package: a cached package is found and loaded without torch.export."""
    with torch.inference_mode():
        assert compiled.compile(torch.float32, packages), compiled.state
    assert compiled.state.startswith("loaded from the cache in "), compiled.state


def test_the_cache_keeps_the_most_recently_used_packages_of_each_kind(tmp_path):
    from textgen.model import compiled as module

    for age in range(module.KEPT_PACKAGES + 2):
        for kind in ("step", "attention"):
            package = tmp_path / f"{kind}-{age}.pt2"
            package.write_bytes(b"")
            os.utime(package, (1000 - age, 1000 - age))  # step-0 the newest
    module._prune(tmp_path, "step")
    kept = [f"step-{a}.pt2" for a in range(module.KEPT_PACKAGES)]
    attention = [f"attention-{a}.pt2" for a in range(module.KEPT_PACKAGES + 2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + attention)


@torch.inference_mode()
def test_rows_in_a_batch_chunks_and_long_prompts_keep_the_eager_pass(model, compiled, monkeypatch):
    vocab = model.config.vocab_size
    batch, logits = DecodeBatch.prefill(model, [0, 1], [prompt(7, 80), prompt(9, 81)], vocab)
    batch.record(logits.argmax(-1))
    batch.step(model)
    filling = DecodeBatch.start(2, prompt(30, 82), vocab, False, staggered=True)
    filling.extend(model, prompt(30, 82)[:10])
    filling.extend(model, prompt(30, 82)[10:11])  # one token, but a prompt's: all its logits are kept
    monkeypatch.setattr("textgen.model.compiled.lone_tokens", lambda cpu: 6)
    DecodeBatch.prefill(model, [3], [prompt(7, 83)], vocab)
    assert compiled.steps == compiled.many == 0


@torch.inference_mode()
def test_the_rest_of_a_prompt_after_its_cached_beginning_takes_the_compiled_pass(model, compiled):
    """A lone row's prompt continued from the prefix cache (`DecodeBatch.start` with `cached`, then
    `extend`) reads adopted buffers, zeroed past the cached part: the compiled pass takes it."""
    from textgen.engine.prefix_cache import PrefixCache

    vocab = model.config.vocab_size
    ids = prompt(40, 84)
    with eagerly(compiled):
        whole, _ = DecodeBatch.prefill(model, [0], [ids[:32]], vocab)
    cache = PrefixCache(64 << 20, "test")
    cache.insert(ids[:32], *whole.row_kv(0, 32))
    cached = cache.lookup(ids, 16)
    assert cached is not None and cached.tokens == 32
    ours = DecodeBatch.start(1, ids, vocab, False, cached=cached, staggered=True)
    mine = ours.extend(model, ids[cached.tokens :])
    assert compiled.many == 1
    with eagerly(compiled):
        eager = DecodeBatch.start(1, ids, vocab, False, cached=cached, staggered=True)
        theirs = eager.extend(model, ids[cached.tokens :])
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours.segments[0].layers(), eager.segments[0].layers()):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)


def test_without_a_cache_the_step_compiles_into_a_temporary_directory_removed_after(
    model, compiled, monkeypatch, tmp_path
):
    """No writable cache: the package is compiled into a directory of the temp dir, removed once loaded, and
    also when loading fails."""
    if model.config.model_type != "gpt2":
        pytest.skip("one model shows it (a compile costs ~15 s)")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert compiled.compile(torch.float32, None), compiled.state
    assert compiled.state.startswith("compiled in "), compiled.state
    assert not list(tmp_path.iterdir())

    def broken(package):  # type: ignore[no-untyped-def]
        raise RuntimeError("cannot load")

    monkeypatch.setattr("textgen.model.compiled._compile", lambda program, options, package: package.touch())
    monkeypatch.setattr("textgen.model.compiled._load_package", broken)
    assert not compiled.compile(torch.float32, None)
    assert compiled.state == "off: compiling failed (RuntimeError: cannot load)"
    assert not list(tmp_path.iterdir())


def test_a_compile_parses_each_kernel_template_once(monkeypatch, tmp_path):
    """Inductor's C++ GEMM template asks for the same jinja sources for every product it writes; within a
    compile each is parsed once (compiled._parse_kernel_templates_once) and still renders each call anew."""
    from torch._inductor.codegen.common import KernelTemplate

    def compile_and_package(program, package_path, inductor_configs):  # type: ignore[no-untyped-def]
        parsed = KernelTemplate._template_from_string("{{ rows }} rows of {{ width }}")
        assert KernelTemplate._template_from_string("{{ rows }} rows of {{ width }}") is parsed
        assert parsed.render(rows=1, width=576) == "1 rows of 576"
        assert parsed.render(rows=32, width=1536) == "32 rows of 1536"
        Path(package_path).write_bytes(b"package")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    _compile(None, {}, tmp_path / "step.pt2")
    assert (tmp_path / "step.pt2").read_bytes() == b"package"


def test_a_failed_compile_leaves_the_eager_step(model, monkeypatch, caplog, tmp_path):
    def no_compiler(program, **options):  # type: ignore[no-untyped-def]
        raise RuntimeError("Compiler: cc is not found\nmore detail")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    steps = native_decoding(model).lone
    with caplog.at_level(logging.WARNING, logger="textgen.model.compiled"):
        assert not steps.compile(torch.float32, tmp_path)
    assert steps.compiled is None
    assert steps.state == "off: compiling failed (RuntimeError: Compiler: cc is not found)"
    assert "a lone stream's pass stays eager: compiling failed" in caplog.text
    assert not list(tmp_path.rglob("*.pt2"))  # nothing half-made left in the cache
    with torch.inference_mode():
        batch, logits = DecodeBatch.prefill(model, [0], [prompt(7, 80)], model.config.vocab_size)
        batch.record(logits.argmax(-1))
        assert batch.step(model).shape == (1, model.config.vocab_size)
    steps.state = "off"


@pytest.mark.parametrize("dtype", ["bfloat16", "bfloat16-int8head", "float32-int8head", "float16-int8head"])
def test_the_server_compiles_its_steps_in_the_background(
    dtype, tiny_model_dir, cache_dir, tmp_path, monkeypatch, untraced
):
    """The way the service starts it (Frontend.warmup): after the warm-up, bfloat16 layers (and
    float32-int8head's float32 ones) compile in a process of its own (the int8 output layer stays outside
    the step, so bfloat16-int8head finds bfloat16's package in the cache), after the batch's attention where
    it wins, and a lone stream's steps then go through the compiled pass (its prompt too, where
    `lone_tokens` says so). Where float32-int8head's layers are packed for oneDNN (AMD's CPUs) its step
    decodes eagerly; float16-int8head's compiles everywhere, with FBGEMM's float16 products. The float16
    keys and values of both go through the compiled attention where the CPU has no float16 arithmetic. The
    compiling process's directory of inductor's working files is removed when it ends. The server itself never
    traces a pass (torch.export holds the GIL for seconds: its engine would stall), not even to find the
    package in the cache.
    """
    from textgen.frontend.prepare import Frontend

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where that directory goes

    if dtype == "float32-int8head" and compiled_dtype(dtype) is None:  # AMD's CPUs: 30 s for nothing new
        pytest.skip("its step is eager here (tests/test_loading.py), its attention float16-int8head's")
    settings = Settings(model_name=str(tiny_model_dir), threads=1, dtype=dtype, cache_dir=cache_dir)
    loaded = load_model(settings, resolve_model(settings))
    decoding = native_decoding(loaded.model)
    steps, attention = decoding.lone, decoding.attention
    tensors, rows = compiled_dtype(dtype), attention_dtype(loaded.model, dtype)
    assert rows is not None
    attends = compiled_attention_wins(this_cpu(), 1, attention.heads, attention.kv_heads, rows, 1)
    frontend = Frontend(loaded, settings)
    try:
        frontend.warmup()
        if tensors is None:  # float32-int8head on AMD CPUs
            assert compile_state(loaded.model) == (
                "off: float32-int8head decodes eagerly (its float32 products are oneDNN's packed ones here)"
            )
        else:
            assert compile_state(loaded.model) == "compiling"
        for program in (attention, steps):
            if program.thread is not None:
                program.thread.join()
        # bfloat16-int8head's programs are bfloat16's (its output layer is outside): loaded, not compiled.
        done = ("compiled in a process of its own in ", "loaded from the cache in ")
        expected = done[1] if dtype == "bfloat16-int8head" else done[0]
        if tensors is not None:
            assert compile_state(loaded.model).startswith(expected), compile_state(loaded.model)
        # Before it, in the same thread, the batch's attention, where it wins on this CPU.
        if attends:
            assert compile_state(loaded.model, "attention").startswith(done), compile_state(
                loaded.model, "attention"
            )
            assert attention.dtype == rows  # float32-int8head's: float16, as its cache stores them
        else:
            assert compile_state(loaded.model, "attention").startswith("off: ")
        if dtype == "float16-int8head":  # its program multiplies on every thread: textgen's op
            assert float16_op.loaded() and _calls_textgen_float16_linear(cache_dir, steps)
        steps.steps = steps.many = attention.calls = 0
        params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True, speculative=False)
        ids = loaded.tokenizer.encode("What is AI?")
        result = frontend.engine.submit(ids, params).wait(60)
        if tensors == torch.float32:  # a float32 pass (float16-int8head's: the server's own handles)
            with eagerly(steps):
                assert frontend.engine.submit(ids, params).wait(60).text == result.text
    finally:
        frontend.close()
    assert result.completion_tokens == 20 and result.error is None
    if tensors is None:  # every step eager, its attention compiled where it wins
        assert steps.steps == 0 and attention.calls == (19 * len(decoding.layers) if attends else 0)
    else:
        # Every step after the prompt's pass, and that pass too where this CPU's products take many rows fast.
        assert steps.steps == 19 and steps.many == int(lone_tokens(this_cpu()) > 1)
    assert not list(tmp_path.iterdir())


def test_the_compiling_process_stops_with_the_server(tiny_model_dir, tmp_path):
    """A server stopped while its step compiles apart (textgen/model/compile_step.py) takes the compile
    with it, and no half-written package stays in the cache, nor inductor's working files in the temp dir."""
    import subprocess
    import sys
    import time

    env = {
        **os.environ,
        "MODEL_NAME": str(tiny_model_dir),
        "TEXTGEN_DTYPE": "bfloat16",
        "TEXTGEN_THREADS": "1",
        "TEXTGEN_CACHE_DIR": str(tmp_path),
        # as the server sets it (compiled._compile_apart): inductor's working files
        "TEXTGEN_COMPILE_SCRATCH": str(tmp_path / "scratch"),
    }
    (tmp_path / "scratch").mkdir()
    log = tmp_path / "log"
    # Stands in for the server: starts the compile, says its pid, and stops once the model is loaded.
    server = f"""
import os, pathlib, subprocess, sys, time
log = pathlib.Path({str(log)!r})
child = subprocess.Popen(
    [sys.executable, "-m", "textgen.model.compile_step"],
    env={{**os.environ, "TEXTGEN_COMPILE_PARENT": str(os.getpid())}},
    stdout=subprocess.DEVNULL,
    stderr=log.open("w"),
)
print(child.pid, flush=True)
deadline = time.monotonic() + 40
while time.monotonic() < deadline and "dtype bfloat16" not in log.read_text():
    time.sleep(0.1)
"""
    started = subprocess.run(
        [sys.executable, "-c", server], env=env, capture_output=True, text=True, timeout=60
    )
    child = int(started.stdout.split()[0])
    deadline = time.monotonic() + 20
    while _alive(child):
        assert time.monotonic() < deadline, "the compile went on after its server stopped"
        time.sleep(0.2)
    assert not list(tmp_path.rglob("*.pt2"))
    assert not (tmp_path / "scratch").exists()  # its directory of inductor's working files went with it
    said = log.read_text()
    assert "dtype bfloat16" in said and "Traceback" not in said, said  # it was under way, and did not fail


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_tracing_a_pass_that_reads_the_models_tensors_leaves_the_served_modules_alone(model, monkeypatch):
    """A float32 pass's program takes the model's tensors as inputs, which torch.export swaps for fake
    tensors in the traced modules while it traces: it traces a shadow of them (native.shadow_modules), so
    the modules the engine runs meanwhile keep their real tensors (a request mid-trace failed otherwise), and
    the program's inputs keep the body's names, by which the model's tensors are handed to it."""
    from torch._subclasses.fake_tensor import FakeTensor

    import textgen.model.native as native

    lone = native_decoding(model).lone
    served = [*lone.body.parameters(), *lone.body.buffers()]
    seen: list[torch.Tensor] = []
    trace = native._lone_row

    def watched(buffers, positions):  # called inside the pass as it is traced
        seen.extend(tensor for module in lone.body.modules() for tensor in module._parameters.values())
        return trace(buffers, positions)

    monkeypatch.setattr(native, "_lone_row", watched)
    with torch.inference_mode():
        program = lone.export(torch.float32)
    assert seen and not any(isinstance(tensor, FakeTensor) for tensor in seen)
    assert all(a is b for a, b in zip(served, [*lone.body.parameters(), *lone.body.buffers()]))
    inputs = set(program.graph_signature.parameters) | set(program.graph_signature.buffers)
    assert inputs and inputs <= set(lone.weights(torch.float32))


def test_float16_weights_handles_are_inputs_and_keep_out_of_the_package_key(tiny_model_dir):
    """float16-int8head's products take FBGEMM's packed weights by handle: the program's inputs (a handle is
    a pointer: as a constant AOTInductor would copy its bytes and lose the matrix), the model's own at each
    call, and never part of the package's key, so a restart, with other handles, finds the same package.
    (The server's background compile checks the pass's numbers: test above.)"""
    from textgen.model.compiled import _package_key

    settings = Settings(model_name=str(tiny_model_dir), threads=1, dtype="float16-int8head")
    cpu = detect_cpu()
    keys, models = [], []  # both models kept: their handles' storage cannot be reused
    for _ in range(2):
        models.append(load_model(settings, resolve_model(settings)).model)
        lone = native_decoding(models[-1]).lone
        assert len(lone.handles) == 4 * 2  # GPT-2's four products a layer, two layers
        assert lone.example(torch.float32)[3] is lone.handles
        keys.append(_package_key(*lone.makings(torch.float32), lone.options(cpu, torch.float32), cpu))
    first, second = (native_decoding(model).lone.handles[0] for model in models)
    assert keys[0] == keys[1] and first.data_ptr() != second.data_ptr()


def test_other_formats_and_models_decode_eagerly(loaded_tiny):
    """float32 and float32-packed promise a row computes the same alone and in a batch; int8's products are
    FBGEMM's. float32-int8head compiles its float32 layers (its int8 output layer promises no such thing)."""
    assert start_compiling(loaded_tiny.model, "float32") == "off: float32 decodes eagerly"
    assert start_compiling(loaded_tiny.model, "float32-packed") == "off: float32-packed decodes eagerly"
    assert start_compiling(loaded_tiny.model, "int8") == "off: int8 decodes eagerly"
    from .test_cpu import machine

    intel, amd = machine("skylake"), machine("epyc-zen3")
    assert compiled_dtype("float32-int8head", intel) == torch.float32
    assert compiled_dtype("float32-int8head", amd) is None  # its layers packed for oneDNN there
    assert (
        compiled_dtype("float16-int8head", intel) == compiled_dtype("float16-int8head", amd) == torch.float32
    )
    assert compiled_dtype("bfloat16") == compiled_dtype("bfloat16-int8head") == torch.bfloat16
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2))
    assert start_compiling(t5, "bfloat16") == "off: Hugging Face's forward pass decodes this model"


def test_compiling_can_be_turned_off() -> None:
    assert Settings.from_env({}).compile == "auto"
    assert Settings.from_env({"TEXTGEN_COMPILE": "off"}).compile == "off"
    with pytest.raises(ConfigError, match="TEXTGEN_COMPILE must be one of auto, off"):
        Settings.from_env({"TEXTGEN_COMPILE": "yes"})


def test_the_products_kernels_follow_the_cpu() -> None:
    """Inductor's C++ template where bfloat16 is native on x86, AMX or AVX512_BF16 (measured faster on both);
    oneDNN's packed products on an AMX CPU whose oneDNN is capped below AMX (the template would use AMX all
    the same) and wherever bfloat16 is emulated (nothing compiles there by default, but an explicit
    TEXTGEN_DTYPE=bfloat16 does)."""
    from textgen.model.compiled import gemm_backends

    from .test_cpu import GRAVITON3, capped, machine

    assert gemm_backends(machine("epyc-zen4")) == "CPP"
    assert gemm_backends(machine("cooper-lake")) == "CPP"
    assert gemm_backends(machine("sapphire-rapids")) == "CPP"
    assert gemm_backends(capped("sapphire-rapids", ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16")) is None
    assert gemm_backends(machine("epyc-zen3")) is None
    assert gemm_backends(capped("epyc-zen4", ONEDNN_MAX_CPU_ISA="AVX2")) is None
    assert gemm_backends(detect_cpu(GRAVITON3)) is None


def test_prompts_take_the_compiled_pass_where_the_template_multiplies_many_rows_fast() -> None:
    """With AMX the template's micro-kernel multiplies a prompt's rows fast: prompts of up to MAX_TOKENS go
    through a lone row's compiled pass; without AMX (its 32-row kernel is a float32-vector one, 6x slower
    than oneDNN's) or with oneDNN's products, only steps do."""
    from .test_cpu import capped, machine

    assert lone_tokens(machine("sapphire-rapids")) == MAX_TOKENS
    assert lone_tokens(machine("epyc-zen4")) == 1
    assert lone_tokens(machine("cooper-lake")) == 1
    assert lone_tokens(capped("sapphire-rapids", ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16")) == 1
    assert lone_tokens(machine("epyc-zen3")) == 1


def _calls_textgen_float16_linear(cache_dir: Path, program) -> bool:  # type: ignore[no-untyped-def]
    """Whether the newest package of `program`'s kind calls textgen::float16_linear (AOTInductor's proxy
    executor calls ops outside its C shim by the names in the package's wrapper.json)."""
    package = max((cache_dir / "compiled").glob(f"{program.kind}-*.pt2"), key=lambda p: p.stat().st_mtime)
    with zipfile.ZipFile(package) as archive:
        return any(
            b'"textgen::float16_linear"' in archive.read(name)
            for name in archive.namelist()
            if name.endswith("wrapper.json")
        )
