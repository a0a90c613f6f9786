"""POST /tokenize, POST /detokenize and GET /tokenizer_info: the served model's own tokenizer over HTTP.

Tools that count or score tokens (lm-evaluation-harness's remote tokenizer, load generators) need exactly the
server's tokenizer, and offline they cannot fetch it from the Hub. An ASGI middleware inside the guards, so
the API key, content type and size checks apply as on every route; errors in textgen's shape.
"""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from textgen.api.errors import TEXTGEN, Problem, error_response, invalid_body
from textgen.api.health import ServerState
from textgen.frontend.tokenizer_protocol import DetokenizeRequest, TokenizeRequest, tokenizer_info

PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})


class TokenizerRoutes:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or path not in PATHS or self.state.loaded is None:
            return await self.app(scope, receive, send)
        loaded = self.state.loaded
        tokenizer, context = loaded.tokenizer, loaded.context_length
        method = "GET" if path == "/tokenizer_info" else "POST"
        if scope["method"] != method:
            problem = Problem(405, f"{path} takes {method}", "method_not_allowed", loc=())
            return await error_response(TEXTGEN, problem)(scope, receive, send)
        if method == "GET":
            return await JSONResponse(tokenizer_info(tokenizer, context))(scope, receive, send)
        raw = json.loads(await Request(scope, receive).body())  # the guards checked it is JSON
        try:
            if path == "/tokenize":
                body = TokenizeRequest.model_validate(raw).tokenize(tokenizer, context)
            else:
                body = DetokenizeRequest.model_validate(raw).detokenize(tokenizer)
        except ValidationError as exc:
            return await error_response(TEXTGEN, invalid_body(exc))(scope, receive, send)
        except ValueError as exc:
            problem = Problem(400, str(exc), "value_error", "tokens")
            return await error_response(TEXTGEN, problem)(scope, receive, send)
        await JSONResponse(body)(scope, receive, send)
