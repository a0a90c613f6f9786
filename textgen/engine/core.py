"""The engine: one thread owns the model and batches requests per decoding step.

Requests join the running batch at step boundaries and leave the moment they finish (EOS,
`max_new_tokens`, a stop string) or their client goes away, so a short request never waits for a long
one and new arrivals never wait for a whole batch (iteration-level batching, as in TGI and vLLM).
Every route submits here, so all concurrent requests share forward passes.

The loop is schedule → execute → report (vLLM's `EngineCore.step`): take waiting sequences while there is
room, let the runner chosen at load time (causal.py, or seq2seq.py for encoder-decoders) run one step, tell
the observer.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from textgen.engine.causal import CausalRunner
from textgen.engine.faults import FaultInjector
from textgen.engine.grammar import Grammars
from textgen.engine.handle import REQUEST_ID, RequestHandle
from textgen.engine.params import SamplingParams
from textgen.engine.prefix_cache import PrefixCache
from textgen.engine.seq2seq import Seq2SeqRunner
from textgen.engine.outputs import Event, GenerationResult, PrefixCacheStats, QueueFull
from textgen.engine.sequence import Sequence
from textgen.engine.speculative import Speculator
from textgen.model.attention import use_decode_attention
from textgen.model.memory import GROWTH_BLOCK

log = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """Told about every step and every finished request, from the engine thread (see api/metrics.py)."""

    def on_step(self, batch_size: int, tokens: int, seconds: float, running: int, waiting: int) -> None: ...

    def on_finish(self, result: GenerationResult) -> None: ...

    def on_failure(self, kind: str) -> None:
        """A step raised: kind "batch" (a batched step; its rows are retried alone) or "request" (one
        request's own step, which then fails alone)."""

    def on_memory(self, reserved_tokens: int, budget_tokens: int | None, cache_bytes: int) -> None:
        """After every iteration: the running batch's worst-case KV tokens, the budget, the bytes it holds."""

    def on_prefix_cache(self, stats: PrefixCacheStats) -> None:
        """After every iteration with a prefix cache: its running totals."""

    def on_speculation(self, drafted: int, accepted: int) -> None:
        """After every speculative step: draft tokens proposed and draft tokens accepted (kept)."""


class _NoObserver:
    def on_step(self, batch_size: int, tokens: int, seconds: float, running: int, waiting: int) -> None:
        pass

    def on_finish(self, result: GenerationResult) -> None:
        pass

    def on_failure(self, kind: str) -> None:
        pass

    def on_memory(self, reserved_tokens: int, budget_tokens: int | None, cache_bytes: int) -> None:
        pass

    def on_speculation(self, drafted: int, accepted: int) -> None:
        pass

    def on_prefix_cache(self, stats: PrefixCacheStats) -> None:
        pass


class Runner(Protocol):
    """Runs the model: `step` takes the newly admitted sequences and returns how many got a token."""

    @property
    def rows(self) -> list[Sequence]: ...

    def step(self, new: list[Sequence]) -> int: ...

    def reset(self) -> None: ...

    def kv_bytes(self) -> int: ...


@dataclass
class EngineStats:
    running: int = 0
    steps: int = 0
    last_batch_size: int = 0
    # The running batch's worst case: rows × (longest prompt + max_new_tokens + spare); see kv_reservation.
    kv_reserved_tokens: int = 0


def worst_case_tokens(seq: Sequence) -> int:
    """The most KV positions a sequence can come to hold: its prompt and every token it may generate."""
    return len(seq.prompt_ids) + seq.max_new_tokens


def worst_case_widths(seq: Sequence, encoder_decoder: bool) -> tuple[int, int]:
    """The most (encoder, decoder) KV positions a sequence can come to hold.

    Causal: no encoder side, and its prompt and output share one cache. Encoder-decoder: its prompt's
    cross-attention cache, and a self-attention cache of the start token plus every token fed back (all
    but the last of max_new_tokens): max_new_tokens in all.
    """
    if encoder_decoder:
        return len(seq.prompt_ids), max(seq.max_new_tokens, 1)
    return 0, worst_case_tokens(seq)


def widest(widths: list[tuple[int, int]]) -> int:
    """The worst-case width of a batch of rows of these widths: the encoder side and the decoder side are
    padded each to its own longest row (textgen/engine/seq2seq.py), so a row with a long prompt and another
    with a long output make a batch as wide as both together."""
    return max((e for e, _ in widths), default=0) + max((d for _, d in widths), default=0)


def kv_reservation(rows: int, widest: int) -> int:
    """KV tokens `rows` sequences may come to hold when the longest worst case among them is `widest`.

    Rows are left-padded to the longest one of their segment (textgen/engine/batch.py), and no segment is
    wider than the batch's longest row, so rows × that width bounds the batch, not the sum of its rows'
    lengths (segments merge when that pads little, and at most 4 are kept), plus the spare room each row's
    cache grows by (the self-attention cache only: an encoder-decoder's cross-attention cache is filled
    once, at its exact width).
    """
    return rows * (widest + GROWTH_BLOCK) if rows else 0


class Engine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        context_length: int,
        max_batch_size: int = 32,
        max_prefill_tokens: int = 4096,
        max_waiting: int | None = None,
        observer: EngineObserver | None = None,
        kv_budget_tokens: int | None = None,
        fault_prompt: str | None = None,
        fault_after_tokens: int = 0,
        speculative: str = "off",
        spec_tokens: int = 5,
        spec_max_batch: int = 1,
        draft_model: Any = None,
        max_step_tokens: int = 512,
        prefix_cache_bytes: int = 0,
        model_key: str = "",
    ) -> None:
        """`speculative`: "off", "ngram" or "draft" (with `draft_model`, a small model sharing the tokenizer),
        the default for requests that do not choose (SamplingParams.speculative); `spec_tokens` drafts per
        step, only while at most `spec_max_batch` rows run (see textgen/engine/speculative.py).
        `kv_budget_tokens`: the most KV tokens the running batch may come to hold in the worst case (see
        `kv_reservation`); a sequence that would exceed it waits for rows to finish. None: no bound.
        `max_step_tokens`: the most tokens one step computes while rows are decoding (chunking.py).
        `prefix_cache_bytes`: memory for the KV of prompt prefixes (prefix_cache.py); 0: no prefix caching.
        `model_key`: what the model is (id, format): the prefix cache's namespace.
        `fault_prompt`: for tests only, see textgen/engine/faults.py.
        """
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting  # None: unbounded
        if kv_budget_tokens is not None and kv_budget_tokens < context_length + GROWTH_BLOCK:
            raise ValueError(
                f"kv_budget_tokens={kv_budget_tokens} is less than one full context ({context_length} + "
                f"{GROWTH_BLOCK}): a long request could never run"
            )
        self.kv_budget_tokens = kv_budget_tokens
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        vocab_size = int(model.config.get_text_config().vocab_size)
        self.grammars = Grammars(tokenizer, vocab_size, self.eos_token_ids)  # structured output
        faults = FaultInjector(fault_prompt, tokenizer, fault_after_tokens) if fault_prompt else None
        self.runner: Runner
        self.prefix_cache: PrefixCache | None = None
        if self.encoder_decoder:
            self.runner = Seq2SeqRunner(model, vocab_size, faults=faults, on_error=self._step_failed)
        else:
            use_decode_attention(model)
            if prefix_cache_bytes > 0:
                self.prefix_cache = PrefixCache(prefix_cache_bytes, model_key)
            self.runner = CausalRunner(
                model,
                vocab_size,
                faults=faults,
                on_error=self._step_failed,
                # Built even when off: a request may still ask for it (SamplingParams.speculative).
                speculator=Speculator(
                    speculative, spec_tokens, spec_max_batch, self._speculated, draft_model=draft_model
                ),
                max_step_tokens=max_step_tokens,
                prefix_cache=self.prefix_cache,
            )
        self.stats = EngineStats()
        self.observer: EngineObserver = observer or _NoObserver()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="textgen-engine", daemon=True)

    # -- caller side ---------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request; its handle yields events. Call from the event loop (or any thread)."""
        return self.submit_many([(prompt_ids, params)])[0]

    def submit_many(self, requests: list[tuple[list[int], SamplingParams]]) -> list[RequestHandle]:
        """Queue requests that belong together (the choices of one call): all of them, or none.

        Raises QueueFull rather than queue without bound: under overload, a quick refusal the client
        can retry (or send elsewhere) beats an answer that arrives after every timeout.
        """
        # One id for the call (a client's X-Request-ID, or a fresh one), suffixed by choice when there are more.
        request_id = REQUEST_ID.get() or uuid.uuid4().hex[:16]
        handles = [
            self._new_handle(prompt_ids, params, request_id if len(requests) == 1 else f"{request_id}/{i}")
            for i, (prompt_ids, params) in enumerate(requests)
        ]
        with self._wakeup:
            free_slots = self.max_batch_size - self.stats.running  # they take newcomers at the next step
            queued = len(self._waiting) + len(handles) - free_slots
            if self.max_waiting is not None and queued > self.max_waiting:
                raise QueueFull(self.max_waiting)
            self._waiting.extend(h.sequence for h in handles)  # type: ignore[misc]
            self._wakeup.notify()
        return handles

    def cancel_all(self) -> None:
        """Stop every running and waiting request at the next step (they finish as "cancelled": a 503 on
        HTTP). Any thread may call it: it only raises flags the engine thread acts on."""
        with self._wakeup:
            for seq in list(self._waiting) + list(self.runner.rows):
                seq.cancelled = True
            self._wakeup.notify()

    def _new_handle(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> RequestHandle:
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        handle = RequestHandle(request_id)
        # The sequence reaches its handle through a weak reference: a strong one would make a cycle (handle →
        # sequence → emit → handle) that only the cyclic garbage collector frees, so finished requests (and
        # the native state of their random generators) would pile up between its rare full collections: the
        # soak test (bench/soak.py) measured +15% RSS over 10k requests. No handle left: nobody is listening.
        handle_ref = weakref.ref(handle)

        def emit(event: Event) -> None:
            if event.result is not None:
                self.observer.on_finish(event.result)
            listener = handle_ref()
            if listener is not None:
                listener.put(event)

        guide = self.grammars.guide(params.constraint) if params.constraint is not None else None
        handle.sequence = Sequence(
            prompt_ids, params, self.tokenizer, self.eos_token_ids, self.context_length, emit, guide
        )
        handle.sequence.request_id = request_id
        return handle

    def _step_failed(self, seq: Sequence | None, exc: BaseException) -> None:
        """The runner's report of a failed step (engine thread): a batched step (seq None), whose rows it
        then retries one by one, or one request's own step, which fails alone. Logged once per request, by
        its id, never with its prompt."""
        if seq is None:
            log.warning("an engine step failed (%s); retrying each of its rows alone", type(exc).__name__)
            self.observer.on_failure("batch")
            return
        log.error(
            "request %s failed in an engine step; it gets an error, the rest of the batch continues",
            seq.request_id,
            exc_info=exc,
        )
        self.observer.on_failure("request")

    def _speculated(self, drafted: int, accepted: int) -> None:
        hook = getattr(self.observer, "on_speculation", None)  # observers written before it lack it
        if hook is not None:
            hook(drafted, accepted)

    # -- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        # OpenMP thread counts are per calling thread: repeat the process-wide setting for this one.
        torch.set_num_threads(torch.get_num_threads())
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self._waiting and not self.runner.rows:
                    self._wakeup.wait()
                if self._stopping:
                    break
                new = self._schedule()
            started = time.perf_counter()
            try:
                stepped = self.runner.step(new)
            except Exception as exc:  # a bug or OOM must not leave clients waiting forever
                log.exception("engine step failed; failing the affected requests")
                for seq in self.runner.rows + new:
                    seq.abort("error", f"{type(exc).__name__}: {exc}")
                self.runner.reset()
                stepped = 0
            if stepped:
                self.stats.steps += 1
                self.stats.last_batch_size = stepped
            rows = self.runner.rows
            self.stats.running = len(rows)
            self.stats.kv_reserved_tokens = kv_reservation(
                len(rows), widest([worst_case_widths(s, self.encoder_decoder) for s in rows])
            )
            tokens = getattr(self.runner, "last_tokens", stepped)  # more than `stepped` when it speculated
            self.observer.on_step(
                stepped, tokens, time.perf_counter() - started, self.stats.running, len(self._waiting)
            )
            self.observer.on_memory(
                self.stats.kv_reserved_tokens, self.kv_budget_tokens, self.runner.kv_bytes()
            )
            report = getattr(self.observer, "on_prefix_cache", None)  # observers written before it lack it
            if self.prefix_cache is not None and report is not None:
                report(self.prefix_cache.stats)
        for seq in self.runner.rows + list(self._waiting):
            seq.abort("cancelled", "the server is shutting down")

    def _schedule(self) -> list[Sequence]:
        """Take waiting sequences, in order, while there is room in the batch, the prefill budget and the
        KV budget. One that does not fit the KV budget waits (and those behind it: no starvation) until
        rows finish; the budget is at least one full context, so an empty batch always takes the first.
        """
        running = self.runner.rows
        room = self.max_batch_size - len(running)
        widths = [worst_case_widths(s, self.encoder_decoder) for s in running]
        new: list[Sequence] = []
        tokens = 0
        while self._waiting and len(new) < room:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                seq.abort("cancelled")
                continue
            if new and tokens + len(seq.prompt_ids) > self.max_prefill_tokens:
                break
            joined = widths + [worst_case_widths(seq, self.encoder_decoder)]
            # An empty batch takes its first row whatever the budget: the budget holds one full context, and
            # an encoder's input is not checked against the context (frontend/prepare.py), so a long one
            # would otherwise wait forever. TEXTGEN_MAX_PROMPT_CHARS bounds it.
            if (
                widths
                and self.kv_budget_tokens is not None
                and kv_reservation(len(joined), widest(joined)) > self.kv_budget_tokens
            ):
                break
            self._waiting.popleft()
            widths = joined
            tokens += len(seq.prompt_ids)
            new.append(seq)
        return new


def _eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
