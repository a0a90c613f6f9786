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
from textgen.model.loading import ModelSource


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
