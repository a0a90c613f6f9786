"""The one door into the engine: every dialect's request becomes a `PromptRequest`, and `prepare` checks it.

Each protocol knows how to turn its body into a PromptRequest (vLLM's `to_sampling_params`, TGI's
`try_into_generate`): prompts rendered by its template, decoding parameters, how many choices. From there
one path applies the server's limits (blank prompt, TEXTGEN_MAX_PROMPT_CHARS, TEXTGEN_MAX_NEW_TOKENS, the
model's context, `truncate`), tokenizes, and gives each choice its engine input. Errors name the field as
the dialect calls it (`max_tokens` on OpenAI's routes, `max_new_tokens` on /generate).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, Field

from textgen.config import Settings
from textgen.engine.handle import RequestHandle
from textgen.engine.params import (
    MAX_BAD_WORDS,
    MAX_STOP_TOKEN_IDS,
    RANGES,
    ParamError,
    SamplingParams,
    Thinking,
)
from textgen.frontend.reasoning import THINK_CLOSE, THINK_OPEN, thinking_of
from textgen.frontend.structured import may_constrain
from textgen.frontend.templates import RenderedPrompt
from textgen.model.sampling_defaults import SamplingDefaults

if TYPE_CHECKING:  # torch: imported when a Frontend is built (see textgen/engine/outputs.py)
    from textgen.engine.core import EngineObserver
    from textgen.model.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FieldNames:
    """What the dialect calls the prompt and the token budget, so that errors name its own fields."""

    prompt: str = "prompt"
    max_tokens: str = "max_new_tokens"
    truncate: str | None = "truncate"  # the field that keeps a prompt's end, if the dialect has one


@dataclass(frozen=True)
class PromptRequest:
    """One request in the engine's terms, whatever dialect it arrived in."""

    prompts: list[RenderedPrompt]
    params: SamplingParams  # max_new_tokens None: as many as the server and the context allow
    n: int = 1  # choices per prompt; choice i samples with seed + i
    truncate: int | None = None  # keep only the last N prompt tokens, not refuse an overflow; -1: what fits
    fields: FieldNames = FieldNames()
    prediction: str | None = None  # OpenAI's Predicted Outputs: drafts for speculation (SamplingParams)
    # A chat answer: a thinking model's thought is told apart from it (its tokens counted: usage's reasoning
    # tokens) and, with a budget, bounded (SamplingParams.thinking).
    chat: bool = False
    thinking_budget: int | None = None


@dataclass
class Choice:
    prompt: int  # index into Prepared.prompt_ids
    params: SamplingParams


@dataclass
class Prepared:
    """A request that passed every check: token ids per prompt, engine parameters per choice."""

    request: PromptRequest
    prompt_ids: list[list[int]]
    choices: list[Choice]
    truncated_tokens: list[int] = field(default_factory=list)  # dropped from each prompt's start

    def prompt_of(self, choice: int) -> list[int]:
        """The token ids of the prompt choice `choice` answers."""
        return self.prompt_ids[self.choices[choice].prompt]


