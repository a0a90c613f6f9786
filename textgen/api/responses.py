"""Responses that wait for the engine: deferred JSON and Server-Sent Events.

BentoML's dispatcher runs one batch at a time per worker. If an API waited for its generations, every new
arrival would wait for the slowest of them. So the routes only *admit*: they validate, prepare and submit,
then return at once a response object that waits for the results while it is being sent. The dispatcher
is free again within milliseconds; the engine batches per step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from textgen.api.errors import SHUTTING_DOWN, ErrorShape, Problem, generation_failed, timed_out
from textgen.api.metrics import count_rejection
from textgen.engine.handle import RequestHandle
from textgen.engine.outputs import GenerationResult

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away before the answer"


def failure(results: list[GenerationResult]) -> Problem | None:
    """The problem that spoils an answer: a failed step first, then a cancellation (shutdown)."""
    for r in results:
        if r.finish_reason == "error":
            return generation_failed(r.error)
    for r in results:
        if r.finish_reason == "cancelled":
            return SHUTTING_DOWN
    return None


class DeferredJSONResponse(Response):
    """A JSON response whose status and body are known only when the engine finishes.

    While waiting it listens for the client going away, and cancels the work if so: its sequences leave
    the batch at the next step instead of generating for nobody. It always sends a response, even to a
    client that is gone: BentoML's timeout middleware waits for a response to start and would otherwise
    hold the request, and its concurrency slot, until the timeout (and stall shutdown meanwhile).
    """

    media_type = "application/json"

    def __init__(self, handles: list[RequestHandle], timeout: float, shape: ErrorShape) -> None:
        super().__init__(media_type=self.media_type)
        self.handles = handles
        self.timeout = timeout  # TEXTGEN_TIMEOUT: after it, the work stops and the client gets a 504
        self.shape = shape

    def answer(self, results: list[GenerationResult]) -> dict[str, Any]:
        """The 200 body for requests that all finished with an answer."""
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        results_task = asyncio.ensure_future(asyncio.gather(*(h.result() for h in self.handles)))
        gone_task = asyncio.ensure_future(_client_gone(receive))
        try:
            await asyncio.wait(
                {results_task, gone_task}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not results_task.done():
                for handle in self.handles:
                    handle.cancel()  # timed out, client gone, or we were cancelled (shutdown)
                results_task.cancel()
            gone_task.cancel()
        if results_task.done() and not results_task.cancelled():
            results = results_task.result()
            problem = failure(results)
            if problem is None:
                self.status_code, body = 200, self.answer(results)
            else:
                self.status_code, body = problem.status, self.shape.body(problem)
            self.body = json.dumps(body, ensure_ascii=False).encode()
        elif gone_task.done():
            self.status_code, self.body = CLIENT_CLOSED_REQUEST, b""
        else:
            problem = timed_out(self.timeout)
            self.status_code, self.body = problem.status, json.dumps(self.shape.body(problem)).encode()
        self.init_headers()
        await super().__call__(scope, receive, send)


async def _client_gone(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# Line breaks to Python's str.splitlines, which httpx's iter_lines follows, but raw in JSON text: a client
# reading the stream line by line (guidellm does) would cut the event in two. Escaped, the JSON is the same.
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    """One Server-Sent Event whose data is `data` as JSON (or a bare string such as [DONE]); `event`: its
    name (Anthropic's clients read an event by its name)."""
    named = f"event: {event}\n" if event else ""
    if not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS_JSON_KEEPS)
    return f"{named}data: {data}\n\n"


def event_stream(
    events: AsyncIterator[str], handles: Sequence[RequestHandle] = (), write_timeout: float | None = None
) -> StreamingResponse:
    """Server-Sent Events from `events`; `handles` are the requests they come from (see EventStream)."""
    return EventStream(events, handles, write_timeout)


class ClientStalled(Exception):
    """The client read nothing for the write timeout: the stream's socket buffers stayed full."""


class EventStream(StreamingResponse):
    """An SSE response that stops a client that stops reading.

    A client that keeps the connection open but reads nothing (a hung consumer, a slowloris) fills the socket
    buffers; then every write waits. Without a bound the generation would run on and hold its batch slot and
    its place in TEXTGEN_MAX_QUEUE until the client went away, which may be never. So a write that cannot
    complete within `write_timeout` (TEXTGEN_TIMEOUT) cancels the requests (they leave the batch at the next
    step) and ends the response. The events the engine produces meanwhile wait in a bounded buffer
    (textgen/engine/handle.py EventBuffer).
    """

    def __init__(
        self, events: AsyncIterator[str], handles: Sequence[RequestHandle], write_timeout: float | None
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.handles = list(handles)
        self.write_timeout = write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout = self.write_timeout
        if timeout is None:
            return await super().__call__(scope, receive, send)

        async def timed_send(message: Message) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await send(message)
            except TimeoutError:
                raise ClientStalled from None

        try:
            await super().__call__(scope, receive, timed_send)
        except ClientStalled:
            for handle in self.handles:
                handle.cancel()
            count_rejection("stalled")
            log.warning(
                "a stream's client read nothing for %g s (TEXTGEN_TIMEOUT): its generation was cancelled "
                "(request %s)",
                timeout,
                ", ".join(h.request_id for h in self.handles) or "?",
            )
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
