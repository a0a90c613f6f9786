"""The OpenAI-compatible API's bodies, how they become a PromptRequest, and the bodies of the answers.

/v1/completions and /v1/chat/completions take OpenAI's bodies, plus vLLM's and textgen's extra fields
(`top_k`, `min_p`, `repetition_penalty`, `no_repeat_ngram_size`, `ignore_eos`, `min_tokens`,
`speculative`, the token rules and output options /generate shares, `truncate_prompt_tokens`,
`return_token_ids`, ...). Unlike /generate, nothing of textgen's is added to what the client asked for:
those extras default to off (`speculative` to the server's default, as on /generate: it changes speed, not
quality), no textgen template frames the prompt and no post-processing touches the output, because OpenAI
clients expect the model's raw output. A sampling field the client leaves unset takes the model's own
default when it has one (model/sampling_defaults.py; as vLLM's --generation-config auto), else OpenAI's.

Bounds are those of /generate (params.RANGES), checked by SamplingParams, under OpenAI's names; the
server's limits are checked once for every dialect, in frontend/prepare.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from textgen.engine.params import (
    LOGIT_BIAS_RANGE,
    MAX_LOGIT_BIAS,
    RANGES,
    Constraint,
    ParamError,
    Range,
    SamplingParams,
    THINKING_BUDGET_RANGE,
)
from textgen.engine.outputs import TokenLogprob
from textgen.frontend.prepare import (
    FieldNames,
    Prepared,
    PromptRequest,
    SpeculativeField,
    OutputTextFields,
    TokenRuleFields,
    shared_sampling_fields,
)
from textgen.frontend.structured import StructuredOutputFields
from textgen.frontend.usage import TokenCounts
from textgen.frontend.templates import ChatEnd, RenderedPrompt, has_chat_template, render_chat
from textgen.frontend.answer import prompt_thinks, split_answer
from textgen.frontend.reasoning import Effort, thinking_variables
from textgen.frontend.tools import (
    ToolCall,
    ToolFields,
    ToolUse,
    hermes_conversation,
    takes_tools,
    template_messages,
)

N_RANGE = Range(1, 16)  # choices per prompt; they all join the engine's batch at once
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# The chat template for models that have none (GPT-2, the tiny test model): a plain transcript that
# ends with "Assistant:" for the model to continue, and stops where it would invent the user's turn.
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
FALLBACK_STOP = ("\nUser:",)
# The OpenAPI description of a field the model may give a default for (model/sampling_defaults.py).
_MODEL_DEFAULT = " Unset: the model's default if it has one (GET /info sampling_defaults), else "


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        default=False,
        description="vLLM's: with include_usage, every chunk also carries its choice's usage so far.",
    )
    include_obfuscation: bool | None = Field(
        default=None, description="OpenAI's: accepted; textgen pads no stream events with obfuscation."
    )


class OpenAIBookkeeping(BaseModel):
    """What OpenAI's SDK may send to the chat and Responses APIs that changes nothing on textgen, accepted and
    ignored so that code written for OpenAI runs unchanged (vLLM ignores every unknown field; textgen still
    refuses unknown ones, so that a misspelt field is an error)."""

    service_tier: str | None = Field(None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(
        None, description="Accepted: textgen caches prompt prefixes by itself (TEXTGEN_PREFIX_CACHE_MB)."
    )
    prompt_cache_retention: str | None = Field(None, description="Accepted, as prompt_cache_key.")


class SamplingFields(StructuredOutputFields, SpeculativeField, OutputTextFields, TokenRuleFields):
    """The fields both routes share. Unknown fields are rejected (400), never silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = Field(
        default=None,
        description="The served model's id (GET /v1/models). Optional on textgen: omitted means the served model.",
    )
    temperature: float = Field(
        default=1.0, description=f"0 = greedy. Allowed: {RANGES['temperature']}.{_MODEL_DEFAULT}1."
    )
    top_p: float = Field(
        default=1.0, description=f"Nucleus sampling mass. Allowed: {RANGES['top_p']}.{_MODEL_DEFAULT}1."
    )
    n: int = Field(default=1, description=f"Choices per prompt. Allowed: {N_RANGE}.")
    stop: str | list[str] | None = Field(default=None, description="Up to 16 strings that end a choice.")
    seed: int | None = Field(default=None, description="Choice i of n uses seed + i.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(
        default=0.0,
        description="Subtracted once from the logit of every token already generated; negative values "
        f"encourage them. Allowed: {RANGES['presence_penalty']}.",
    )
    frequency_penalty: float = Field(
        default=0.0,
        description="Subtracted from a token's logit once per time it was generated. "
        f"Allowed: {RANGES['frequency_penalty']}.",
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        description='Added to the logits of the given token ids, e.g. {"50256": -100} bans GPT-2\'s '
        f"end-of-text. Allowed: {LOGIT_BIAS_RANGE} per token, at most {MAX_LOGIT_BIAS} tokens.",
    )
    max_tokens: int | None = None
    max_completion_tokens: int | None = Field(
        default=None,
        description="OpenAI's newer name for max_tokens; giving both is fine when they are equal.",
    )
    user: str | None = Field(default=None, description="Accepted and ignored.")
    # textgen's and vLLM's extras, off by default on these routes
    top_k: int = Field(default=0, description=f"0 = off. Allowed: {RANGES['top_k']}.{_MODEL_DEFAULT}0.")
    min_p: float = Field(
        default=0.0,
        description="Keep only tokens at least min_p times as likely as the likeliest; 0 = off. "
        f"Allowed: {RANGES['min_p']}.{_MODEL_DEFAULT}0.",
    )
    repetition_penalty: float = Field(
        default=1.0, description=f"1 = off. Allowed: {RANGES['repetition_penalty']}.{_MODEL_DEFAULT}1."
    )
    no_repeat_ngram_size: int = Field(
        default=0, description=f"0 = off. Allowed: {RANGES['no_repeat_ngram_size']}.{_MODEL_DEFAULT}0."
    )
    ignore_eos: bool = Field(
        default=False, description="Keep generating past the end-of-text token (vLLM's)."
    )
    min_tokens: int = Field(
        default=0,
        description="Neither end-of-text nor a stop string ends a choice before this many tokens (vLLM's). "
        f"Allowed: {RANGES['min_tokens']}, at most max_tokens.",
    )

    return_token_ids: bool | None = Field(
        default=None,
        description="vLLM's: the token ids too: each choice's generated ones (`token_ids`; in a stream, each "
        "chunk's since the last) and the prompt's (`prompt_token_ids`: in each choice of a completion, at "
        "the top of a chat completion; in a stream, in the first chunk).",
        json_schema_extra={"nullable": True},
    )
    return_tokens_as_token_ids: bool | None = Field(
        default=None,
        description='vLLM\'s: with logprobs, tokens are named "token_id:N" rather than by their text (a '
        "token alone may not be whole UTF-8).",
        json_schema_extra={"nullable": True},
    )
    truncate_prompt_tokens: int | None = Field(
        default=None,
        description="vLLM's: keep only the prompt's last N tokens (after templating) instead of refusing one "
        "that does not fit the context; -1 keeps as much of its end as fits beside max_tokens.",
    )

    def truncated_to(self) -> int | None:
        """truncate_prompt_tokens, checked: None, -1 (what fits) or a positive number of tokens."""
        keep = self.truncate_prompt_tokens
        if keep is not None and keep != -1 and keep < 1:
            raise ParamError(
                "truncate_prompt_tokens", f"truncate_prompt_tokens must be -1 or at least 1, got {keep}"
            )
        return keep

    @staticmethod
    def names(prompt: str, max_tokens: str) -> FieldNames:
        """This dialect's names for the fields errors are about."""
        return FieldNames(prompt=prompt, max_tokens=max_tokens, truncate="truncate_prompt_tokens")

    def token_budget(self) -> tuple[int | None, str]:
        """The token limit and the name the client gave it: max_tokens or max_completion_tokens.

        Load generators send both (guidellm, with the same value); two different limits are a mistake.
        """
        given = self.model_fields_set
        old = self.max_tokens if "max_tokens" in given else None
        new = self.max_completion_tokens
        if new is None:
            return self.max_tokens, "max_tokens"
        if old is not None and old != new:
            raise ParamError(
                "max_completion_tokens",
                f"max_tokens ({old}) and max_completion_tokens ({new}) differ; they are two names for the "
                "same limit: give one of them, or the same value in both",
            )
        return new, "max_tokens" if old is not None else "max_completion_tokens"

    def to_sampling_params(
        self, max_tokens: int | None, max_tokens_field: str, defaults: Mapping[str, Any] | None = None
    ) -> SamplingParams:
        """Engine parameters under OpenAI's semantics: always sampled (temperature 0 is greedy).

        `defaults`: the model's own for the fields the client did not set (as vLLM's generation config).
        """
        N_RANGE.check("n", self.n)
        try:
            return SamplingParams(
                **shared_sampling_fields(self, defaults),
                max_new_tokens=max_tokens,
                do_sample=True,
                stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            )
        except ParamError as exc:
            raise exc.renamed({"max_new_tokens": max_tokens_field}) from None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        examples=["Once upon a time"],
        description="A string, a list of strings, a list of token ids, or a list of lists of token ids.",
    )
    max_tokens: int | None = Field(
        default=DEFAULT_COMPLETION_MAX_TOKENS,
        description="Default 16, as OpenAI; max_completion_tokens is accepted as another name for it.",
    )
    echo: bool = Field(default=False, description="Prepend the prompt to each choice's text.")
    logprobs: int | None = Field(
        default=None,
        description="Log-probabilities of each token and of its `logprobs` likeliest alternatives, from the "
        "model's raw distribution (before temperature and penalties), 0 to 20; with `echo`, of the prompt's "
        "tokens too (the first one has none).",
    )

    def to_prompt_request(self, tokenizer: Any, defaults: Mapping[str, Any] | None = None) -> PromptRequest:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]  # type: ignore[list-item]
        if not prompt:
            raise ParamError(
                "prompt", "prompt must be a string, a list of token ids, or a non-empty list of them"
            )
        rendered = [
            (RenderedPrompt(p) if isinstance(p, str) else RenderedPrompt("", token_ids=tuple(p)))
            for p in prompt
        ]
        max_tokens, name = self.token_budget()
        params = self.to_sampling_params(max_tokens, name, defaults)
        if self.logprobs is not None:
            RANGES["logprobs"].check("logprobs", self.logprobs)
            scored = self.logprobs if self.echo else None
            params = dataclasses.replace(params, logprobs=self.logprobs, prompt_logprobs=scored)
        return PromptRequest(
            rendered,
            params,
            n=self.n,
            fields=self.names("prompt", name),
            truncate=self.truncated_to(),
        )


