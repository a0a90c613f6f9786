"""What the server says about itself: liveness, readiness (loading, ready, failed) and GET /info.

The model loads in the background after the worker starts serving, so that /livez answers at once (an
orchestrator does not kill a pod that is merely loading) and /readyz says 503 until the model is loaded
and warm, then 200: the contract Kubernetes probes and load balancers expect.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from textgen import __version__
from textgen.config import Settings
from textgen.engine.params import MAX_STOP_CHARS, MAX_STOP_STRINGS
from textgen.model import allocator
from textgen.model.source import ModelSource

if TYPE_CHECKING:  # torch: see textgen/engine/outputs.py
    from textgen.model.loading import LoadedModel

LIVENESS_PATHS = ("/livez", "/healthz", "/health")  # /health: vLLM's, which guidellm checks
READINESS_PATH = "/readyz"
INFO_PATH = "/info"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class ServerState:
    """Written by the loading thread, read by the HTTP guards (one per worker process)."""

    def __init__(self, settings: Settings, source: ModelSource) -> None:
        self.settings = settings
        self.source = source
        self.status = "loading"  # loading | ready | failed
        self.reason: str | None = None
        # SIGTERM (textgen/api/drain.py): readiness turns 503 and new generations are refused while the
        # requests in flight finish.
        self.draining = False
        self.in_flight = 0  # generation requests let through by the guards and not yet answered
        self.loaded: LoadedModel | None = None

    @functools.cached_property
    def cpu(self) -> dict[str, Any]:
        """Instruction sets, cores: what the dtype and kernels were chosen for. Worked out at the first
        GET /info, not at start: it needs torch, which `bentoml serve`'s own process never imports."""
        from textgen.model.cpu import describe

        return describe()

    @functools.cached_property
    def allocator(self) -> str:
        """The worker's memory allocator: tcmalloc where the system has it (textgen/model/allocator.py).
        Fixed when the process started, so read once."""
        return allocator.in_use()

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def set_ready(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.status = "ready"

    def set_failed(self, reason: str) -> None:
        self.reason = reason
        self.status = "failed"

    def liveness(self) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "alive"}

    def readiness(self) -> tuple[int, dict[str, Any]]:
        if self.draining:  # the load balancer must stop sending requests here
            return 503, {"status": "draining", "model": self.source.model_id}
        if self.ready:
            return 200, {"status": "ready", "model": self.source.model_id}
        body: dict[str, Any] = {"status": self.status, "model": self.source.model_id}
        if self.reason:
            body["reason"] = self.reason
        return 503, body

    def compiled(self, kind: str) -> str | None:
        """What became of compiling the model's decoding step or attention (textgen/model/native.py)."""
        if self.loaded is None:
            return None
        if self.settings.compile == "off":
            return "off: TEXTGEN_COMPILE=off"
        from textgen.model.native import compile_state  # torch: in the worker only (see `cpu`)

        return compile_state(self.loaded.model, kind)

    def info(self) -> dict[str, Any]:
        s, source = self.settings, self.source
        return {
            "status": "draining" if self.draining else self.status,
            "model": source.model_id,
            "source": source.origin,
            "revision": source.revision or source.sha256,
            "dtype": self.loaded.dtype if self.loaded else s.dtype,  # TEXTGEN_DTYPE resolved for this CPU
            "dtype_reason": self.loaded.dtype_reason if self.loaded else None,
            "kv_cache_dtype": self.loaded.kv_cache_dtype if self.loaded else None,  # what the KV cache holds
            "cpu": self.cpu,
            "allocator": self.allocator,
            "compiled_step": self.compiled("step"),  # a lone stream's step (model/compiled.py), or why not
            # the batch's attention of decoding rows (model/compiled_attention.py), or why not
            "compiled_attention": self.compiled("attention"),
            "context_length": self.loaded.context_length if self.loaded else None,
            # What a request's unset sampling fields fall back to, and from where (the model, or textgen).
            "sampling_defaults": self.loaded.sampling_defaults.as_info() if self.loaded else None,
            "limits": {
                "max_new_tokens": s.max_new_tokens,
                "max_prompt_chars": s.max_prompt_chars,
                "max_stop_strings": MAX_STOP_STRINGS,
                "max_stop_chars": MAX_STOP_CHARS,
                "max_batch_size": s.max_batch_size,
                "max_queue": s.max_queue,
                "max_body_bytes": s.max_body_bytes,
                "timeout_seconds": s.request_timeout,
                "drain_seconds": s.drain_seconds,
                "kv_budget_tokens": s.kv_budget_tokens,  # null: sized from the memory at start-up (/metrics)
            },
            "auth": s.api_key is not None,
            "version": {"textgen": __version__}
            | {p: _version(p) for p in ("bentoml", "transformers", "torch")},
        }


class HealthRoutes:
    """ASGI middleware answering /livez (and /healthz), /readyz and GET /info from the ServerState.

    It sits inside the guards (api/guards.py), which let the probes through without a key and ask one
    for /info like for every other route.
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in LIVENESS_PATHS:
            status, body = self.state.liveness()
        elif path == READINESS_PATH:
            status, body = self.state.readiness()
        elif path == INFO_PATH and scope["method"] == "GET":
            status, body = 200, self.state.info()
        else:
            return await self.app(scope, receive, send)
        await JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})(
            scope, receive, send
        )
