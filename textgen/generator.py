"""From a validated request to a response: templating, tokenizing, limits, engine, post-processing.

This is the whole product minus HTTP, so tests and benchmarks can drive it without a server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from textgen.config import Settings
from textgen.engine import Engine, EngineObserver, RequestHandle
from textgen.loading import LoadedModel
from textgen.params import ParamError, SamplingParams
from textgen.postprocess import PostProcessing
from textgen.schemas import (
    GenerateRequest,
    GenerateResponse,
    StreamEvent,
    Timings,
    Usage,
)
from textgen.sequence import GenerationResult
from textgen.templates import RenderedPrompt, render

log = logging.getLogger(__name__)


@dataclass
class PreparedRequest:
    request: GenerateRequest
    prompt_ids: list[int]
    params: SamplingParams
    postprocessing: PostProcessing | None
    truncated_tokens: int = 0  # dropped from the prompt's start by `truncate`


class TextGenerator:
    def __init__(
        self, loaded: LoadedModel, settings: Settings, observer: EngineObserver | None = None
    ) -> None:
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
        ).start()

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def close(self) -> None:
        self.engine.stop()

    def warmup(self) -> None:
        """One short generation, so the first user request does not pay for lazy initialisation."""
        prepared = self.prepare([GenerateRequest(prompt="Hello", max_new_tokens=2)])[0]
        assert isinstance(prepared, PreparedRequest)
        self.submit(prepared).wait(timeout=120)

    def prepare(self, requests: list[GenerateRequest]) -> list[PreparedRequest | ParamError]:
        """Validate against the server's limits, apply templates and tokenize, all requests at once."""
        rendered: list[RenderedPrompt | ParamError] = []
        for req in requests:
            try:
                rendered.append(self._render(req))
            except ParamError as exc:
                rendered.append(exc)
        ids = self._tokenize(rendered)
        out: list[PreparedRequest | ParamError] = []
        for req, r, prompt_ids in zip(requests, rendered, ids):
            if isinstance(r, ParamError):
                out.append(r)
                continue
            try:
                out.append(self._prepare_one(req, r, prompt_ids))
            except ParamError as exc:
                out.append(exc)
        return out

    def submit(self, prepared: PreparedRequest) -> RequestHandle:
        return self.engine.submit(prepared.prompt_ids, prepared.params)

    def response(self, prepared: PreparedRequest, result: GenerationResult) -> GenerateResponse:
        text = result.text
        if prepared.postprocessing is not None:
            text = prepared.postprocessing.apply(text, prepared.request.prompt)
        return GenerateResponse(
            generated_text=text,
            model=self.model_id,
            finish_reason=result.finish_reason,
            usage=usage(result, prepared.truncated_tokens),
            timings=timings(result),
            seed=result.seed,
            batch_size=result.max_batch_size,
        )

    def final_event(self, prepared: PreparedRequest, result: GenerationResult, text: str) -> StreamEvent:
        return StreamEvent(
            text=text,
            finish_reason=result.finish_reason,
            usage=usage(result, prepared.truncated_tokens),
            timings=timings(result),
            model=self.model_id,
            seed=result.seed,
        )

    # -- helpers -------------------------------------------------------------------------------

    def _render(self, req: GenerateRequest) -> RenderedPrompt:
        if not req.prompt.strip():
            raise ParamError("prompt", "prompt must contain some non-whitespace text")
        if len(req.prompt) > self.settings.max_prompt_chars:
            raise ParamError(
                "prompt",
                f"prompt must be at most {self.settings.max_prompt_chars} characters "
                f"(TEXTGEN_MAX_PROMPT_CHARS), got {len(req.prompt)}",
            )
        if req.max_new_tokens > self.settings.max_new_tokens:
            raise ParamError(
                "max_new_tokens",
                f"max_new_tokens must be in [1, {self.settings.max_new_tokens}] on this server "
                f"(TEXTGEN_MAX_NEW_TOKENS), got {req.max_new_tokens}",
            )
        return render(req.template, req.prompt, self.tokenizer)

    def _tokenize(self, rendered: list[RenderedPrompt | ParamError]) -> list[list[int]]:
        ids: list[list[int]] = [[] for _ in rendered]
        for special in (True, False):
            group = [
                i
                for i, r in enumerate(rendered)
                if isinstance(r, RenderedPrompt) and r.add_special_tokens == special
            ]
            if group:
                texts = [rendered[i].text for i in group]  # type: ignore[union-attr]
                encoded = self.tokenizer(texts, add_special_tokens=special)["input_ids"]
                for i, e in zip(group, encoded):
                    ids[i] = list(e)
        return ids

    def _prepare_one(
        self, req: GenerateRequest, rendered: RenderedPrompt, prompt_ids: list[int]
    ) -> PreparedRequest:
        context = self.loaded.context_length
        truncated = 0
        if req.truncate is not None and len(prompt_ids) > req.truncate:
            truncated = len(prompt_ids) - req.truncate
            prompt_ids = prompt_ids[truncated:]
        n = len(prompt_ids)
        if not self.loaded.is_encoder_decoder and n + req.max_new_tokens > context:
            field = "prompt" if n >= context else "max_new_tokens"
            raise ParamError(
                field,
                f"the prompt is {n} tokens and max_new_tokens is {req.max_new_tokens}: together "
                f"{n + req.max_new_tokens} tokens, more than the model's context of {context}; "
                f"shorten the prompt, set max_new_tokens to at most {max(context - n, 0)}, or set "
                f"truncate to keep only the prompt's last {max(context - req.max_new_tokens, 0)} tokens",
            )
        params = SamplingParams(
            max_new_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            repetition_penalty=req.repetition_penalty,
            no_repeat_ngram_size=req.no_repeat_ngram_size,
            do_sample=req.do_sample,
            seed=req.seed,
            stop=tuple(req.stop) + rendered.stop,
            ignore_eos=req.ignore_eos,
        )
        post = None
        if req.postprocess:
            max_words = self.settings.max_words if req.max_words is None else req.max_words
            post = PostProcessing(
                strip_prompt=req.strip_prompt,
                drop_repeated_lines=req.drop_repeated_lines,
                max_words=max_words or None,
                trim_incomplete_sentence=req.trim_incomplete_sentence,
            )
        return PreparedRequest(req, prompt_ids, params, post, truncated)


def usage(result: GenerationResult, truncated_tokens: int = 0) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        truncated_prompt_tokens=truncated_tokens,
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
