"""Error answers: one shape per route family, chosen here and nowhere else.

textgen's routes answer in the shape BentoML uses for its own validation errors:
    {"error": "<summary>", "detail": [{"loc": ["<field>"], "msg": "<what is allowed>", "type": "<reason>"}]}
OpenAI's routes (under /v1/) answer in OpenAI's, which its client libraries turn into typed exceptions:
    {"error": {"message": "...", "type": "invalid_request_error", "param": "<field>", "code": "<reason>"}}
and Anthropic's Messages API (/v1/messages) in Anthropic's:
    {"type": "error", "error": {"type": "invalid_request_error", "message": "..."}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from textgen.api.metrics import count_rejection
from textgen.engine.params import RANGES, ParamError

OPENAI_PREFIX = "/v1/"
ANTHROPIC_PREFIX = "/v1/messages"
RETRY_AFTER_SECONDS = 1  # after a 429: the queue drains in about a decoding step per token


@dataclass(frozen=True)
class Problem:
    """What went wrong, in no particular shape yet."""

    status: int
    message: str  # what went wrong and what to do about it
    reason: str  # machine-readable: value_error, unauthorized, overloaded, timeout, ...
    param: str | None = None  # the request field at fault
    loc: tuple[str, ...] | None = None  # where, in textgen's shape; default: (param,) when there is one
    detail: tuple[dict[str, Any], ...] | None = None  # several complaints (pydantic), textgen's shape only
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, exc: ParamError) -> "Problem":
        return cls(400, exc.message, "value_error", exc.field)


class TextgenShape:
    def body(self, p: Problem) -> dict[str, Any]:
        if p.detail is not None:
            detail = list(p.detail)
        else:
            loc = p.loc if p.loc is not None else ((p.param,) if p.param else None)
            detail = [] if loc is None else [{"loc": list(loc), "msg": p.message, "type": p.reason}]
        return {"error": p.message, "detail": detail}


class OpenAIShape:
    # OpenAI's codes where they differ from textgen's reasons; a plain invalid value has none.
    CODES: dict[str, str | None] = {
        "value_error": None,
        "unauthorized": "invalid_api_key",
        "generation_failed": None,
        "shutting_down": None,
    }

    def body(self, p: Problem) -> dict[str, Any]:
        if p.status == 401:
            kind = "authentication_error"
        elif p.status >= 500 or p.status == 429:
            kind = "server_error"
        else:
            kind = "invalid_request_error"
        code = self.CODES.get(p.reason, p.reason)
        return {"error": {"message": p.message, "type": kind, "param": p.param, "code": code}}


class AnthropicShape:
    # Anthropic's error types by status (its SDK raises by status; the type is what its users read).
    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        503: "overloaded_error",
        504: "timeout_error",
    }

    def body(self, p: Problem) -> dict[str, Any]:
        kind = self.TYPES.get(p.status, "api_error" if p.status >= 500 else "invalid_request_error")
        # The field at fault is named in the message already; Anthropic's errors have no field of it.
        return {"type": "error", "error": {"type": kind, "message": p.message}}


TEXTGEN = TextgenShape()
OPENAI = OpenAIShape()
ANTHROPIC = AnthropicShape()
ErrorShape = TextgenShape | OpenAIShape | AnthropicShape


def shape_for(path: str) -> ErrorShape:
    """The one place that decides which shape a route's errors take."""
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return ANTHROPIC
    return OPENAI if path.startswith(OPENAI_PREFIX) else TEXTGEN


def error_response(shape: ErrorShape, problem: Problem) -> JSONResponse:
    return JSONResponse(shape.body(problem), status_code=problem.status, headers=dict(problem.headers))


# -- the problems more than one route can have --------------------------------------------------------


def overloaded() -> Problem:
    """429: the queue is full (at the door, or in the engine); the client should retry shortly."""
    count_rejection("overloaded")
    message = "the server is at capacity (TEXTGEN_MAX_QUEUE requests are waiting); retry after a second"
    return Problem(429, message, "overloaded", headers=(("Retry-After", str(RETRY_AFTER_SECONDS)),))


def timed_out(timeout: float) -> Problem:
    count_rejection("timeout")
    message = (
        f"the request did not finish within {timeout:g} s (TEXTGEN_TIMEOUT) and was stopped; "
        "ask for fewer tokens, retry when the server is less busy, or raise TEXTGEN_TIMEOUT"
    )
    return Problem(504, message, "timeout")


def generation_failed(error: str | None) -> Problem:
    return Problem(500, f"generation failed: {error}; retry, or report it", "generation_failed")


SHUTTING_DOWN = Problem(503, "the server is shutting down; retry", "shutting_down")
RETRY_DRAINING_SECONDS = 1  # another replica (behind the same Service) can answer at once


def draining() -> Problem:
    """503 for a generation that arrives after SIGTERM, while the requests in flight finish (counted by the
    guards, which refuse it)."""
    message = "the server is shutting down and takes no new generations; retry, another replica will answer"
    retry = (("Retry-After", str(RETRY_DRAINING_SECONDS)),)
    return Problem(503, message, "shutting_down", loc=(), headers=retry)


def invalid_body(exc: ValidationError | None = None) -> Problem:
    """400 for a body that is not the documented object; every complaint names its field."""
    if exc is None:
        message = 'the body must be a JSON object such as {"prompt": "What is AI?"}'
        return Problem(400, message, "model_type", loc=())
    errors = exc.errors(include_context=False, include_input=False, include_url=False)
    detail = []
    for err in errors:
        loc = [str(part) for part in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        field = loc[0] if loc else ""
        if field in RANGES and str(RANGES[field]) not in msg:
            msg = f"{msg}; {field} must be a number in {RANGES[field]}"
        detail.append({"loc": loc, "msg": msg, "type": err["type"]})
    first = errors[0]
    param = str(first["loc"][0]) if first["loc"] else None
    # Every complaint about the first parameter at fault (a union such as `prompt` gives one per member).
    message = "; ".join(
        f"{'.'.join(d['loc']) or 'body'}: {d['msg']}" for d in detail if d["loc"][:1] == detail[0]["loc"][:1]
    )
    if first["type"] == "extra_forbidden":
        message = f"unknown parameter {param!r} ({message}): textgen does not support it; remove it"
    return Problem(400, message, "value_error", param, detail=tuple(detail))
