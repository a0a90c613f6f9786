"""textgen's HTTP surface: a BentoML service over the `textgen` library.

Everything that is not HTTP or lifecycle lives in `textgen/` (api → frontend → engine → model); see
textgen/api/responses.py for why the batchable /generate API only admits requests and the engine does the
batching per decoding step.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import RedirectResponse
from starlette.routing import Route

from textgen.api import generate as generate_routes
from textgen.api import openai as openai_routes
from textgen.api import openai_responses as responses_routes
from textgen.api import anthropic_messages as messages_routes
from textgen.api.bentoml_fixes import fix_timeout_middleware
from textgen.api.drain import Drain
from textgen.api.exit_status import stop_server, watch_for_failed_worker
from textgen.api.guards import Guards
from textgen.api.health import HealthRoutes, ServerState
from textgen.api.logs import show_textgen_logs
from textgen.api.openapi import DocumentRewriter
from textgen.api.tokenizer import TokenizerRoutes
from textgen.config import Settings
from textgen.frontend.prepare import Frontend
from textgen.model.allocator import bound_kernel_caches, preload_for_workers
from textgen.model.source import resolve_model
from textgen.model.store import check_build_has_model, stored_model_source

show_textgen_logs()
watch_for_failed_worker()  # a worker that cannot load the model makes `bentoml serve` exit 1
log = logging.getLogger("textgen")
fix_timeout_middleware()  # BentoML 1.4 keeps each request's context for the whole traffic timeout otherwise
settings = Settings.from_env()
# Workers allocate with tcmalloc where the system has it, and bound oneDNN's per-shape caches; only processes
# started after this can take either, so here, in `bentoml serve`'s own process, before it starts them
# (textgen/model/allocator.py).
log.info("memory allocator: %s; %s", preload_for_workers(settings.allocator), bound_kernel_caches())
check_build_has_model()  # `bentoml build` without an imported model: say how to import it
# MODEL_NAME wins; else the model this Bento carries (`python -m textgen.import_model`, pinned by
# `bentoml build`); else GPT-2 (offline: SmolLM2). Resolved here, in the main process, so that a
# MODEL_NAME that cannot be loaded stops `bentoml serve` with a non-zero exit.
model_source = (None if settings.model_name else stored_model_source()) or resolve_model(settings)

state = ServerState(settings, model_source)  # this worker's: loading, ready or failed
generate_body = generate_routes.body_spec(settings.max_new_tokens)

# The old FastAPI service had Swagger UI at /docs; BentoML serves it at / (OpenAPI at /docs.json).
docs_redirect = Starlette(routes=[Route("/", lambda request: RedirectResponse("/", status_code=307))])


@bentoml.asgi_app(docs_redirect, path="/docs")
@bentoml.asgi_app(
    openai_routes.models_app(
        lambda: state.source.model_id, lambda: state.loaded.context_length if state.loaded else None
    ),
    path="/v1",
)  # mounted after the APIs
@bentoml.service(
    name="textgen",
    workers=1,  # one engine per process; it batches every request itself
    # Generations time out at TEXTGEN_TIMEOUT (504, work stopped: textgen/api/responses.py); BentoML's own
    # timeout, which would leave the work running, only backs that up.
    traffic={"timeout": settings.request_timeout + 30},
)
class TextGen:
    def __init__(self) -> None:
        # Load in the background: the worker answers /livez at once and /readyz 503 until warm.
        self._frontend: Frontend | None = None
        # SIGTERM drains this worker instead of closing its socket at once (textgen/api/drain.py).
        self._drain = Drain(state, settings.drain_seconds, cancel_all=self._cancel_all)
        threading.Thread(target=self._load, name="textgen-start", daemon=True).start()

    @bentoml.on_startup
    def take_sigterm(self) -> None:
        # Here: in the worker's main thread, once uvicorn has put its own SIGTERM handler in place.
        if not self._drain.install():
            log.warning("SIGTERM will not drain: the service does not run in a worker's main thread")

    def _cancel_all(self) -> None:
        if self._frontend is not None:
            self._frontend.engine.cancel_all()

    def _load(self) -> None:
        try:
            # torch and transformers are imported here, in the worker's loading thread: `bentoml serve`
            # imports this module in its own process too, where they would only cost time
            # (textgen/engine/outputs.py).
            from textgen.model.loading import load_model

            loaded = load_model(settings, model_source)
            from textgen.api.metrics import EngineMetrics  # here, in the worker: see textgen/api/metrics.py

            frontend = Frontend(loaded, settings, observer=EngineMetrics())
            frontend.warmup()
        except Exception as exc:
            log.critical("the model could not be loaded; stopping the server", exc_info=True)
            state.set_failed(str(exc))
            stop_server(str(exc))  # BentoML would otherwise restart this worker forever: a half-up server
            return
        self._frontend = frontend
        state.set_ready(loaded)
        log.info("ready: serving %s", loaded.model_id)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        if self._frontend is not None:
            self._frontend.close()

    @property
    def frontend(self) -> Frontend:
        # The guards (textgen/api/guards.py) answer 503 until the model is ready, so no route gets here early.
        assert self._frontend is not None, "the model is not loaded yet"
        return self._frontend

    @bentoml.api(
        route="/generate",
        batchable=True,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.request_timeout * 1000,
        input_spec=generate_body,
        output_spec=generate_routes.GenerateReply,
    )
    async def generate(self, bodies: list[dict[str, Any]]) -> list[Any]:
        """Generate text for a prompt. Concurrent requests are batched; each keeps its own parameters."""
        await self.frontend.index_vocabulary_for(bodies)
        return generate_routes.admit(self.frontend, bodies)

    @bentoml.api(route="/generate_stream", input_spec=generate_body, output_spec=generate_routes.StreamReply)
    async def generate_stream(self, bodies: list[dict[str, Any]]) -> Any:
        """Same body as /generate; the text arrives as Server-Sent Events (`data: {json}`), one per delta."""
        await self.frontend.index_vocabulary_for(bodies)
        return generate_routes.stream(self.frontend, bodies[0])

    @bentoml.api(
        route="/v1/completions",
        input_spec=openai_routes.CompletionBody,
        output_spec=openai_routes.CompletionReply,
    )
    async def completions(self, bodies: list[dict[str, Any]], ctx: bentoml.Context) -> Any:
        """OpenAI-compatible completions (JSON, or SSE with `stream`)."""
        await self.frontend.index_vocabulary_for(bodies)
        return openai_routes.completions(self.frontend, bodies[0], ctx)

    @bentoml.api(
        route="/v1/chat/completions", input_spec=openai_routes.ChatBody, output_spec=openai_routes.ChatReply
    )
    async def chat_completions(self, bodies: list[dict[str, Any]], ctx: bentoml.Context) -> Any:
        """OpenAI-compatible chat completions; models without a chat template get a plain transcript."""
        await self.frontend.index_vocabulary_for(bodies)
        return openai_routes.chat_completions(self.frontend, bodies[0], ctx)

    @bentoml.api(
        route="/v1/responses",
        input_spec=responses_routes.ResponsesBody,
        output_spec=responses_routes.ResponsesReply,
    )
    async def responses(self, bodies: list[dict[str, Any]], ctx: bentoml.Context) -> Any:
        """OpenAI's Responses API: the same conversation as chat, as a Response object or its typed events."""
        await self.frontend.index_vocabulary_for([responses_routes.as_chat_fields(b) for b in bodies])
        return responses_routes.responses(self.frontend, bodies[0], ctx)

    @bentoml.api(
        route="/v1/messages",
        input_spec=messages_routes.MessagesBody,
        output_spec=messages_routes.MessagesReply,
    )
    async def messages(self, bodies: list[dict[str, Any]], ctx: bentoml.Context) -> Any:
        """Anthropic's Messages API: the same conversation as chat, as a Message or its named events."""
        await self.frontend.index_vocabulary_for([messages_routes.as_chat_fields(b) for b in bodies])
        return messages_routes.messages(self.frontend, bodies[0], ctx)

    @bentoml.api(
        route="/v1/messages/count_tokens",
        input_spec=messages_routes.CountBody,
        output_spec=messages_routes.CountReply,
    )
    async def count_tokens(self, bodies: list[dict[str, Any]], ctx: bentoml.Context) -> Any:
        """Anthropic's token count: the prompt /v1/messages would submit for this conversation, in tokens."""
        # Checked as /v1/messages checks it: a structured output's grammar too, so the index comes first.
        await self.frontend.index_vocabulary_for([messages_routes.as_chat_fields(b) for b in bodies])
        return messages_routes.count_tokens(self.frontend, bodies[0], ctx)


# /generate_stream returns its own StreamingResponse (errors before the stream starts are plain JSON), so
# BentoML cannot see from the function that it streams; say so, and its clients iterate over the events.
TextGen.apis["generate_stream"].is_stream = True

# Outermost first: CORS answers browsers' preflight requests before the guards ask them for a key.
if settings.cors_origins:
    TextGen.add_asgi_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"],
    )
TextGen.add_asgi_middleware(Guards, settings=settings, state=state)
TextGen.add_asgi_middleware(HealthRoutes, state=state)
TextGen.add_asgi_middleware(TokenizerRoutes, state=state)
TextGen.add_asgi_middleware(DocumentRewriter)
