"""The OpenAI-compatible API's bodies, how they become a PromptRequest, and the bodies of the answers.

/v1/completions and /v1/chat/completions take OpenAI's bodies, plus textgen's `top_k`,
`repetition_penalty` and `no_repeat_ngram_size` as extra fields (as vLLM does). Unlike /generate,
nothing is added to what the client asked for: those extras default to off, no textgen template
frames the prompt and no post-processing touches the output, because OpenAI clients expect the
model's raw output.

Bounds are those of /generate (params.RANGES), checked by SamplingParams, under OpenAI's names; the
server's limits are checked once for every dialect, in frontend/prepare.py.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from textgen.engine.params import RANGES, ParamError, Range, SamplingParams
from textgen.frontend.generate_protocol import Usage  # the same counts, in OpenAI's field names
from textgen.frontend.prepare import FieldNames, PromptRequest
from textgen.frontend.templates import RenderedPrompt, has_chat_template, render_chat

N_RANGE = Range(1, 16)  # choices per prompt; they all join the engine's batch at once
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# The chat template for models that have none (GPT-2, the tiny test model): a plain transcript that
# ends with "Assistant:" for the model to continue, and stops where it would invent the user's turn.
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
FALLBACK_STOP = ("\nUser:",)
COMPLETION_FIELDS = FieldNames(prompt="prompt", max_tokens="max_tokens")
CHAT_FIELDS = FieldNames(prompt="messages", max_tokens="max_tokens")


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

    def to_sampling_params(self, max_tokens: int | None, max_tokens_field: str) -> SamplingParams:
        """Engine parameters under OpenAI's semantics: always sampled (temperature 0 is greedy)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ParamError(
                    name,
                    f"{name} is not supported by textgen (only 0); use repetition_penalty "
                    f"(1 = off, > 1 discourages repeats) or no_repeat_ngram_size instead",
                )
        N_RANGE.check("n", self.n)
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                repetition_penalty=self.repetition_penalty,
                no_repeat_ngram_size=self.no_repeat_ngram_size,
                do_sample=True,
                seed=self.seed,
                stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            )
        except ParamError as exc:
            raise exc.renamed({"max_new_tokens": max_tokens_field}) from None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(examples=["Once upon a time"])
    max_tokens: int | None = Field(
        default=DEFAULT_COMPLETION_MAX_TOKENS, description="Default 16, as OpenAI."
    )
    echo: bool = Field(default=False, description="Prepend the prompt to each choice's text.")

    def to_prompt_request(self, tokenizer: Any) -> PromptRequest:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise ParamError("prompt", "prompt must be a string or a non-empty list of strings")
        params = self.to_sampling_params(self.max_tokens, "max_tokens")
        return PromptRequest([RenderedPrompt(p) for p in prompts], params, n=self.n, fields=COMPLETION_FIELDS)


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

    def to_prompt_request(self, tokenizer: Any) -> PromptRequest:
        if not self.messages:
            raise ParamError("messages", "messages must hold at least one message")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ParamError("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        fields = CHAT_FIELDS
        if self.max_completion_tokens is not None:
            fields = FieldNames(prompt="messages", max_tokens="max_completion_tokens")
        # No max_tokens: as long as the server allows, capped by the context (frontend/prepare.py).
        params = self.to_sampling_params(self.max_tokens or self.max_completion_tokens, fields.max_tokens)
        return PromptRequest([render_messages(self.messages, tokenizer)], params, n=self.n, fields=fields)


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


@dataclass(frozen=True)
class Call:
    """What the answer to one OpenAI request needs to know besides the results."""

    kind: Literal["completion", "chat"]
    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    echo_texts: list[str] | None = None  # with `echo`: each prompt's text, prepended to its choices

    @classmethod
    def of(cls, req: "CompletionRequest | ChatCompletionRequest", model: str) -> "Call":
        kind: Literal["completion", "chat"] = "completion" if isinstance(req, CompletionRequest) else "chat"
        echo = None
        if isinstance(req, CompletionRequest) and req.echo:
            echo = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        return cls(
            kind=kind,
            id=f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            echo_texts=echo,
        )


def check_model(requested: str | None, served: str) -> None:
    """Raise LookupError unless `requested` names the served model (omitted means the served model)."""
    if requested is not None and requested != served:
        raise LookupError(
            f"the model {requested!r} does not exist on this server; it serves {served!r} (GET /v1/models)"
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


def choice_body(call: Call, index: int, text: str, reason: str | None) -> dict[str, Any]:
    if call.kind == "completion":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": reason,
    }


def chunk_choice(call: Call, index: int, text: str, reason: str | None, first: bool) -> dict[str, Any]:
    if call.kind == "completion":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    delta: dict[str, Any] = {"content": text}
    if first:
        delta["role"] = "assistant"
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}


def envelope(call: Call, *, chunk: bool, **fields: Any) -> dict[str, Any]:
    if call.kind == "completion":
        obj = "text_completion"
    else:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    return {"id": call.id, "object": obj, "created": call.created, "model": call.model, **fields}


def models_body(model_id: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "textgen"}],
    }
