"""The caller's side of one request in the engine: its events, its result, and a way to cancel it."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import queue
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from textgen.engine.outputs import Event, GenerationResult

if TYPE_CHECKING:  # torch: see textgen/engine/outputs.py
    from textgen.engine.sequence import Sequence

# The id that names a request in the engine's logs, when the HTTP layer knows one (a client's X-Request-ID);
# the engine makes one up otherwise.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("textgen_request_id", default=None)

# Events a consumer may fall behind by before new text is merged into the last pending event. A client that
# stops reading leaves its stream's events unconsumed; merging keeps their number (and their memory, about
# the generated text) bounded however long the generation. The stream's writer stops such a client after
# TEXTGEN_TIMEOUT (textgen/api/responses.py).
MAX_BUFFERED_EVENTS = 64


class EventBuffer:
    """A thread-safe FIFO of events (the engine thread puts, a consumer takes) that never holds more than
    `limit` text events: beyond that, text is appended to the newest pending one. The last event (with the
    result) is always kept as it is."""

    def __init__(self, limit: int = MAX_BUFFERED_EVENTS) -> None:
        self.limit = limit
        self._events: collections.deque[Event] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self.merged = 0  # events folded into an earlier one (the consumer fell behind)

    def put(self, event: Event) -> None:
        with self._ready:
            last = self._events[-1] if self._events else None
            if (
                len(self._events) >= self.limit
                and event.result is None
                and last is not None
                and last.result is None
            ):
                logprobs = None
                if last.logprobs is not None or event.logprobs is not None:
                    logprobs = (last.logprobs or []) + (event.logprobs or [])
                self._events[-1] = Event(
                    last.text + event.text,
                    logprobs=logprobs,
                    tokens=event.tokens,
                    token_ids=last.token_ids + event.token_ids,
                )
                self.merged += 1
            else:
                self._events.append(event)
            self._ready.notify()

    def get_nowait(self) -> Event:
        with self._ready:
            if not self._events:
                raise queue.Empty
            return self._events.popleft()

    def get(self, timeout: float | None = None) -> Event:
        """Blocking; raises queue.Empty after `timeout` seconds without an event."""
        with self._ready:
            if not self._ready.wait_for(lambda: bool(self._events), timeout):
                raise queue.Empty
            return self._events.popleft()

    def empty(self) -> bool:
        return not self._events

    def __len__(self) -> int:
        return len(self._events)


class RequestHandle:
    """Events cross from the engine thread through a thread-safe buffer; an event-loop consumer is woken
    with `call_soon_threadsafe`, a blocking consumer (tests, benchmarks) just waits on the buffer.
    """

    def __init__(self, request_id: str = "") -> None:
        self.request_id = request_id
        self.sequence: Sequence | None = None
        self._events = EventBuffer()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        # A consumer that only wants the result is woken once, not per token: every wake-up is
        # Python work on the event loop, competing with the engine thread for the GIL and the cores.
        # It does not keep the text events either: the result carries the whole text.
        self._wake_per_token = True
        try:
            self._loop = asyncio.get_running_loop()
            self._ready = asyncio.Event()
        except RuntimeError:
            pass

    def put(self, event: Event) -> None:
        """Called from the engine thread."""
        if not self._wake_per_token and event.result is None:
            return
        self._events.put(event)
        if self._loop is not None and (self._wake_per_token or event.result is not None):
            try:
                self._loop.call_soon_threadsafe(self._ready.set)  # type: ignore[union-attr]
            except RuntimeError:  # the loop is closed (the worker is exiting): nobody is waiting
                pass

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
        self._wake_per_token = False
        while True:
            event = self._events.get(timeout=timeout)
            if event.result is not None:
                return event.result
