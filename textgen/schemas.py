"""The request and response bodies of /generate and /generate_stream (pydantic, strict types)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from textgen.params import MAX_STOP_CHARS, MAX_STOP_STRINGS, RANGES
from textgen.templates import TemplateName


def _bounded(name: str, description: str) -> Any:
    """Field metadata for a numeric parameter whose bounds live in `params.RANGES`."""
    bounds = RANGES[name]

    def check(value: Any) -> Any:
        if value is not None:
            try:
                bounds.check(name, value)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return value

    schema = bounds.json_schema()
    return (
        Field(description=f"{description} Allowed: {bounds}.", json_schema_extra=schema),
        AfterValidator(check),
    )


class GenerateRequest(BaseModel):
    """A prompt, how to decode it, how to frame it (template) and how to clean the result."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(
        description="Text to continue (template 'none') or to answer (other templates). Must not be blank.",
        examples=["What is AI?"],
    )
    max_new_tokens: Annotated[int, *_bounded("max_new_tokens", "Most tokens to generate.")] = 200
    temperature: Annotated[float, *_bounded("temperature", "Sampling temperature; 0 = greedy.")] = 0.7
    top_p: Annotated[
        float,
        *_bounded("top_p", "Nucleus sampling: smallest set of tokens with this mass."),
    ] = 0.9
    top_k: Annotated[int, *_bounded("top_k", "Sample among the k likeliest tokens; 0 = off.")] = 0
    repetition_penalty: Annotated[
        float,
        *_bounded("repetition_penalty", "Penalty on tokens already present; 1 = off."),
    ] = 1.2
    no_repeat_ngram_size: Annotated[
        int,
        *_bounded("no_repeat_ngram_size", "Never repeat an n-gram of this size; 0 = off."),
    ] = 2
    do_sample: bool = Field(True, description="False = greedy decoding, whatever the temperature.")
    seed: Annotated[
        int | None,
        *_bounded("seed", "Random seed: same seed and parameters, same text."),
    ] = None
    stop: list[str] = Field(
        default_factory=list,
        max_length=MAX_STOP_STRINGS,
        description=f"Up to {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters; generation "
        "ends before the first one and it is not returned.",
    )
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token.")
    truncate: int | None = Field(
        None,
        ge=1,
        description="Keep only the last N prompt tokens (after templating) instead of refusing a prompt "
        "that does not fit the context; the number dropped is reported in usage.truncated_prompt_tokens.",
    )
    template: TemplateName = Field(
        "none",
        description="Prompt framing: none (raw continuation), assistant (instruction prefix), "
        "few_shot (Q/A examples), chat (the model's own chat template).",
    )
    postprocess: bool = Field(
        True,
        description="False = return the model's text untouched (stop strings still apply).",
    )
    strip_prompt: bool = Field(True, description="Drop the prompt when the model repeats it first.")
    drop_repeated_lines: bool = Field(True, description="Keep only the first of identical lines.")
    max_words: int | None = Field(
        None,
        ge=0,
        description="Cut the text after this many words; 0 = no cap; default: TEXTGEN_MAX_WORDS (200).",
    )
    trim_incomplete_sentence: bool = Field(False, description="Drop a dangling half-sentence at the end.")


FinishReason = Literal["length", "stop", "eos"]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens the model saw (after truncation).")
    completion_tokens: int
    total_tokens: int
    truncated_prompt_tokens: int = Field(0, description="Prompt tokens dropped by `truncate`.")


class Timings(BaseModel):
    queue_ms: float = Field(description="From arrival to the first forward pass.")
    first_token_ms: float = Field(description="From arrival to the first generated token.")
    total_ms: float
    tokens_per_second: float = Field(description="Generated tokens per second, after the first token.")


class GenerateResponse(BaseModel):
    generated_text: str
    model: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    seed: int = Field(description="The seed used; send it back to reproduce a sampled text.")
    batch_size: int = Field(description="Most requests that shared a forward pass with this one.")


class StreamEvent(BaseModel):
    """One Server-Sent Event of /generate_stream; the last one has `finish_reason` and `usage`."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    model: str | None = None
    seed: int | None = None