class ContentPart(BaseModel):
    """One part of a message's content. textgen serves text models: only {"type": "text", "text": "..."}."""

    model_config = ConfigDict(extra="allow", strict=True)  # other kinds of parts get textgen's own 400

    type: str = Field(examples=["text"])
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description='"developer" is OpenAI\'s newer name for "system"; "tool" carries a tool call\'s result.'
    )
    content: str | list[ContentPart] | None = Field(
        None,
        description='A string, or a list of text parts [{"type": "text", "text": "..."}], joined by '
        "newlines; may be null only in an assistant message with tool_calls.",
    )
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant message's calls.")
    tool_call_id: str | None = Field(None, description="A tool message's: the call it answers.")

    def for_template(self, index: int) -> dict[str, Any]:
        """This message as chat templates take it; `index` is its place in `messages`, for errors."""
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(index),
        }
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    def text(self, index: int) -> str:
        """The content as one string; `index` is this message's place in `messages`, for errors."""
        field = f"messages.{index}.content"
        if self.content is None:
            if self.role == "assistant" and self.tool_calls:
                return ""
            raise ParamError(
                field, f"{field} is missing: only an assistant message with tool_calls may omit it"
            )
        return joined_text(self.content, field)


def joined_text(content: str | list[ContentPart], field: str) -> str:
    """Content given as a string or as text parts, as one string; `field` names it in errors."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise ParamError(
                field,
                f"{field}.{j} is a part of type {part.type!r}; this server's model reads text only: "
                'send the content as a string or as parts {"type": "text", "text": "..."}',
            )
        if part.text is None or part.model_extra:
            raise ParamError(
                field,
                f'{field}.{j}: a text part is {{"type": "text", "text": "..."}}, '
                f"got the keys {sorted(part.model_dump(exclude_none=True))}",
            )
        texts.append(part.text)
    # Several text parts are joined by newlines, as vLLM does.
    return "\n".join(texts)


class Prediction(BaseModel):
    """OpenAI's Predicted Outputs: text the answer is expected to repeat much of (a file being edited)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["content"]
    content: str | list[ContentPart]