class Frontend:
    """The loaded model's engine, and the one path from a PromptRequest to running sequences."""

    def __init__(
        self, loaded: LoadedModel, settings: Settings, observer: EngineObserver | None = None
    ) -> None:
        from textgen.engine.core import Engine
        from textgen.engine.speculative import load_draft_model
        from textgen.model.memory import kv_budget_tokens

        # The model's sampling defaults, within the engine's bounds, are what GET /info and the log report.
        loaded.sampling_defaults = checked_defaults(loaded.sampling_defaults)
        log.info("%s", loaded.sampling_defaults.describe())
        self.loaded = loaded
        self.settings = settings
        self.tokenizer = loaded.tokenizer
        self.engine = Engine(
            loaded.model,
            loaded.tokenizer,
            context_length=loaded.context_length,
            max_batch_size=settings.max_batch_size,
            max_waiting=settings.max_queue,
            observer=observer,
            kv_budget_tokens=kv_budget_tokens(loaded.model, loaded.context_length, settings),
            fault_prompt=settings.test_fault_prompt,  # tests only (textgen/engine/faults.py)
            fault_after_tokens=settings.test_fault_after_tokens,
            speculative=settings.speculative,
            spec_tokens=settings.spec_tokens,
            spec_max_batch=settings.spec_max_batch,
            draft_model=(
                load_draft_model(settings.draft_model, loaded.model, loaded.context_length)
                if settings.draft_model
                else None
            ),
            max_step_tokens=settings.max_step_tokens,
            prefix_cache_bytes=settings.prefix_cache_mb << 20,
            model_key=f"{loaded.model_id} from {loaded.source} as {loaded.dtype}",
        ).start()

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    @property
    def sampling_defaults(self) -> Mapping[str, Any]:
        """The model's defaults for the sampling fields a request leaves unset (model/sampling_defaults.py)."""
        return self.loaded.sampling_defaults.values

    def close(self) -> None:
        self.engine.stop()

    def warmup(self) -> None:
        """One short generation, so the first user request does not pay for lazy initialisation."""
        request = PromptRequest(
            [RenderedPrompt("Hello", user_text="Hello")], SamplingParams(max_new_tokens=2)
        )
        prepared = self.prepare([request])[0]
        assert isinstance(prepared, Prepared), prepared
        self.submit(prepared)[0].wait(timeout=120)
        # After the warm-up generation, in the background: the server is ready meanwhile, decoding eagerly.
        if self.settings.compile != "off":
            from textgen.model.native import start_compiling

            state = start_compiling(
                self.loaded.model, self.loaded.dtype, self.settings.cache_dir, self._same_model_env()
            )
            log.info("compiled decoding step: %s", state)

    async def index_vocabulary_for(self, bodies: list[Any]) -> None:
        """Before the bodies are prepared on the event loop: if one may ask for structured output and the
        vocabulary is not indexed for it yet (textgen/engine/grammar.py), index it in a worker thread (0.28 s
        for GPT-2, once). Not at start: a server that never constrains its output never holds the index
        (random GPT-2 in-process, tcmalloc: 38 MB; 56 with glibc's malloc), and vLLM builds its grammar
        backend at the first structured request too. Others keep being answered meanwhile."""
        grammars = self.engine.grammars
        if grammars.indexed or not any(may_constrain(b) for b in bodies):
            return
        await asyncio.to_thread(grammars.unsupported)

    def _same_model_env(self) -> dict[str, str]:
        """The environment under which another process loads the model this one serves, as it serves it
        (textgen/model/compile_step.py)."""
        return {
            **os.environ,
            "MODEL_NAME": self.loaded.location or self.settings.model_name or "",
            "TEXTGEN_DTYPE": self.loaded.dtype,
            "TEXTGEN_THREADS": str(self.settings.threads),
            "TEXTGEN_CACHE_DIR": str(self.settings.cache_dir),
        }

    def submit(self, prepared: Prepared) -> list[RequestHandle]:
        """Every choice enters the engine at once (they join the same step), or QueueFull is raised."""
        return self.engine.submit_many(
            [(prepared.prompt_of(i), c.params) for i, c in enumerate(prepared.choices)]
        )

    def prepare(self, requests: list[PromptRequest]) -> list[Prepared | ParamError]:
        """Check and tokenize requests that arrived together (one tokenizer call for all their prompts)."""
        checked: list[PromptRequest | ParamError] = []
        for request in requests:
            try:
                self._check_text(request)
                checked.append(request)
            except ParamError as exc:
                checked.append(exc)
        ids = iter(self._tokenize([p for r in checked if isinstance(r, PromptRequest) for p in r.prompts]))
        out: list[Prepared | ParamError] = []
        for request in checked:
            if isinstance(request, ParamError):
                out.append(request)
                continue
            prompt_ids = [next(ids) for _ in request.prompts]
            try:
                out.append(self._prepare_one(request, prompt_ids))
            except ParamError as exc:
                out.append(exc)
        return out

    def count_tokens(self, request: PromptRequest) -> list[int]:
        """Each prompt's length in tokens as it would be submitted, checked as `prepare` checks it, except
        against the context: a client counts to find out whether a conversation fits."""
        self._check_text(request)
        return [len(ids) for ids in self._tokenize(request.prompts)]

    # -- the checks, once for every dialect ------------------------------------------------------

    def _check_text(self, request: PromptRequest) -> None:
        names, limit = request.fields, self.settings.max_prompt_chars
        if not request.prompts:
            raise ParamError(names.prompt, f"{names.prompt} must not be empty")
        for prompt in request.prompts:
            if prompt.token_ids is not None:
                self._check_token_ids(prompt.token_ids, names.prompt)
                continue
            if not prompt.user_text.strip():
                raise ParamError(names.prompt, f"{names.prompt} must contain some non-whitespace text")
            _check_length(names.prompt, prompt.user_text, limit)
        if request.prediction is not None:
            _check_length("prediction", request.prediction, limit)
        self._check_vocabulary(request.params)
        self._check_constraint(request.params)
        wanted = request.params.max_new_tokens
        if wanted is not None and wanted > self.settings.max_new_tokens:
            raise ParamError(
                names.max_tokens,
                f"{names.max_tokens} must be in [1, {self.settings.max_new_tokens}] on this server "
                f"(TEXTGEN_MAX_NEW_TOKENS), got {wanted}",
            )

    def _check_vocabulary(self, params: SamplingParams) -> None:
        vocab = len(self.tokenizer)
        for name, ids in (
            ("logit_bias", [t for t, _ in params.logit_bias]),
            ("stop_token_ids", params.stop_token_ids),
            ("allowed_token_ids", params.allowed_token_ids),
        ):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise ParamError(
                    name,
                    f'{name} holds token id "{bad}", outside this model\'s vocabulary [0, {vocab}); '
                    "POST /tokenize gives the ids of a text",
                )

    def _check_constraint(self, params: SamplingParams) -> None:
        constraint = params.constraint
        if constraint is None:
            return
        # Encoder-decoders too: their runner shares the causal one's masked sampling, and a guide only ever
        # sees the decoder's tokens (never the encoder's prompt). What can rule it out is the tokenizer.
        self.engine.grammars.check(constraint)

    def _check_token_ids(self, ids: tuple[int, ...], field_name: str) -> None:
        vocab = len(self.tokenizer)
        if not ids:
            raise ParamError(field_name, f"{field_name} must hold at least one token id")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ParamError(
                field_name, f"{field_name} holds token id {bad}, outside this model's vocabulary [0, {vocab})"
            )

    def _prepare_one(self, request: PromptRequest, prompt_ids: list[list[int]]) -> Prepared:
        context = self.loaded.context_length
        truncated = []
        for i, ids in enumerate(prompt_ids):
            keep = request.truncate
            if keep == -1:  # as much as fits beside the answer's budget (at least one token)
                keep = max(1, context - (request.params.max_new_tokens or 1))
            cut = max(0, len(ids) - keep) if keep is not None else 0
            truncated.append(cut)
            prompt_ids[i] = ids = ids[cut:]
            if not self.loaded.is_encoder_decoder:  # an encoder's input does not share the decoder's context
                self._check_context(len(ids), request, context)
        asked = request.params
        if request.prediction:  # tokenized here, as the prompts are: within the server's limits
            predicted = tuple(self.tokenizer.encode(request.prediction, add_special_tokens=False))
            asked = dataclasses.replace(asked, prediction=predicted)
        if asked.bad_words:
            asked = dataclasses.replace(asked, bad_words_ids=self._bad_words_ids(asked.bad_words))
        choices = []
        for p, prompt in enumerate(request.prompts):
            params = dataclasses.replace(
                asked,
                max_new_tokens=request.params.max_new_tokens or self.settings.max_new_tokens,
                stop=request.params.stop + prompt.stop,
                penalize_prompt=request.params.penalize_prompt and prompt.penalize_prompt,
                thinking=self._thinking(request, prompt),
            )
            for i in range(request.n):
                choices.append(Choice(p, _with_seed(params, i, request.params.seed)))
        # Prompts given as token ids, now known to be in the vocabulary, get their text (for echo).
        decoded = [
            (
                p
                if p.token_ids is None
                else dataclasses.replace(p, text=self.tokenizer.decode(list(p.token_ids)))
            )
            for p in request.prompts
        ]
        return Prepared(dataclasses.replace(request, prompts=decoded), prompt_ids, choices, truncated)

    def _thinking(self, request: PromptRequest, prompt: RenderedPrompt) -> Thinking | None:
        """How a chat answer to `prompt` holds a thinking model's thought; None for other answers, and when
        the model does not think or a grammar forces the answer (a budget then has nothing to bound)."""
        if not request.chat:
            return None
        opened = thinking_of(self.tokenizer, prompt.text, request.params.constraint is not None)
        if opened is None:
            return None
        return Thinking(THINK_OPEN, THINK_CLOSE, self._think_close_ids, opened, request.thinking_budget)

    def _bad_words_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """Each bad word's token sequences: the word alone, and after a space, so that it is banned at the
        text's start and after a space alike. vLLM takes the spaced form only where it has as many tokens
        as the word alone, which misses most words of a byte-level BPE: GPT-2's " quick" is one token,
        "quick" two."""
        found: list[tuple[int, ...]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in found:
                    found.append(ids)
        return tuple(found)

    @functools.cached_property
    def _think_close_ids(self) -> tuple[int, ...]:
        """The tokens a thought's budget forces: tokenized once, not per request."""
        return tuple(self.tokenizer.encode(THINK_CLOSE, add_special_tokens=False))

    @staticmethod
    def _check_context(n: int, request: PromptRequest, context: int) -> None:
        names, wanted = request.fields, request.params.max_new_tokens
        if wanted is None:  # a default budget is simply capped by the context (the engine does it)
            if n >= context:
                raise ParamError(
                    names.prompt,
                    f"{_the_prompt(names)} is {n} tokens, more than the model's context of {context}; shorten it",
                )
            return
        if n + wanted <= context:
            return
        # An explicit budget that does not fit is an error, so that a client never silently gets less.
        field_name = names.prompt if n >= context else names.max_tokens
        advice = f"shorten the prompt, set {names.max_tokens} to at most {max(context - n, 0)}"
        if names.truncate is not None:
            keep = max(context - wanted, 0)
            advice += f", or set {names.truncate} to keep only the prompt's last {keep} tokens"
        raise ParamError(
            field_name,
            f"{_the_prompt(names)} is {n} tokens and {names.max_tokens} is {wanted}: together {n + wanted} tokens, "
            f"more than the model's context of {context}; {advice}",
        )

    def _tokenize(self, prompts: list[RenderedPrompt]) -> list[list[int]]:
        """Token ids of every prompt, batched per kind (templated prompts carry their special tokens).

        Prompts that arrive as ids (the client's, or a chat template's own encoding) are taken as they are.
        The others are encoded in one tokenizer call per kind: with or without the model's added special
        tokens (BOS), and with special-token strings parsed or kept as text (RenderedPrompt).
        """
        ids: list[list[int]] = [list(p.token_ids or p.template_ids or ()) for p in prompts]
        for special in (True, False):
            for as_text in (False, True):
                group = [
                    i
                    for i, p in enumerate(prompts)
                    if p.token_ids is None
                    and p.template_ids is None
                    and p.add_special_tokens == special
                    and p.special_tokens_as_text == as_text
                ]
                if group:
                    encoded = self.tokenizer(
                        [prompts[i].text for i in group],
                        add_special_tokens=special,
                        split_special_tokens=as_text,
                    )
                    for i, e in zip(group, encoded["input_ids"]):
                        ids[i] = list(e)
        return ids


def logit_bias_pairs(raw: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """JSON's {"token id": bias} (keys are strings in JSON, as in OpenAI's API) as SamplingParams takes it."""
    pairs = []
    for key, bias in (raw or {}).items():
        if not (key.isascii() and key.isdigit()):
            raise ParamError(
                "logit_bias",
                f'logit_bias keys are token ids written as strings, such as {{"50256": -100}}; got "{key}"',
            )
        pairs.append((int(key), bias))
    return tuple(pairs)


def _the_prompt(names: FieldNames) -> str:
    return "the prompt" if names.prompt == "prompt" else f"the prompt ({names.prompt})"


def _with_seed(params: SamplingParams, choice: int, seed: int | None) -> SamplingParams:
    """Choice i samples with seed + i: reproducible, and the n choices still differ from each other."""
    if seed is None or choice == 0:
        return params
    if seed + choice > RANGES["seed"].high:
        raise ParamError("seed", f"seed + n - 1 must be at most {RANGES['seed'].high}")
    return dataclasses.replace(params, seed=seed + choice)


# The decoding fields every dialect names alike: each protocol's to_sampling_params adds its own (token
# budget, do_sample, stop, logprobs) to these.
SHARED_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "ignore_eos",
    "min_tokens",
    "speculative",  # SpeculativeField: the engine's SamplingParams.speculative under the same name
)


class OutputTextFields(BaseModel):
    """vLLM's options for where the text ends and what it shows, defined once for /generate and the OpenAI
    routes."""

    stop_token_ids: list[int] = Field(
        default_factory=list,
        description="vLLM's: token ids that end the text when generated, as end-of-text does (not before "
        f"min_tokens, but despite ignore_eos), at most {MAX_STOP_TOKEN_IDS}. POST /tokenize gives the ids.",
    )
    include_stop_str_in_output: bool = Field(
        False, description="vLLM's: the stop string that ended the text is returned with it."
    )
    skip_special_tokens: bool = Field(
        True,
        description="vLLM's: false keeps special tokens (<|im_start|>, <|im_end|>, ...) in the text; "
        "end-of-text still ends it, without its text.",
    )


class TokenRuleFields(BaseModel):
    """vLLM's rules for which tokens the output may hold, defined once for /generate and the OpenAI routes."""

    allowed_token_ids: Annotated[list[int], Field(min_length=1)] | None = Field(
        None,
        description="vLLM's: the only token ids the output may hold (end-of-text too: list it to let the "
        "text end early). POST /tokenize gives the ids.",
        json_schema_extra={"nullable": True},
    )
    bad_words: list[str] = Field(
        default_factory=list,
        description=f"vLLM's: words the output must not hold, at most {MAX_BAD_WORDS} (each as tokenized "
        "alone and after a space): a word's last token is banned wherever the output ends with the rest of "
        "it. The prompt does not count.",
    )


class SpeculativeField(BaseModel):
    """The per-request switch for speculative decoding, defined once for /generate and the OpenAI routes
    (each protocol's request model inherits it; SHARED_SAMPLING_FIELDS carries it to SamplingParams)."""

    # nullable spelled out: BentoML's OpenAPI writer keeps only the first member of `X | None`.
    speculative: bool | None = Field(
        None,
        description="Speculative decoding for this request: the server's drafter (prompt lookup, or its draft "
        "model, TEXTGEN_DRAFT_MODEL) proposes a few tokens and one forward pass checks them all. Greedy "
        "output stays the same (exact in float32); sampled output keeps its distribution, though a seed then "
        "gives another text. true = on, false = off; unset or null = the server's TEXTGEN_SPECULATIVE, "
        "which covers greedy requests only. Requests with logprobs, structured output or allowed_token_ids, "
        "and encoder-decoder models, are never speculated.",
        json_schema_extra={"nullable": True},
    )


def _check_length(field_name: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise ParamError(
            field_name,
            f"{field_name} must be at most {limit} characters (TEXTGEN_MAX_PROMPT_CHARS), got {len(text)}",
        )


def checked_defaults(defaults: SamplingDefaults) -> SamplingDefaults:
    """The model's defaults without those outside the engine's bounds (params.RANGES), each dropped with a
    warning: an odd value in a model's config must not turn every request that omits the field into a 400."""
    kept = {}
    for name, value in defaults.values.items():
        try:
            if name in RANGES:
                RANGES[name].check(name, value)
        except ParamError as exc:
            log.warning("ignoring the model's default from %s: %s", defaults.source, exc.message)
            continue
        kept[name] = value
    return dataclasses.replace(defaults, values=kept)


def sampling_field(request: Any, name: str, defaults: Mapping[str, Any] | None = None) -> Any:
    """A request's value for one field: the client's if it set it, else the model's default, else the
    protocol's own default (pydantic's `model_fields_set` tells a sent 0.7 from the field default 0.7)."""
    if defaults and name in defaults and name not in request.model_fields_set:
        return defaults[name]
    return getattr(request, name)


def shared_sampling_fields(request: Any, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The SamplingParams arguments a request model carries under the engine's own names (its structured
    output included: frontend/structured.py), with the model's `defaults` (model/sampling_defaults.py) for
    the fields the client did not set."""
    fields = {name: sampling_field(request, name, defaults) for name in SHARED_SAMPLING_FIELDS}
    return fields | {
        "logit_bias": logit_bias_pairs(request.logit_bias),
        "constraint": request.constraint(),
        "stop_token_ids": tuple(request.stop_token_ids),
        "include_stop_str_in_output": request.include_stop_str_in_output,
        "skip_special_tokens": request.skip_special_tokens,
        "allowed_token_ids": tuple(request.allowed_token_ids or ()),
        "bad_words": tuple(request.bad_words),
    }
