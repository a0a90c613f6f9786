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
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from textgen.engine.causal import CausalRunner
from textgen.engine.handle import RequestHandle
from textgen.engine.params import SamplingParams
from textgen.engine.seq2seq import Seq2SeqRunner
from textgen.engine.sequence import Event, GenerationResult, Sequence
from textgen.model.attention import use_decode_attention

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are waiting for a batch slot than the engine is allowed to queue."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} requests are already waiting for a batch slot")
        self.limit = limit


class EngineObserver(Protocol):
    """Told about every step and every finished request, from the engine thread (see api/metrics.py)."""

    def on_step(self, batch_size: int, tokens: int, seconds: float, running: int, waiting: int) -> None: ...

    def on_finish(self, result: GenerationResult) -> None: ...


class _NoObserver:
    def on_step(self, batch_size: int, tokens: int, seconds: float, running: int, waiting: int) -> None:
        pass

    def on_finish(self, result: GenerationResult) -> None:
        pass


class Runner(Protocol):
    """Runs the model: `step` takes the newly admitted sequences and returns how many got a token."""

    @property
    def rows(self) -> list[Sequence]: ...

    def step(self, new: list[Sequence]) -> int: ...

    def reset(self) -> None: ...


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
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting  # None: unbounded
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.runner: Runner
        if getattr(model.config, "is_encoder_decoder", False):
            self.runner = Seq2SeqRunner(model)
        else:
            use_decode_attention(model)
            self.runner = CausalRunner(model, int(model.config.get_text_config().vocab_size))
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
        handles = [self._new_handle(prompt_ids, params) for prompt_ids, params in requests]
        with self._wakeup:
            free_slots = self.max_batch_size - self.stats.running  # they take newcomers at the next step
            queued = len(self._waiting) + len(handles) - free_slots
            if self.max_waiting is not None and queued > self.max_waiting:
                raise QueueFull(self.max_waiting)
            self._waiting.extend(h.sequence for h in handles)  # type: ignore[misc]
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
            self.stats.running = len(self.runner.rows)
            self.observer.on_step(
                stepped, stepped, time.perf_counter() - started, self.stats.running, len(self._waiting)
            )
        for seq in self.runner.rows + list(self._waiting):
            seq.abort("cancelled", "the server is shutting down")

    def _schedule(self) -> list[Sequence]:
        """Take waiting sequences while there is room in the batch and prefill budget."""
        room = self.max_batch_size - len(self.runner.rows)
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
