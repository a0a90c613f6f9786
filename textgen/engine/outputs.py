"""What the engine hands back: results, events, token log-probabilities, cache statistics, refusals.

Plain data, no torch: the api and frontend wings name these types, and `bentoml serve` imports the service
(and so those wings) once in its own process before its worker imports it again. Only the worker's
loading thread needs torch and transformers; when service.py imported them, importing it took 3.2 s
instead of 0.6 (`python -X importtime`) and the server was ready 8.4-9.0 s after `bentoml serve`
instead of 5.5-6.3 (random GPT-2 124M, auto = bfloat16, AMX Xeon, 2 cores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Why a sequence ended. The first three are answers; "cancelled" (client gone, timeout, shutdown) and
# "error" (a failed step) become HTTP errors in the api wing.
FinishReason = Literal["length", "stop", "eos", "cancelled", "error"]


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    seed: int
    queue_seconds: float
    first_token_seconds: float  # from submission to the first token
    total_seconds: float
    max_batch_size: int  # most sequences that shared a forward pass with this one
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # per generated token, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob] | None = None  # per prompt token, when params.prompt_logprobs
    stop_sequence: str | None = None  # with finish_reason "stop": the stop string that ended the text
    cached_tokens: int = 0  # prompt tokens served from the prefix cache rather than computed
    drafted_tokens: int = 0  # speculative draft tokens the model checked for this sequence
    accepted_draft_tokens: int = 0  # of those, the ones it kept
    reasoning_tokens: int = 0  # a thinking model's thought (SamplingParams.thinking), its tags' included
    token_ids: list[int] = field(default_factory=list)  # the generated tokens, end-of-text's included


@dataclass
class Event:
    """What a request's consumer receives: a text delta, and on the last event, the result."""

    text: str
    result: GenerationResult | None = None
    logprobs: list[TokenLogprob] | None = None  # of the tokens since the previous event (params.logprobs)
    tokens: int = 0  # tokens generated so far, this event's included (vLLM's continuous usage stats)
    token_ids: list[int] = field(default_factory=list)  # the tokens generated since the previous event


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None: nothing predicted this token (a prompt's first)
    top: tuple[tuple[int, float], ...] = ()  # the k likeliest tokens at that position, likeliest first


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
    hit_tokens: int = 0  # of those, served from the cache (vLLM's prefix_cache_hits)
    evicted_blocks: int = 0
    cached_blocks: int = 0
    cached_bytes: int = 0


class QueueFull(RuntimeError):
    """More requests are waiting for a batch slot than the engine is allowed to queue."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} requests are already waiting for a batch slot")
        self.limit = limit
