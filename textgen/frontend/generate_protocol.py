"""/generate and /generate_stream: their bodies (pydantic, strict types), and how they meet the engine.

A GenerateRequest becomes a PromptRequest for the one door (frontend/prepare.py); a finished sequence
becomes a GenerateResponse or the last StreamEvent, post-processed as the request asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from textgen.engine.params import (
    LOGIT_BIAS_RANGE,
    MAX_LOGIT_BIAS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    RANGES,
    SamplingParams,
)
from textgen.engine.outputs import GenerationResult, TokenLogprob
from textgen.frontend.postprocess import PostProcessing
from textgen.frontend.prepare import (
    Prepared,
    PromptRequest,
    SpeculativeField,
    OutputTextFields,
    TokenRuleFields,
    sampling_field,
    shared_sampling_fields,
)
from textgen.frontend.structured import StructuredOutputFields
from textgen.frontend.templates import TemplateName, render

# The fields a model may give a default for (textgen/model/sampling_defaults.py), said in their description.
_MODEL_DEFAULT = " Unset: the model's default if it has one (GET /info sampling_defaults), else {}."


def _bounded(name: str, description: str, textgen_default: Any = None) -> Any:
    """Field metadata for a numeric parameter whose bounds live in `params.RANGES`; `textgen_default`: the
    default when the model may override it."""
    bounds = RANGES[name]

    def check(value: Any) -> Any:
        if value is not None:
            try:
                bounds.check(name, value)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return value

    schema = bounds.json_schema()
    if textgen_default is not None:
        description += _MODEL_DEFAULT.format(textgen_default)
    return (
        Field(description=f"{description} Allowed: {bounds}.", json_schema_extra=schema),
        AfterValidator(check),
    )


class GenerateRequest(StructuredOutputFields, SpeculativeField, OutputTextFields, TokenRuleFields):
    """A prompt, how to decode it, how to frame it (template) and how to clean the result."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(
        description="Text to continue (template 'none') or to answer (other templates). Must not be blank.",
        examples=["What is AI?"],
    )
    max_new_tokens: Annotated[int, *_bounded("max_new_tokens", "Most tokens to generate.")] = 200
    temperature: Annotated[float, *_bounded("temperature", "Sampling temperature; 0 = greedy.", 0.7)] = 0.7
    top_p: Annotated[
        float,
        *_bounded("top_p", "Nucleus sampling: smallest set of tokens with this mass.", 0.9),
    ] = 0.9
    top_k: Annotated[int, *_bounded("top_k", "Sample among the k likeliest tokens; 0 = off.", 0)] = 0
    min_p: Annotated[
        float,
        *_bounded("min_p", "Keep only tokens at least min_p times as likely as the likeliest; 0 = off.", 0),
    ] = 0.0
    repetition_penalty: Annotated[
        float,
        *_bounded("repetition_penalty", "Penalty on tokens already present; 1 = off.", 1.2),
    ] = 1.2
    no_repeat_ngram_size: Annotated[
        int,
        *_bounded("no_repeat_ngram_size", "Never repeat an n-gram of this size; 0 = off.", 2),
    ] = 2
    presence_penalty: Annotated[
        float,
        *_bounded(
            "presence_penalty",
            "Subtracted once from the logit of every token already generated (OpenAI's); 0 = off.",
        ),
    ] = 0.0
    frequency_penalty: Annotated[
        float,
        *_bounded(
            "frequency_penalty",
            "Subtracted from a token's logit once per time it was generated (OpenAI's); 0 = off.",
        ),
    ] = 0.0
    logit_bias: dict[str, float] | None = Field(
        None,
        description="Added to the logits of the given token ids (POST /tokenize gives them), e.g. "
        '{"50256": -100} bans GPT-2\'s end-of-text. '
        f"Allowed: {LOGIT_BIAS_RANGE} per token, at most {MAX_LOGIT_BIAS} tokens.",
    )
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
    min_tokens: Annotated[
        int,
        *_bounded(
            "min_tokens",
            "Neither end-of-text nor a stop string ends the text before this many tokens; at most "
            "max_new_tokens.",
        ),
    ] = 0
    truncate: int | None = Field(
        None,
        ge=1,
        description="Keep only the last N prompt tokens (after templating) instead of refusing a prompt "
        "that does not fit the context; the number dropped is reported in usage.truncated_prompt_tokens.",
    )
    template: TemplateName = Field(
        "auto",
        description="Prompt framing: auto (the model's chat template if it has one, else none), none (raw "
        "continuation), assistant (instruction prefix), few_shot (Q/A examples), chat (the model's own "
        "chat template).",
    )
    postprocess: bool = Field(
        True,
        description="False = return the model's text untouched (stop strings still apply). Structured output "
        "(response_format, structured_outputs, guided_*) is always returned untouched.",
    )
    strip_prompt: bool = Field(True, description="Drop the prompt when the model repeats it first.")
    drop_repeated_lines: bool = Field(True, description="Keep only the first of identical lines.")
    max_words: int | None = Field(
        None,
        ge=0,
        description="Cut the text after this many words; 0 = no cap; default: TEXTGEN_MAX_WORDS (200).",
    )
    trim_incomplete_sentence: bool = Field(False, description="Drop a dangling half-sentence at the end.")
    logprobs: Annotated[
        int | None,
        *_bounded(
            "logprobs",
            "Return each generated token's log-probability (the model's raw distribution, before temperature "
            "and penalties) and its N likeliest alternatives; unset = none.",
        ),
    ] = None

    def to_sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """Engine parameters; `defaults`: the model's own for the fields the client did not set."""
        return SamplingParams(
            **shared_sampling_fields(self, defaults),
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling_field(self, "do_sample", defaults),
            stop=tuple(self.stop),
            logprobs=self.logprobs,
        )

    def to_prompt_request(self, tokenizer: Any, defaults: Mapping[str, Any] | None = None) -> PromptRequest:
        """The request as the one door takes it: the prompt in its template, and its parameters."""
        return PromptRequest(
            [render(self.template, self.prompt, tokenizer)],
            self.to_sampling_params(defaults),
            truncate=self.truncate,
        )

    def postprocessing(self, default_max_words: int) -> PostProcessing | None:
        if not self.postprocess or self.constraint() is not None:  # cleaning would break what must parse
            return None
        max_words = default_max_words if self.max_words is None else self.max_words
        return PostProcessing(
            strip_prompt=self.strip_prompt,
            drop_repeated_lines=self.drop_repeated_lines,
            max_words=max_words or None,
            trim_incomplete_sentence=self.trim_incomplete_sentence,
        )


