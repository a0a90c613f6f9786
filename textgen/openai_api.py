"""The OpenAI-compatible API's bodies, and their translation into engine requests (no HTTP here).

/v1/completions and /v1/chat/completions take OpenAI's bodies, plus textgen's `top_k`,
`repetition_penalty` and `no_repeat_ngram_size` as extra fields (as vLLM does). Unlike /generate,
nothing is added to what the client asked for: those extras default to off, no textgen template
frames the prompt and no post-processing touches the output, because OpenAI clients expect the
model's raw output.

Bounds are those of /generate (params.RANGES), checked by SamplingParams, under OpenAI's names.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from textgen.params import RANGES, ParamError, Range, SamplingParams
from textgen.schemas import Usage  # the same counts as /generate's, in OpenAI's field names
from textgen.templates import RenderedPrompt, has_chat_template, render_chat

N_RANGE = Range(1, 16)  # choices per prompt; they all join the engine's batch at once
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# The chat template for models that have none (GPT-2, the tiny test model): a plain transcript that
# ends with "Assistant:" for the model to continue, and stops where it would invent the user's turn.
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
FALLBACK_STOP = ("\nUser:",)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both routes share. Unknown fields are rejected (400), never silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = Field(
        default=None,
        description="The served model's id (GET /v1/models). Optional on textgen: omitted means the served model.",
    )
    temperature: float = Field(default=1.0, description=f"0 = greedy. Allowed: {RANGES['temperature']}.")
    top_p: float = Field(default=1.0, description=f"Nucleus sampling mass. Allowed: {RANGES['top_p']}.")
    n: int = Field(default=1, description=f"Choices per prompt. Allowed: {N_RANGE}.")
    stop: str | list[str] | None = Field(default=None, description="Up to 16 strings that end a choice.")
    seed: int | None = Field(default=None, description="Choice i of n uses seed + i.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, description="Only 0 is supported; see repetition_penalty.")
    frequency_penalty: float = Field(default=0.0, description="Only 0 is supported; see repetition_penalty.")
    user: str | None = Field(default=None, description="Accepted and ignored.")
    # textgen extras, off by default on these routes
    top_k: int = Field(default=0, description=f"0 = off. Allowed: {RANGES['top_k']}.")
    repetition_penalty: float = Field(
        default=1.0, description=f"1 = off. Allowed: {RANGES['repetition_penalty']}."
    )
    no_repeat_ngram_size: int = Field(
        default=0, description=f"0 = off. Allowed: {RANGES['no_repeat_ngram_size']}."
    )


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(examples=["Once upon a time"])
    max_tokens: int | None = Field(
        default=DEFAULT_COMPLETION_MAX_TOKENS, description="Default 16, as OpenAI."
    )
    echo: bool = Field(default=False, description="Prepend the prompt to each choice's text.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(
        examples=[[{"role": "user", "content": "What is the capital of France?"}]]
    )
    max_tokens: int | None = Field(default=None, description="Default: the server's TEXTGEN_MAX_NEW_TOKENS.")
    max_completion_tokens: int | None = Field(default=None, description="OpenAI's newer name for max_tokens.")


def render_fallback_chat(messages: list[dict[str, str]]) -> RenderedPrompt:
    """The documented transcript for models without a chat template, e.g.

        System: Be brief.
        User: What is AI?
        Assistant:

    The model continues after "Assistant:"; the stop string "\\nUser:" ends its turn.
    """
    lines = [f"{FALLBACK_ROLES[m['role']]}: {m['content']}" for m in messages]
    return RenderedPrompt("\n".join(lines) + "\nAssistant:", stop=FALLBACK_STOP)


def render_messages(messages: list[ChatMessage], tokenizer: Any) -> RenderedPrompt:
    """The model's own chat template when it has one, else the plain fallback transcript."""
    plain = [{"role": m.role, "content": m.content} for m in messages]
    if has_chat_template(tokenizer):
        return render_chat(plain, tokenizer)
    return render_fallback_chat(plain)


@dataclass
class EngineRequest:
    """One choice as the engine sees it: which prompt it continues, and how."""

    index: int  # the choice's index in the response
    prompt: int  # index into Plan.prompts
    params: SamplingParams


@dataclass
class Plan:
    """A validated OpenAI request: tokenized prompts and one engine request per choice."""

    kind: Literal["completion", "chat"]
    id: str
    created: int
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str]
    choices: list[EngineRequest]
    stream: bool
    include_usage: bool
    echo: bool = False


@dataclass(frozen=True)
class Limits:
    """What the serving process allows, from Settings and the loaded model."""

    model_id: str
    max_new_tokens: int
    max_prompt_chars: int
    context_length: int


def check_model(requested: str | None, served: str) -> None:
    """Raise LookupError unless `requested` names the served model (omitted means the served model)."""
    if requested is not None and requested != served:
        raise LookupError(
            f"the model {requested!r} does not exist on this server; it serves {served!r} (GET /v1/models)"
        )


def plan_completion(req: CompletionRequest, tokenizer: Any, limits: Limits) -> Plan:
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise ParamError("prompt", "prompt must be a string or a non-empty list of strings")
    rendered = [RenderedPrompt(p) for p in prompts]
    return _plan(
        "completion", req, "prompt", rendered, req.max_tokens, "max_tokens", tokenizer, limits, req.echo
    )


