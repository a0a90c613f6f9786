"""textgen's HTTP surface: a BentoML service over the `textgen` library.

Everything that is not HTTP or lifecycle lives in `textgen/`; see textgen/http.py for why the
batchable /generate API only admits requests and the engine does the batching per decoding step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import RedirectResponse
from starlette.routing import Route

from textgen import http, openai_api, openai_http
from textgen.config import Settings
from textgen.generator import TextGenerator
from textgen.guards import Guards
from textgen.health import ServerState
from textgen.openapi import DocumentRewriter
from textgen.loading import load_model, resolve_model
from textgen.model_store import stored_model_source

log = logging.getLogger("textgen")
settings = Settings.from_env()
# MODEL_NAME wins; else the model this Bento carries (`python -m textgen.import_model`, pinned by
# `bentoml build`); else GPT-2 (offline: SmolLM2). Resolved here, in the main process, so that a
# MODEL_NAME that cannot be loaded stops `bentoml serve` with a non-zero exit.
model_source = (None if settings.model_name else stored_model_source()) or resolve_model(settings)

state = ServerState(settings, model_source)  # this worker's: loading, ready or failed
generate_body = http.generate_body(settings.max_new_tokens)

# The old FastAPI service had Swagger UI at /docs; BentoML serves it at / (OpenAPI at /docs.json).
docs_redirect = Starlette(routes=[Route("/", lambda request: RedirectResponse("/", status_code=307))])


def stop_server() -> None:
    """Ask `bentoml serve` (this worker's parent) to shut down."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            is_bentoml = b"bentoml" in f.read()
    except OSError:
        is_bentoml = False
    if is_bentoml:
        os.kill(parent, signal.SIGTERM)


@bentoml.asgi_app(docs_redirect, path="/docs")
@bentoml.asgi_app(openai_http.models_app, path="/v1")  # GET /v1/models; mounted after the API routes
@bentoml.service(
    name="textgen",
    workers=1,  # one engine per process; it batches every request itself
    # Generations time out at TEXTGEN_TIMEOUT (504, work stopped: textgen/http.py); BentoML's own
    # timeout, which would leave the work running, only backs that up.
    traffic={"timeout": settings.request_timeout + 30},
)
class TextGen:
    def __init__(self) -> None:
        # Load in the background: the worker answers /livez at once and /readyz 503 until warm.
        self._generator: TextGenerator | None = None
        threading.Thread(target=self._load, name="textgen-start", daemon=True).start()

    def _load(self) -> None:
        try:
            loaded = load_model(settings, model_source)
            from textgen.metrics import EngineMetrics  # here, in the worker: see textgen/metrics.py

            generator = TextGenerator(loaded, settings, observer=EngineMetrics())
            generator.warmup()
        except Exception as exc:
            log.critical("the model could not be loaded; stopping the server", exc_info=True)
            state.set_failed(str(exc))
            stop_server()  # BentoML would otherwise restart this worker forever: a half-up server
            return
        self._generator = generator
        state.set_ready(loaded)
        log.info("serving %s (%s, %s)", loaded.model_id, loaded.source, settings.dtype)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        if self._generator is not None:
            self._generator.close()

    @property
    def generator(self) -> TextGenerator:
        # The guards (textgen/guards.py) answer 503 until the model is ready, so no route gets here early.
        assert self._generator is not None, "the model is not loaded yet"
        return self._generator

    @bentoml.api(
        route="/generate",
        batchable=True,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.request_timeout * 1000,
        input_spec=generate_body,
        output_spec=http.GenerateReply,
    )
    async def generate(self, bodies: list[dict[str, Any]]) -> list[Any]:
        """Generate text for a prompt. Concurrent requests are batched; each keeps its own parameters."""
        return http.admit(self.generator, bodies)

    @bentoml.api(
        route="/generate_stream",
        input_spec=generate_body,
        output_spec=http.StreamReply,
    )
    async def generate_stream(self, bodies: list[dict[str, Any]]) -> Any:
        """Same body as /generate; the text arrives as Server-Sent Events (`data: {json}`), one per delta."""
        return http.stream(self.generator, bodies[0])

    @bentoml.api(
        route="/v1/completions",
        input_spec=http.json_body(openai_api.CompletionRequest, "OpenAI's completions body."),
        output_spec=http.response_spec(openai_api.CompletionResponse, "application/json", "OpenAI's shape."),
    )
    async def completions(self, bodies: list[dict[str, Any]], ctx: bentoml.Context) -> Any:
        """OpenAI-compatible completions (JSON, or SSE with `stream`); see textgen/openai_api.py."""
        return openai_http.completions(self.generator, bodies[0], ctx)

    @bentoml.api(
        route="/v1/chat/completions",
        input_spec=http.json_body(openai_api.ChatCompletionRequest, "OpenAI's chat completions body."),
        output_spec=http.response_spec(
            openai_api.ChatCompletionResponse, "application/json", "OpenAI's shape."
        ),
    )
    async def chat_completions(self, bodies: list[dict[str, Any]], ctx: bentoml.Context) -> Any:
        """OpenAI-compatible chat completions; models without a chat template get a plain transcript."""
        return openai_http.chat_completions(self.generator, bodies[0], ctx)


# Outermost first: CORS answers browsers' preflight requests before the guards ask them for a key.
if settings.cors_origins:
    TextGen.add_asgi_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"],
    )
TextGen.add_asgi_middleware(Guards, settings=settings, state=state)
TextGen.add_asgi_middleware(DocumentRewriter)