# The engine's FinishReason without its failures ("cancelled", "error"), which are HTTP errors instead.
AnswerFinishReason = Literal["length", "stop", "eos"]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens the model saw (after truncation).")
    completion_tokens: int
    total_tokens: int
    truncated_prompt_tokens: int = Field(0, description="Prompt tokens dropped by `truncate`.")
    cached_prompt_tokens: int = Field(
        0, description="Of `prompt_tokens`, those served from the prefix cache instead of computed."
    )


class Timings(BaseModel):
    queue_ms: float = Field(description="From arrival to the first forward pass.")
    first_token_ms: float = Field(description="From arrival to the first generated token.")
    total_ms: float
    tokens_per_second: float = Field(description="Generated tokens per second, after the first token.")


class Alternative(BaseModel):
    token: str
    logprob: float


class TokenScore(BaseModel):
    token: str
    logprob: float
    top_logprobs: list[Alternative]


class GenerateResponse(BaseModel):
    generated_text: str
    model: str
    finish_reason: AnswerFinishReason
    usage: Usage
    timings: Timings
    seed: int = Field(description="The seed used; send it back to reproduce a sampled text.")
    batch_size: int = Field(description="Most requests that shared a forward pass with this one.")
    # nullable spelled out: BentoML's OpenAPI writer keeps only the first member of `X | None`.
    logprobs: list[TokenScore] | None = Field(
        None,
        description="With `logprobs`: one entry per generated token.",
        json_schema_extra={"nullable": True},
    )


class StreamEvent(BaseModel):
    """One Server-Sent Event of /generate_stream; the last one has `finish_reason` and `usage`."""

    text: str
    finish_reason: AnswerFinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    model: str | None = None
    seed: int | None = None


# -- to and from the engine ------------------------------------------------------------------------


def response(
    req: GenerateRequest,
    prepared: Prepared,
    result: GenerationResult,
    model: str,
    post: PostProcessing | None,
    tokenizer: Any = None,
) -> GenerateResponse:
    text = post.apply(result.text, req.prompt) if post is not None else result.text
    return GenerateResponse(
        generated_text=text,
        model=model,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        usage=usage(result, prepared.truncated_tokens[0]),
        timings=timings(result),
        seed=result.seed,
        batch_size=result.max_batch_size,
        logprobs=token_scores(tokenizer, result.logprobs),
    )


def token_scores(tokenizer: Any, scores: list[TokenLogprob] | None) -> list[TokenScore] | None:
    """Generated tokens as text with their log-probabilities (a generated token always has one)."""
    if scores is None:
        return None
    decode = tokenizer.decode
    return [
        TokenScore(
            token=decode([s.token]),
            logprob=s.logprob or 0.0,
            top_logprobs=[Alternative(token=decode([t]), logprob=lp) for t, lp in s.top],
        )
        for s in scores
    ]


def final_event(prepared: Prepared, result: GenerationResult, text: str, model: str) -> StreamEvent:
    return StreamEvent(
        text=text,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        usage=usage(result, prepared.truncated_tokens[0]),
        timings=timings(result),
        model=model,
        seed=result.seed,
    )


def usage(result: GenerationResult, truncated_tokens: int = 0) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        truncated_prompt_tokens=truncated_tokens,
        cached_prompt_tokens=result.cached_tokens,
    )


def timings(result: GenerationResult) -> Timings:
    decode_seconds = result.total_seconds - result.first_token_seconds
    rate = (result.completion_tokens - 1) / decode_seconds if decode_seconds > 0 else 0.0
    return Timings(
        queue_ms=round(result.queue_seconds * 1000, 2),
        first_token_ms=round(result.first_token_seconds * 1000, 2),
        total_ms=round(result.total_seconds * 1000, 2),
        tokens_per_second=round(rate, 2),
    )
