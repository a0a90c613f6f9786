"""The engine: one thread owns the model and batches requests per decoding step.

Requests join the running batch at step boundaries and leave the moment they finish (EOS,
`max_new_tokens`, a stop string) or their client goes away, so a short request never waits for a long
one and new arrivals never wait for a whole batch (iteration-level batching, as in TGI and vLLM).
Every endpoint submits here, so all concurrent requests share forward passes.

Encoder-decoder models (T5 and kin) take a simpler path: one request at a time through Hugging Face
`generate`, with the same parameters, stop strings and events.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from textgen.attention import use_decode_attention
from textgen.batch import DecodeBatch
from textgen.params import SamplingParams
from textgen.sampling import apply_penalties, sample
from textgen.sequence import Event, GenerationResult, Sequence

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are waiting for a batch slot than the engine is allowed to queue."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} requests are already waiting for a batch slot")
        self.limit = limit


class RequestHandle:
    """The caller's side of one request: its events, its result, and a way to cancel it.

    Events cross from the engine thread through a thread-safe queue; an event-loop consumer is woken
    with `call_soon_threadsafe`, a blocking consumer (tests, benchmarks) just waits on the queue.
    """

    def __init__(self) -> None:
        self.sequence: Sequence | None = None
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        # A consumer that only wants the result is woken once, not per token: every wake-up is
        # Python work on the event loop, competing with the engine thread for the GIL and the cores.
        self._wake_per_token = True
        try:
            self._loop = asyncio.get_running_loop()
            self._ready = asyncio.Event()
        except RuntimeError:
            pass

    def put(self, event: Event) -> None:
        """Called from the engine thread."""
        self._events.put(event)
        if self._loop is not None and (self._wake_per_token or event.result is not None):
            self._loop.call_soon_threadsafe(self._ready.set)

    def cancel(self) -> None:
        """Leave the batch at the next step boundary (the client went away or timed out)."""
        if self.sequence is not None:
            self.sequence.cancelled = True

    async def stream(self) -> AsyncIterator[Event]:
        """Events as they come; cancels the request if the consumer stops early."""
        assert self._ready is not None, "stream() needs a handle submitted from an event loop"
        try:
            while True:
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    self._ready.clear()
                    if self._events.empty():
                        await self._ready.wait()
                    continue
                yield event
                if event.result is not None:
                    return
        finally:
            self.cancel()

    async def result(self) -> GenerationResult:
        self._wake_per_token = False
        async for event in self.stream():
            if event.result is not None:
                return event.result
        raise RuntimeError("the engine ended the request without a result")

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Blocking form of `result`, for callers outside an event loop (or its thread)."""
        while True:
            event = self._events.get(timeout=timeout)
            if event.result is not None:
                return event.result


class EngineObserver(Protocol):
    """Told about every step and every finished request, from the engine thread (see metrics.py)."""

    def on_step(self, batch_size: int, tokens: int, seconds: float, running: int, waiting: int) -> None: ...

    def on_finish(self, result: GenerationResult) -> None: ...


class _NoObserver:
    def on_step(self, batch_size: int, tokens: int, seconds: float, running: int, waiting: int) -> None:
        pass

    def on_finish(self, result: GenerationResult) -> None:
        pass


