"""Graceful drain on SIGTERM: stop taking generations, let the ones in flight finish, then exit.

How `bentoml serve` stops (BentoML 1.4, read from its source): the arbiter (circus) turns SIGTERM into
"quit", sends SIGTERM to each worker and waits for it to exit (graceful_timeout of a day), keeping the
listening socket open meanwhile; it closes the socket and exits 0 once the workers are gone. In the worker,
uvicorn's own SIGTERM handler closes the listening socket at once and then waits for open connections: new
clients get connection refused, /readyz never answers 503, and a load balancer still sending here sees
errors instead of a clean refusal.

So the worker takes SIGTERM itself first (`install`, called once serving has started, after uvicorn put
its handler in place) and hands it on to uvicorn only once the drain is over:

1. at once: /readyz answers 503 {"status": "draining"} and new generations get 503 with Retry-After, in
   the route's error shape (textgen/api/guards.py); health, metrics, /info and the docs still answer;
2. the generations in flight finish, for up to TEXTGEN_DRAIN_SECONDS;
3. those still running then are cancelled (their clients get 503 "shutting down"), and a few seconds later
   the signal goes to uvicorn, which closes the socket and shuts the service down (engine stopped);
4. if a connection still holds uvicorn after FORCE_EXIT_SECONDS (a client that stopped reading), it is
   told to exit anyway.

With deploy/'s preStop sleep, all of it fits in EXIT_MARGIN_SECONDS on top of TEXTGEN_DRAIN_SECONDS
(tests/test_deploy.py checks the Deployment's terminationGracePeriodSeconds).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from textgen.api.health import ServerState

log = logging.getLogger(__name__)

CANCEL_GRACE_SECONDS = 2.0  # after cancelling: time for the 503s of the cancelled requests to go out
FORCE_EXIT_SECONDS = 5.0  # after handing over to uvicorn: time for its own shutdown before it is forced
EXIT_MARGIN_SECONDS = 10  # from the end of the drain to the process's exit, at most (with room to spare)
POLL_SECONDS = 0.05


class Drain:
    """One per worker: owns the SIGTERM handler once installed."""

    def __init__(self, state: ServerState, seconds: float, cancel_all: Callable[[], None]) -> None:
        self.state = state
        self.seconds = seconds  # TEXTGEN_DRAIN_SECONDS
        self.cancel_all = cancel_all  # stops every request in the engine (they answer 503)
        self._previous: Any = None  # uvicorn's handler
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def install(self) -> bool:
        """Take SIGTERM over from uvicorn. Call from the worker's main thread, inside its event loop, after
        uvicorn installed its handlers (a BentoML startup hook). False (and nothing changed) elsewhere."""
        if threading.current_thread() is not threading.main_thread():
            return False
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return True

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # A Python signal handler runs in the main thread, between two bytecodes of the event loop's own code:
        # only flip the flags here and let the loop do the rest.
        if self.state.draining:
            return  # `bentoml serve` got SIGTERM too and passed it on: already draining
        self.state.draining = True
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        log.info(
            "SIGTERM: draining; /readyz answers 503, new generations are refused, %d in flight get up to "
            "%g s (TEXTGEN_DRAIN_SECONDS)",
            self.state.in_flight,
            self.seconds,
        )
        started = time.monotonic()
        if not await self._settled(self.seconds):
            log.warning(
                "drain: %d request(s) still in flight after %g s; cancelling them (they get 503)",
                self.state.in_flight,
                self.seconds,
            )
            self.cancel_all()
            await self._settled(CANCEL_GRACE_SECONDS)
        log.info("drain: done after %.1f s; shutting down", time.monotonic() - started)
        self._hand_over()

    async def _settled(self, seconds: float) -> bool:
        """Wait until no generation is in flight, for at most `seconds`; True if none is."""
        deadline = time.monotonic() + seconds
        while self.state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        return self.state.in_flight == 0

    def _hand_over(self) -> None:
        previous = self._previous
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(signal.SIGTERM, None)  # uvicorn's handler: stop serving, then exit
        else:
            signal.raise_signal(signal.SIGTERM)
        server = getattr(previous, "__self__", None)  # uvicorn.Server, when the handler is its method
        if server is not None and hasattr(server, "force_exit") and self._loop is not None:
            # uvicorn waits for every connection to close; one whose client stopped reading never does.
            self._loop.call_later(FORCE_EXIT_SECONDS, setattr, server, "force_exit", True)
