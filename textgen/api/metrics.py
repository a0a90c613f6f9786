"""Prometheus metrics of the engine, served on BentoML's /metrics next to its HTTP metrics.

prometheus_client is imported when the metrics are created, not when this module is: BentoML sets
PROMETHEUS_MULTIPROC_DIR in the worker after importing the service, and a client imported earlier
would never write where /metrics reads.
"""

from __future__ import annotations

from typing import Any

from textgen.engine.outputs import GenerationResult, PrefixCacheStats

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineMetrics:
    """The engine's observer: called from the engine thread after every step and finished request."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.running = Gauge(
            "textgen_running_sequences", "Sequences in the running batch.", multiprocess_mode="livesum"
        )
        self.waiting = Gauge(
            "textgen_waiting_requests", "Requests queued for the next step.", multiprocess_mode="livesum"
        )
        self.batch_size = Gauge(
            "textgen_batch_size", "Sequences in the last forward pass.", multiprocess_mode="livesum"
        )
        self.tokens = Counter("textgen_generated_tokens", "Tokens generated.")
        self.finished = Counter("textgen_requests_finished", "Finished requests by reason.", ["reason"])
        self.first_token = Histogram(
            "textgen_time_to_first_token_seconds", "From arrival to the first token.", buckets=_BUCKETS
        )
        self.step = Histogram(
            "textgen_step_seconds",
            "Duration of one engine iteration (a decoding step or a prefill).",
            buckets=_BUCKETS,
        )
        self.failures = Counter(
            "textgen_engine_failures",
            'Engine steps that raised: kind "batch" (its rows were retried alone), "request" (failed alone).',
            ["kind"],
        )
        self.kv_reserved = Gauge(
            "textgen_kv_reserved_tokens",
            "Worst-case KV tokens of the running batch (rows x longest prompt + max_new_tokens).",
            multiprocess_mode="livesum",
        )
        self.kv_budget = Gauge(
            "textgen_kv_budget_tokens",
            "Most worst-case KV tokens the running batch may hold (TEXTGEN_KV_BUDGET_TOKENS).",
            multiprocess_mode="livesum",
        )
        self.kv_bytes = Gauge(
            "textgen_kv_cache_bytes", "Bytes held by the KV cache now.", multiprocess_mode="livesum"
        )
        self.spec_drafted = Counter(
            "textgen_spec_draft_tokens", "Tokens drafted for speculative decoding (TEXTGEN_SPECULATIVE)."
        )
        self.spec_accepted = Counter(
            "textgen_spec_accepted_tokens",
            "Drafted tokens accepted by the model and kept (acceptance rate: this / draft tokens).",
        )
        self.prefix_queried = Counter(
            "textgen_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = Counter(
            "textgen_prefix_cache_hit_tokens",
            "Prompt tokens whose KV came from the prefix cache (hit rate: hit / queried).",
        )
        self.prefix_evicted = Counter(
            "textgen_prefix_cache_evicted_blocks",
            "Prefix-cache blocks evicted (least recently used) for room.",
        )
        self.prefix_bytes = Gauge(
            "textgen_prefix_cache_bytes", "Bytes held by the prefix cache.", multiprocess_mode="livesum"
        )
        self._prefix_seen = PrefixCacheStats()
        self.per_token = Histogram(
            "textgen_inter_token_latency_seconds",
            "Per request: mean time between its generated tokens, after the first.",
            buckets=_BUCKETS,
        )

    def on_step(self, batch_size: int, tokens: int, seconds: float, running: int, waiting: int) -> None:
        self.batch_size.set(batch_size)
        self.tokens.inc(tokens)
        self.step.observe(seconds)
        self.running.set(running)
        self.waiting.set(waiting)

    def on_failure(self, kind: str) -> None:
        self.failures.labels(kind).inc()

    def on_memory(self, reserved_tokens: int, budget_tokens: int | None, cache_bytes: int) -> None:
        self.kv_reserved.set(reserved_tokens)
        self.kv_budget.set(budget_tokens if budget_tokens is not None else float("inf"))
        self.kv_bytes.set(cache_bytes)

    def on_speculation(self, drafted: int, accepted: int) -> None:
        self.spec_drafted.inc(drafted)
        self.spec_accepted.inc(accepted)

    def on_prefix_cache(self, stats: PrefixCacheStats) -> None:
        seen = self._prefix_seen
        self.prefix_queried.inc(stats.queried_tokens - seen.queried_tokens)
        self.prefix_hits.inc(stats.hit_tokens - seen.hit_tokens)
        self.prefix_evicted.inc(stats.evicted_blocks - seen.evicted_blocks)
        self.prefix_bytes.set(stats.cached_bytes)
        self._prefix_seen = PrefixCacheStats(**vars(stats))

    def on_finish(self, result: GenerationResult) -> None:
        self.finished.labels(result.finish_reason).inc()
        if result.completion_tokens:
            self.first_token.observe(result.first_token_seconds)
        if result.completion_tokens > 1:
            decoding = result.total_seconds - result.first_token_seconds
            self.per_token.observe(decoding / (result.completion_tokens - 1))


_rejections: Any = None


def count_rejection(reason: str) -> None:
    """Count a request refused before generation (unauthorized, body_too_large, overloaded, timeout...)."""
    global _rejections
    if _rejections is None:  # created on first use, in the worker: see the module docstring
        from prometheus_client import Counter

        _rejections = Counter("textgen_rejected_requests", "Requests refused, by reason.", ["reason"])
    _rejections.labels(reason).inc()