@dataclass
class EngineStats:
    running: int = 0
    steps: int = 0
    last_batch_size: int = 0


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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting  # None: unbounded
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        use_decode_attention(model)  # decoder-only models; encoder-decoders keep their own
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.stats = EngineStats()
        self.observer: EngineObserver = observer or _NoObserver()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._batch: DecodeBatch | None = None
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
        handles = [self._new_handle(prompt_ids, params) for prompt_ids, params in requests]
        with self._wakeup:
            free_slots = self.max_batch_size - self.stats.running  # they take newcomers at the next step
            queued = len(self._waiting) + len(handles) - free_slots
            if self.max_waiting is not None and queued > self.max_waiting:
                raise QueueFull(self.max_waiting)
            self._waiting.extend(h.sequence for h in handles)
            self._wakeup.notify()
        return handles

    def _new_handle(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        handle = RequestHandle()

        def emit(event: Event) -> None:
            if event.result is not None:
                self.observer.on_finish(event.result)
            handle.put(event)

        handle.sequence = Sequence(
            prompt_ids, params, self.tokenizer, self.eos_token_ids, self.context_length, emit
        )
        return handle

    # -- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        # OpenMP thread counts are per calling thread: repeat the process-wide setting for this one.
        torch.set_num_threads(torch.get_num_threads())
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self._waiting and self._batch is None:
                    self._wakeup.wait()
                if self._stopping:
                    break
                new = self._admit()
            started, steps = time.perf_counter(), self.stats.steps
            try:
                if self.is_encoder_decoder:
                    for seq in new:
                        self._generate_seq2seq(seq)
                else:
                    self._iterate(new)
            except Exception as exc:  # a bug or OOM must not leave clients waiting forever
                log.exception("engine step failed; failing the affected requests")
                rows = (self._batch.rows if self._batch else []) + new
                for seq in rows:
                    seq.abort("error", f"{type(exc).__name__}: {exc}")
                self._batch = None
            self.stats.running = len(self._batch) if self._batch else 0
            stepped = self.stats.steps > steps
            self.observer.on_step(
                self.stats.last_batch_size if stepped else 0,
                self.stats.last_batch_size if stepped else 0,
                time.perf_counter() - started,
                self.stats.running,
                len(self._waiting),
            )
        for seq in (self._batch.rows if self._batch else []) + list(self._waiting):
            seq.abort("cancelled", "the server is shutting down")

    def _admit(self) -> list[Sequence]:
        """Take waiting sequences while there is room in the batch and prefill budget."""
        room = self.max_batch_size - (len(self._batch) if self._batch else 0)
        new: list[Sequence] = []
        tokens = 0
        while self._waiting and len(new) < room:
            seq = self._waiting[0]
            if new and tokens + len(seq.prompt_ids) > self.max_prefill_tokens:
                break
            self._waiting.popleft()
            if seq.cancelled:
                seq.abort("cancelled")
                continue
            tokens += len(seq.prompt_ids)
            new.append(seq)
        return new

    def _iterate(self, new: list[Sequence]) -> None:
        """One engine iteration: prefill newcomers, or advance the running batch by one token."""
        batch = self._batch
        if batch is not None:
            self._drop_cancelled(batch)
            if len(batch) == 0:
                batch = self._batch = None
        if new:
            now = time.perf_counter()
            for seq in new:
                seq.started = now
            fresh, logits = DecodeBatch.prefill(self.model, new, [s.prompt_ids for s in new], self.vocab_size)
            if self._advance(fresh, logits):
                if batch is None:
                    self._batch = fresh
                else:
                    batch.concatenate(fresh)
        elif batch is not None:
            logits = batch.step(self.model)
            if not self._advance(batch, logits):
                self._batch = None

    def _advance(self, batch: DecodeBatch, logits: torch.Tensor) -> bool:
        """Sample a token for every row, hand it to its sequence, drop finished rows."""
        seqs: list[Sequence] = batch.rows
        now = time.perf_counter()
        for seq in seqs:
            seq.started = seq.started or now
            seq.max_batch_size = max(seq.max_batch_size, len(seqs))
        params = [s.params for s in seqs]
        logits = apply_penalties(logits, params, batch.seen, [s.banned_tokens() for s in seqs])
        tokens = sample(logits, params, [s.generator for s in seqs])
        batch.record(tokens)
        for seq, token in zip(seqs, tokens.tolist()):
            seq.append(token)
        self.stats.steps += 1
        self.stats.last_batch_size = len(seqs)
        batch.filter([i for i, s in enumerate(seqs) if s.finish_reason is None])
        return len(batch) > 0

    def _drop_cancelled(self, batch: DecodeBatch) -> None:
        keep = []
        for i, seq in enumerate(batch.rows):
            if seq.cancelled:
                seq.abort("cancelled")
            else:
                keep.append(i)
        batch.filter(keep)

    def _generate_seq2seq(self, seq: Sequence) -> None:
        seq.started = time.perf_counter()
        seq.max_batch_size = 1
        p = seq.params
        kwargs: dict[str, Any] = dict(
            max_new_tokens=seq.max_new_tokens,
            repetition_penalty=p.repetition_penalty,
            no_repeat_ngram_size=p.no_repeat_ngram_size,
            do_sample=not p.greedy,
        )
        if not p.greedy:
            kwargs.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None)
            torch.manual_seed(seq.seed)  # only this thread uses the global generator
        if p.ignore_eos:
            kwargs["min_new_tokens"] = seq.max_new_tokens
        input_ids = torch.tensor([seq.prompt_ids])
        output = self.model.generate(input_ids=input_ids, **kwargs)[0].tolist()
        start = 1 if output and output[0] == self.model.config.decoder_start_token_id else 0
        for token in output[start:]:
            seq.append(token)
            if seq.finish_reason is not None:
                return
        seq.abort("length")


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
