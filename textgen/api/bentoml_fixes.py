"""A fix for BentoML 1.4's TimeoutMiddleware, which keeps every request's context alive for the whole timeout.

Its `__call__` schedules `loop.call_later(timeout, ...)` and never cancels the timer. The timer holds the
request's contextvars Context (with its OpenTelemetry span, the span's attributes, locks and lists) until it
fires: `timeout` seconds of requests stay in memory. The soak test (bench/soak.py) measured it: the worker's
RSS grew by 15% over the first 90 s (TEXTGEN_TIMEOUT + 30 of them) and then stayed flat; with the default
TEXTGEN_TIMEOUT of 600 s and a busy server that is hundreds of MB.

The replacement behaves the same (a 504 if the response has not started within the timeout) and cancels its
timer as soon as the response starts, so that asyncio drops it. Applied once, when the service is defined;
a BentoML whose middleware no longer looks like 1.4's is left alone (with a warning).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


def fix_timeout_middleware() -> bool:
    """Patch BentoML's TimeoutMiddleware; True if patched (or already patched)."""
    try:
        from bentoml._internal.server.http import traffic
    except ImportError:
        return False
    middleware = getattr(traffic, "TimeoutMiddleware", None)
    if middleware is None or not hasattr(middleware, "_set_timer_out"):
        log.warning("BentoML's TimeoutMiddleware is not the one textgen fixes; not patched")
        return False
    if getattr(middleware.__call__, "textgen_fixed", False):
        return True
    from starlette.responses import JSONResponse

    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
                timer.cancel()  # the response started: the timeout no longer applies (and frees the context)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except asyncio.TimeoutError:
            if fut.cancel():
                resp = JSONResponse(
                    {"error": f"Not able to process the request in {self.timeout} seconds"}, status_code=504
                )
                await resp(scope, receive, send)
        else:
            await fut  # wait for the future to finish
        finally:
            timer.cancel()

    __call__.textgen_fixed = True  # type: ignore[attr-defined]
    middleware.__call__ = __call__
    return True
