"""The guards and health middlewares around a plain app, in each readiness state (loading is too quick to catch live)."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from textgen.config import Settings
from textgen.api.guards import Guards
from textgen.api.health import HealthRoutes, ServerState
from textgen.model.source import ModelSource


async def answered(request):  # the app behind the guards
    return PlainTextResponse("app")


APP = Starlette(routes=[Route(p, answered, methods=["GET", "POST"]) for p in ("/generate", "/docs.json")])


def request(state: ServerState, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=Guards(HealthRoutes(APP, state), state.settings, state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def new_state() -> ServerState:
    return ServerState(Settings(), ModelSource("/models/m", "m", "/models/m", kind="directory"))


def test_while_loading_readiness_is_503_and_apis_wait() -> None:
    state = new_state()
    ready = request(state, "GET", "/readyz")
    assert ready.status_code == 503 and ready.json() == {"status": "loading", "model": "m"}
    assert request(state, "GET", "/livez").json() == {"status": "alive"}
    refused = request(state, "POST", "/generate", json={"prompt": "hi"})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert refused.json()["detail"][0]["type"] == "not_ready"
    assert request(state, "GET", "/docs.json").text == "app"  # the docs work meanwhile
    assert request(state, "GET", "/info").json()["status"] == "loading"


def test_a_failed_load_stays_unready_and_says_why() -> None:
    state = new_state()
    state.set_failed("OSError: no weights")
    ready = request(state, "GET", "/readyz")
    assert ready.status_code == 503 and ready.json()["reason"] == "OSError: no weights"


def test_once_ready_requests_reach_the_app() -> None:
    state = new_state()
    state.status = "ready"
    assert request(state, "GET", "/readyz").json()["status"] == "ready"
    assert request(state, "POST", "/generate", json={"prompt": "hi"}).text == "app"


def test_while_draining_readiness_is_503_and_new_generations_get_503_with_retry_after() -> None:
    state = new_state()
    state.status = "ready"
    state.draining = True
    ready = request(state, "GET", "/readyz")
    assert ready.status_code == 503 and ready.json() == {"status": "draining", "model": "m"}
    refused = request(state, "POST", "/generate", json={"prompt": "hi"})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["detail"][0]["type"] == "shutting_down"
    openai = request(state, "POST", "/v1/completions", json={"prompt": "hi"})
    assert openai.status_code == 503 and openai.headers["retry-after"] == "1"
    assert (
        openai.json()["error"]["type"] == "server_error"
        and "shutting down" in openai.json()["error"]["message"]
    )
    assert request(state, "GET", "/docs.json").text == "app"  # everything but new generations still works
    assert request(state, "GET", "/livez").status_code == 200
    assert request(state, "GET", "/info").json()["status"] == "draining"


def test_sigterm_drains_then_cancels_what_outlasts_the_grace_then_hands_over() -> None:
    """The Drain in process: SIGTERM flips readiness at once; in-flight work gets `seconds`, then is
    cancelled; then the previous handler (uvicorn's, in a worker) gets the signal."""
    import os
    import signal

    from textgen.api import drain as drain_module
    from textgen.api.drain import Drain

    state = new_state()
    state.status = "ready"
    state.in_flight = 2
    events: list[str] = []

    def cancel_all() -> None:
        events.append("cancel")
        state.in_flight = 0  # the cancelled requests answer 503 and leave

    async def scenario() -> None:
        drain = Drain(state, seconds=0.3, cancel_all=cancel_all)
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: events.append("handed over"))
        try:
            assert drain.install()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.05)
            assert state.draining and events == []  # draining at once; the two in flight still have time
            os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM (the arbiter's) changes nothing
            await asyncio.wait_for(drain._task, 5)
        finally:
            signal.signal(signal.SIGTERM, previous)

    drain_module.CANCEL_GRACE_SECONDS, saved = 0.1, drain_module.CANCEL_GRACE_SECONDS
    try:
        asyncio.run(scenario())
    finally:
        drain_module.CANCEL_GRACE_SECONDS = saved
    assert events == ["cancel", "handed over"]