class ChatCompletionRequest(SamplingFields, ToolFields, OpenAIBookkeeping):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(
        examples=[[{"role": "user", "content": "What is the capital of France?"}]]
    )
    max_tokens: int | None = Field(default=None, description="Default: the server's TEXTGEN_MAX_NEW_TOKENS.")
    logprobs: bool = Field(default=False, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(
        default=None, description="With logprobs: also the likeliest alternatives at each position, 0 to 20."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="vLLM's: variables for the model's chat template, e.g. "
        '{"enable_thinking": false} for Qwen3.',
    )
    reasoning_effort: Effort | None = Field(
        default=None,
        description="OpenAI's: \"none\" turns a thinking model's thought off, any other effort on (its chat "
        "template's enable_thinking; reasoning_effort for templates that read it, as gpt-oss's). No effect "
        "on a model that does not think; chat_template_kwargs wins over it.",
    )
    thinking_token_budget: int | None = Field(
        None,
        description="vLLM's: most tokens of a thinking model's thought; one still open then is closed "
        "(</think> forced) and the answer follows. No effect on a model that does not think.",
    )
    prediction: Prediction | None = Field(
        None,
        description='OpenAI\'s Predicted Outputs, {"type": "content", "content": "..."}: text the answer is '
        "expected to repeat much of (a file being edited). It drafts tokens for speculative decoding beside "
        "the prompt, and turns speculation on for the request unless `speculative` is false; greedy output "
        "stays the same, sampled output keeps its distribution.",
    )
    store: bool | None = Field(None, description="Accepted: textgen keeps no completions.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored (as store).")
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="Accepted and ignored.")
    modalities: list[Literal["text"]] | None = Field(None, description='["text"]: textgen writes text only.')
    continue_final_message: bool = Field(
        default=False,
        description="vLLM's: the answer continues the last message, an assistant's, instead of starting a "
        "turn of its own (a prefill: the start of the answer, written for the model).",
    )
    add_generation_prompt: bool = Field(
        default=True,
        description="vLLM's: false ends the prompt after the last message, without opening the assistant's "
        "turn (the model's template decides what then comes).",
    )

    def chat_end(self) -> ChatEnd:
        """How the rendered conversation ends: the answer's turn opened, the last message continued, or
        neither."""
        if self.continue_final_message:
            if self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
                raise ParamError(
                    "add_generation_prompt",
                    "add_generation_prompt and continue_final_message cannot both be true: the answer "
                    "either opens a turn of its own or continues the last message",
                )
            last = self.messages[-1]
            if last.role != "assistant" or last.tool_calls:
                raise ParamError(
                    "continue_final_message",
                    "continue_final_message continues the last message, which must then be an assistant's "
                    "text (without tool_calls)",
                )
            return "continue"
        return "answer" if self.add_generation_prompt else "closed"

    def constraint(self) -> Constraint | None:
        """The structured-output constraint, or the grammar a "required" or named tool_choice forces."""
        asked = super().constraint()
        use = self.tool_use()
        forced = use.constraint() if use is not None else None
        if forced is not None and asked is not None:
            raise ParamError(
                "tool_choice",
                f"this tool_choice forces the output's form, so {asked.field} cannot be given with it; "
                'use tool_choice "auto" or drop one of them',
            )
        return forced or asked

    def to_prompt_request(self, tokenizer: Any, defaults: Mapping[str, Any] | None = None) -> PromptRequest:
        if not self.messages:
            raise ParamError("messages", "messages must hold at least one message")
        max_tokens, name = self.token_budget()
        fields = self.names("messages", name)
        # No max_tokens: as long as the server allows, capped by the context (frontend/prepare.py).
        params = self.to_sampling_params(max_tokens, name, defaults)
        if self.top_logprobs is not None:
            RANGES["logprobs"].check("top_logprobs", self.top_logprobs)
            if not self.logprobs:
                raise ParamError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.logprobs:
            params = dataclasses.replace(params, logprobs=self.top_logprobs or 0)
        if self.thinking_token_budget is not None:  # checked whether or not the model thinks
            THINKING_BUDGET_RANGE.check("thinking_token_budget", self.thinking_token_budget)
        switch = thinking_variables(self.reasoning_effort) if self.reasoning_effort is not None else None
        rendered = render_messages(
            self.messages,
            tokenizer,
            self.tool_use(),
            self.chat_template_kwargs,
            self.chat_end(),
            switch,
        )
        predicted = joined_text(self.prediction.content, "prediction.content") if self.prediction else None
        return PromptRequest(
            [rendered],
            params,
            n=self.n,
            fields=fields,
            truncate=self.truncated_to(),
            prediction=predicted,
            chat=True,
            thinking_budget=self.thinking_token_budget,
        )