def plan_chat(req: ChatCompletionRequest, tokenizer: Any, limits: Limits) -> Plan:
    if not req.messages:
        raise ParamError("messages", "messages must hold at least one message")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise ParamError("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
    field, max_tokens = "max_tokens", req.max_tokens
    if req.max_completion_tokens is not None:
        field, max_tokens = "max_completion_tokens", req.max_completion_tokens
    rendered = [render_messages(req.messages, tokenizer)]
    return _plan("chat", req, "messages", rendered, max_tokens, field, tokenizer, limits, False)


def _plan(
    kind: Literal["completion", "chat"],
    req: SamplingFields,
    prompt_field: str,
    rendered: list[RenderedPrompt],
    max_tokens: int | None,
    max_tokens_field: str,
    tokenizer: Any,
    limits: Limits,
    echo: bool,
) -> Plan:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) != 0:
            raise ParamError(
                name,
                f"{name} is not supported by textgen (only 0); use repetition_penalty "
                f"(1 = off, > 1 discourages repeats) or no_repeat_ngram_size instead",
            )
    N_RANGE.check("n", req.n)
    explicit = max_tokens is not None
    if max_tokens is None:
        max_tokens = limits.max_new_tokens  # chat: as long as the server allows; the context caps it too
    RANGES["max_new_tokens"].check(max_tokens_field, max_tokens)
    if max_tokens > limits.max_new_tokens:
        raise ParamError(
            max_tokens_field,
            f"{max_tokens_field} must be in [1, {limits.max_new_tokens}] on this server "
            f"(TEXTGEN_MAX_NEW_TOKENS), got {max_tokens}",
        )
    for r in rendered:
        if not r.text.strip():
            raise ParamError(prompt_field, f"{prompt_field} must contain some non-whitespace text")
        if len(r.text) > limits.max_prompt_chars:
            raise ParamError(
                prompt_field,
                f"{prompt_field} must be at most {limits.max_prompt_chars} characters "
                f"(TEXTGEN_MAX_PROMPT_CHARS), got {len(r.text)}",
            )
    ids = [list(tokenizer(r.text, add_special_tokens=r.add_special_tokens)["input_ids"]) for r in rendered]
    for prompt_ids in ids:
        n = len(prompt_ids)
        if n >= limits.context_length:
            raise ParamError(
                prompt_field,
                f"{prompt_field} is {n} tokens, more than the model's context of {limits.context_length}; shorten it",
            )
        if explicit and n + max_tokens > limits.context_length:
            # Chat's default max_tokens is simply capped by the context (the engine does it); an explicit
            # request for more than fits is an error, so that a client never silently gets less.
            raise ParamError(
                max_tokens_field,
                f"the prompt is {n} tokens and {max_tokens_field} is {max_tokens}: together more than the "
                f"model's context of {limits.context_length}; set {max_tokens_field} to at most "
                f"{limits.context_length - n}",
            )
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    choices = []
    for p, r in enumerate(rendered):
        for i in range(req.n):
            # Choice i uses seed + i: reproducible, and the n choices still differ from each other.
            seed = None if req.seed is None else req.seed + i
            try:
                params = SamplingParams(
                    max_new_tokens=max_tokens,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    top_k=req.top_k,
                    repetition_penalty=req.repetition_penalty,
                    no_repeat_ngram_size=req.no_repeat_ngram_size,
                    do_sample=True,
                    seed=seed,
                    stop=stop + r.stop,
                )
            except ParamError as exc:
                if exc.field == "seed" and req.seed is not None and i > 0:
                    raise ParamError("seed", f"seed + n - 1 must be at most {RANGES['seed'].high}") from None
                raise
            choices.append(EngineRequest(index=p * req.n + i, prompt=p, params=params))
    prefix = "cmpl" if kind == "completion" else "chatcmpl"
    return Plan(
        kind=kind,
        id=f"{prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=limits.model_id,
        prompts=ids,
        prompt_texts=[r.text for r in rendered],
        choices=choices,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        echo=echo,
    )


# -- response bodies -------------------------------------------------------------------------------


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    """The 200 body of /v1/completions; with `stream`, each SSE chunk has this shape (`usage` last)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    """The 200 body of /v1/chat/completions; with `stream`, chunks carry `delta` instead of `message`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def finish_reason(reason: str) -> str:
    """OpenAI knows `stop` and `length`; textgen's `eos` (the model ended its text) is a `stop`."""
    return "length" if reason == "length" else "stop"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice_body(plan: Plan, index: int, text: str, reason: str | None) -> dict[str, Any]:
    if plan.kind == "completion":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": reason,
    }


def chunk_choice(plan: Plan, index: int, text: str, reason: str | None, first: bool) -> dict[str, Any]:
    if plan.kind == "completion":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    delta: dict[str, Any] = {"content": text}
    if first:
        delta["role"] = "assistant"
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}


def envelope(plan: Plan, *, chunk: bool, **fields: Any) -> dict[str, Any]:
    if plan.kind == "completion":
        obj = "text_completion"
    else:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    return {"id": plan.id, "object": obj, "created": plan.created, "model": plan.model, **fields}


def models_body(model_id: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "textgen"}],
    }
