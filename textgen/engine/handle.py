"""The caller's side of one request in the engine: its events, its result, and a way to cancel it."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator

from textgen.engine.sequence import Event, GenerationResult, Sequence


class RequestHandle:
    """Events cross from the engine thread through a thread-safe queue; an event-loop consumer is woken
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
            self._loop.call_soon_threadsafe(self._ready.set)  # type: ignore[union-attr]

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