class ChatDialect(BaseModel):
    """A body of another API that becomes a chat request (the Responses and Messages APIs): built once by
    `_as_chat` (the route reads its tool use after preparing it) and prepared as chat, its ParamErrors naming
    the prompt and the token budget by this dialect's names (`FIELDS`; its routes rename the other fields)."""

    FIELDS: ClassVar[FieldNames]
    _chat: ChatCompletionRequest | None = PrivateAttr(None)

    def _as_chat(self) -> ChatCompletionRequest:
        raise NotImplementedError

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion request."""
        if self._chat is None:
            self._chat = self._as_chat()
        return self._chat

    def to_prompt_request(self, tokenizer: Any, defaults: Mapping[str, Any] | None = None) -> PromptRequest:
        """The engine's input, as the chat request's."""
        request = self.to_chat().to_prompt_request(tokenizer, defaults)
        return dataclasses.replace(request, fields=self.FIELDS)


def render_fallback_chat(messages: list[dict[str, str]], end: ChatEnd = "answer") -> RenderedPrompt:
    """The documented transcript for models without a chat template, e.g.

        System: Be brief.
        User: What is AI?
        Assistant:

    The model continues after "Assistant:" (`end` "continue": after the last message, an assistant's;
    "closed": after the last message, whoever's); the stop string "\\nUser:" ends its turn.
    """
    lines = [f"{FALLBACK_ROLES[m['role']]}: {m['content']}" for m in messages]
    text = "\n".join(lines) + ("\nAssistant:" if end == "answer" else "")
    # The transcript's own text has no special tokens: all of it is encoded as plain text.
    return RenderedPrompt(text, stop=FALLBACK_STOP, special_tokens_as_text=True)


def render_messages(
    messages: list[ChatMessage],
    tokenizer: Any,
    tools: ToolUse | None = None,
    template_options: dict[str, Any] | None = None,
    end: ChatEnd = "answer",
    thinking: dict[str, Any] | None = None,
) -> RenderedPrompt:
    """The model's own chat template when it has one, else the plain fallback transcript; tools, earlier
    calls and their results as the template renders them, else in the Hermes format (frontend/tools.py).
    `end`: how the chat ends (templates.ChatEnd). `thinking`: the template
    variables a thinking switch sets (frontend/reasoning.py), under `template_options`; nothing to set, and
    no error, without a template."""
    given = [m.for_template(i) for i, m in enumerate(messages)]
    shown = tools.shown() if tools is not None else None
    options = {**(thinking or {}), **(template_options or {})} or None
    turn = {"end": end}
    if has_chat_template(tokenizer) and takes_tools(tokenizer):
        return render_chat(template_messages(given), tokenizer, tools=shown, options=options, **turn)
    plain = hermes_conversation(given, shown)
    if has_chat_template(tokenizer):
        return render_chat(plain, tokenizer, options=options, **turn)
    if template_options:
        raise ParamError(
            "chat_template_kwargs",
            "this model has no chat template, so chat_template_kwargs has nothing to set",
        )
    return render_fallback_chat(plain, end)


@dataclass(frozen=True)
class Call:
    """What the answer to one OpenAI request needs to know besides the results."""

    kind: Literal["completion", "chat"]
    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    continuous_usage: bool = (
        False  # usage so far in every chunk (vLLM's stream_options.continuous_usage_stats)
    )
    echo_texts: list[str] | None = None  # with `echo`: each prompt's text, prepended to its choices
    tools: ToolUse | None = None  # a chat request's tool calling: its choices' text becomes calls
    # A thinking model's chat (frontend/reasoning.py): whether the prompt opened <think>; None: no split.
    thinking: bool | None = None
    token_ids: bool = False  # vLLM's return_token_ids: the prompt's and the choices' token ids too
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:N"

    @classmethod
    def of(
        cls,
        req: "CompletionRequest | ChatCompletionRequest",
        prepared: Prepared,
        model: str,
    ) -> "Call":
        kind: Literal["completion", "chat"] = "completion" if isinstance(req, CompletionRequest) else "chat"
        echo = None
        if isinstance(req, CompletionRequest) and req.echo:
            echo = [p.text for p in prepared.request.prompts]
        options = req.stream_options
        return cls(
            kind=kind,
            id=f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model,
            stream=req.stream,
            include_usage=bool(options and options.include_usage),
            continuous_usage=bool(options and options.include_usage and options.continuous_usage_stats),
            echo_texts=echo,
            tools=req.tool_use() if isinstance(req, ChatCompletionRequest) else None,
            thinking=prompt_thinks(prepared),  # None for a completion: never split
            token_ids=bool(req.return_token_ids),
            tokens_as_ids=bool(req.return_tokens_as_token_ids),
        )


def check_model(requested: str | None, served: str) -> None:
    """Raise LookupError unless `requested` names the served model (omitted means the served model)."""
    if requested is not None and requested != served:
        raise LookupError(
            f"the model {requested!r} does not exist on this server; it serves {served!r} (GET /v1/models)"
        )


# -- response bodies -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens served from the prefix cache, not computed.")


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = Field(description="A thinking model's thought, its tags included.")
    accepted_prediction_tokens: int = Field(
        description="With a `prediction`: draft tokens looked up in it that the model checked and kept."
    )
    rejected_prediction_tokens: int = Field(description="With a `prediction`: checked and not kept.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens the model saw, each prompt counted once.")
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(
        None, description="In a whole answer's usage.", json_schema_extra={"nullable": True}
    )
    completion_tokens_details: CompletionTokensDetails | None = Field(
        None, description="In a whole answer's usage.", json_schema_extra={"nullable": True}
    )


class CompletionChoice(BaseModel):
    index: int
    text: str
    # nullable spelled out: BentoML's OpenAPI writer keeps only the first member of `X | None`.
    logprobs: dict[str, list[Any]] | None = Field(None, json_schema_extra={"nullable": True})
    finish_reason: Literal["stop", "length"] | None
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids (vLLM's).")
    token_ids: list[int] | None = Field(None, description="With return_token_ids (vLLM's).")


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
    content: str | None = Field(json_schema_extra={"nullable": True})
    tool_calls: list[ToolCall] | None = Field(None, description="With tools: the calls the model made.")
    reasoning_content: str | None = Field(
        None, description="A thinking model's reasoning (its <think> block), apart from the answer."
    )


class AssistantDelta(BaseModel):
    """A streamed chunk's piece of the message (`role` on the first chunk only)."""

    role: Literal["assistant"] | None = None
    content: str | None = Field(json_schema_extra={"nullable": True})
    tool_calls: list[dict[str, Any]] | None = Field(
        None,
        description="With tools: each call's piece, by `index`; its first piece has `id`, `type` and "
        "the name.",
    )
    reasoning_content: str | None = Field(None, description="A thinking model's reasoning, as it comes.")


# One model documents both the JSON answer and the streamed chunks (the OpenAPI document gives the SSE events
# the 200 body's schema), so what differs between them is optional here. `nullable` is spelled out because
# BentoML's OpenAPI writer keeps only the first member of `X | None`.
class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage | None = Field(None, description="In the JSON answer.")
    delta: AssistantDelta | None = Field(None, description="In a streamed chunk.")
    logprobs: dict[str, list[dict[str, Any]]] | None = Field(None, json_schema_extra={"nullable": True})
    finish_reason: Literal["stop", "length", "tool_calls"] | None = Field(
        json_schema_extra={"nullable": True}
    )
    token_ids: list[int] | None = Field(None, description="With return_token_ids (vLLM's).")


class ChatCompletionResponse(BaseModel):
    """The 200 body of /v1/chat/completions; with `stream`, chunks carry `delta` instead of `message`, and
    only the last (with stream_options.include_usage) carries `usage`."""

    id: str
    object: Literal["chat.completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = Field(None, json_schema_extra={"nullable": True})
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids (vLLM's).")


def finish_reason(reason: str) -> str:
    """OpenAI knows `stop` and `length`; textgen's `eos` (the model ended its text) is a `stop`."""
    return "length" if reason == "length" else "stop"


def usage_body(counts: TokenCounts) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": counts.prompt,
        "completion_tokens": counts.completion,
        "total_tokens": counts.total,
    }
    if counts.whole:
        body["prompt_tokens_details"] = {"cached_tokens": counts.cached}
        body["completion_tokens_details"] = {
            "reasoning_tokens": counts.reasoning,
            "accepted_prediction_tokens": counts.accepted_prediction,
            "rejected_prediction_tokens": counts.rejected_prediction,
        }
    return body


def choice_body(
    call: Call,
    index: int,
    text: str,
    reason: str,
    logprobs: dict[str, Any] | None = None,
    ids: TokenIds | None = None,
) -> dict[str, Any]:
    """One choice of a whole answer; `ids`: its prompt's and its own token ids (vLLM's return_token_ids)."""
    if call.kind == "completion":
        body = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return body | (ids.of_choice(call) if ids is not None else {})
    reasoning, content, reply = split_answer(text, call.thinking, call.tools)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if reply is not None and call.tools is not None:
        message["content"] = reply.content
        if reply.calls:
            message["tool_calls"] = reply.calls
        reason = call.tools.finish_reason(reason, reply)
    body = {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
    return body | (ids.of_choice(call) if ids is not None else {})


def chunk_choice(
    call: Call,
    index: int,
    text: str,
    reason: str | None,
    first: bool,
    logprobs: dict[str, Any] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    reasoning: str = "",
    ids: TokenIds | None = None,
) -> dict[str, Any]:
    """One choice's piece of a stream; `ids`: the token ids it names (vLLM's return_token_ids)."""
    named = ids.of_choice(call) if ids is not None else {}
    if call.kind == "completion":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason} | named
    delta: dict[str, Any] = {"content": text}
    if first:
        delta["role"] = "assistant"
    if reasoning:
        delta["reasoning_content"] = reasoning
    if tool_calls:
        delta["tool_calls"] = tool_calls
    if (reasoning or tool_calls) and not text:
        delta["content"] = None
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason} | named


@dataclass
class TokenIds:
    """vLLM's return_token_ids for one choice (or one chunk of it): the ids it generated, and its prompt's
    where they go with it (None elsewhere: a chat completion's prompt ids sit at the top of the body)."""

    generated: list[int]
    prompt: list[int] | None = None

    def of_choice(self, call: Call) -> dict[str, Any]:
        """The choice's fields: `token_ids`, and a completion's `prompt_token_ids`; none unless asked."""
        if not call.token_ids:
            return {}
        prompt = {"prompt_token_ids": self.prompt} if call.kind == "completion" and self.prompt else {}
        return prompt | {"token_ids": self.generated}

    @staticmethod
    def of_chat(call: Call, prompt: list[int]) -> dict[str, Any]:
        """A chat completion's (or its first chunk's) top-level `prompt_token_ids`, when asked."""
        return {"prompt_token_ids": prompt} if call.token_ids and call.kind == "chat" else {}


def logprobs_body(
    call: Call, tokenizer: Any, scores: list[TokenLogprob] | None, echoed: list[TokenLogprob] | None = None
) -> dict[str, Any] | None:
    """A choice's (or a chunk's) `logprobs` in the route's shape; `echoed`: the prompt's, first."""
    if scores is None:
        return None
    if call.kind == "chat":
        return chat_logprobs(tokenizer, scores, call.tokens_as_ids)
    return completion_logprobs(tokenizer, (echoed or []) + scores, as_ids=call.tokens_as_ids)


def envelope(call: Call, *, chunk: bool, **fields: Any) -> dict[str, Any]:
    if call.kind == "completion":
        obj = "text_completion"
    else:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    return {"id": call.id, "object": obj, "created": call.created, "model": call.model, **fields}


def model_body(model_id: str, created: int, context_length: int | None) -> dict[str, Any]:
    """The served model in OpenAI's shape and Anthropic's at once (each client reads its own fields: OpenAI's
    `object`, `created`, `owned_by`; Anthropic's `type`, `display_name`, `created_at`), with vLLM's
    `max_model_len` (its context, once loaded) for clients that size requests by it."""
    since = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    model = {"id": model_id, "object": "model", "created": created, "owned_by": "textgen", "root": model_id}
    model |= {"type": "model", "display_name": model_id, "created_at": since}
    return model | ({"max_model_len": context_length} if context_length is not None else {})


def models_body(model: dict[str, Any]) -> dict[str, Any]:
    """GET /v1/models: the one served model (`model_body`), listed as OpenAI and Anthropic list models."""
    model_id = model["id"]
    return {"object": "list", "data": [model], "has_more": False, "first_id": model_id, "last_id": model_id}


# -- log-probabilities -------------------------------------------------------------------------------


def token_name(tokenizer: Any, token: int, as_ids: bool = False) -> str:
    """A token as logprobs name it: its text, or "token_id:N" (vLLM's return_tokens_as_token_ids)."""
    return f"token_id:{token}" if as_ids else tokenizer.decode([token])


def completion_logprobs(
    tokenizer: Any, scores: list[TokenLogprob], start_offset: int = 0, as_ids: bool = False
) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset; the first token of
    an echoed prompt has null log-probability and alternatives. `as_ids`: tokens named by id."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    for score in scores:
        text = tokenizer.decode([score.token])
        tokens.append(token_name(tokenizer, score.token, as_ids))
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(score.logprob)
        top = {token_name(tokenizer, t, as_ids): lp for t, lp in score.top}
        top_logprobs.append(None if score.logprob is None else top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: Any, scores: list[TokenLogprob], as_ids: bool = False) -> dict[str, Any]:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}; `as_ids`: tokens
    named by id (their bytes stay their text's)."""

    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {
            "token": token_name(tokenizer, token, as_ids),
            "logprob": logprob,
            "bytes": list(text.encode()),
        }

    return {
        "content": [
            {**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in scores
        ]
    }
