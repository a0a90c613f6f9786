"""The UI's client of the textgen HTTP API: health, request schema, and generations, plain or streamed.

Plain Python over httpx, so it is tested without Streamlit. Every failure a user can meet comes out as a
`TextgenError` whose message says what happened and what to do; the UI shows it instead of a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx

URL_ENV = "TEXTGEN_URL"
DEFAULT_URL = "http://localhost:3000"
BENTOML_DEFAULT_PORT = 3000
CONNECT_TIMEOUT = 5.0
# Short: the UI checks health on every rerun, and a server that accepts but does not answer is starting.
HEALTH_TIMEOUT = 3.0
FALLBACK_SCHEMA_PATH = Path(__file__).with_name("fallback_request_schema.json")

T = TypeVar("T")


# -- errors ----------------------------------------------------------------------------------------


class TextgenError(Exception):
    """A failure the user can act on. `command`, when set, is a shell command that fixes it."""

    def __init__(self, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.command = command


class ServerUnreachable(TextgenError):
    pass


class RequestTimedOut(TextgenError):
    pass


class InvalidParameter(TextgenError):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


class GenerationFailed(TextgenError):
    """The server accepted the request but could not finish it: a 5xx, an error event, a dropped stream."""


class UnexpectedReply(TextgenError):
    """Whatever answered is not (this version of) the textgen server."""


def start_command(url: str) -> str:
    """The command that starts a server the UI at `url` would reach."""
    port = httpx.URL(url).port or BENTOML_DEFAULT_PORT
    suffix = "" if port == BENTOML_DEFAULT_PORT else f" --port {port}"
    return f"bentoml serve service:TextGen{suffix}"


def error_from_transport(exc: httpx.HTTPError, url: str, timeout: float) -> TextgenError:
    """Translate a connection-level failure into what the user should do about it."""
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimedOut(
            f"The server at {url} did not answer within {timeout:g} s. It may still be loading the model "
            "or be busy with long generations: wait and retry, lower max_new_tokens, or raise the timeout "
            "in the sidebar."
        )
    if isinstance(exc, httpx.ConnectError):
        return ServerUnreachable(
            f"Cannot reach the textgen server at {url}. Start it from the repository root with the command "
            f"below (MODEL_NAME chooses the model), or point the UI at another server in the sidebar or "
            f"with {URL_ENV}.",
            command=start_command(url),
        )
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return GenerationFailed(
            f"The connection to {url} broke during the request: did the server stop? "
            "Check the server's log, then generate again."
        )
    return ServerUnreachable(f"Cannot talk to {url} ({exc}). Check the server URL in the sidebar.")


def error_from_response(response: httpx.Response, url: str) -> TextgenError:
    """Translate a non-200 answer (already read), from textgen's `{"error": ..., "detail": [...]}` shape."""
    path = response.request.url.path
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        body = None
    summary = body.get("error") if isinstance(body, dict) else None
    if not isinstance(summary, str):
        return UnexpectedReply(
            f"{url}{path} answered HTTP {response.status_code} without a textgen error body. "
            f"Is {url} the textgen server? Check the server URL in the sidebar."
        )
    if response.status_code in (400, 422):
        field, message = _first_invalid_field(body.get("detail"))
        if field is None:
            return InvalidParameter(None, f"The server rejected the request: {summary}.")
        return InvalidParameter(
            field, f"The server rejected `{field}`: {message or summary}. Change it and generate again."
        )
    if response.status_code == 401:
        return GenerationFailed(
            "The server requires an API key: start the UI with TEXTGEN_API_KEY set to the server's key."
        )
    if response.status_code in (429, 503):
        return GenerationFailed(f"The server is not available right now ({summary}). Retry in a moment.")
    return GenerationFailed(
        f"The server failed (HTTP {response.status_code}): {summary}. Check the server's log, then retry."
    )


def _first_invalid_field(detail: Any) -> tuple[str | None, str | None]:
    if isinstance(detail, list):
        for item in detail:
            if isinstance(item, dict) and item.get("loc"):
                return str(item["loc"][0]), item.get("msg")
    return None, None


# -- the request schema ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One field of the /generate body, as the server's OpenAPI document describes it."""

    name: str
    type: str  # JSON Schema type: integer, number, boolean, string, array
    default: Any
    title: str
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    item_type: str = ""  # an array's items' type: string (stop) or integer (stop_token_ids)

    @property
    def allowed(self) -> str:
        """The range in the server's notation, e.g. "(0, 1]"; empty when unbounded."""
        if self.minimum is None or self.maximum is None:
            return ""
        low = "(" if self.exclusive_minimum else "["
        return f"{low}{_number(self.minimum)}, {_number(self.maximum)}]"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class RequestSchema:
    params: dict[str, Param]  # in the server's order; without `prompt`, which the UI always sends

    @property
    def templates(self) -> tuple[str, ...]:
        template = self.params.get("template")
        return template.choices if template else ()

    def with_defaults(self, values: Mapping[str, Any]) -> RequestSchema:
        """This schema with `values` as the defaults of the fields it has, where the type fits.

        For the served model's own sampling defaults (GET /info): a request that leaves temperature out gets
        the model's, not the route's 0.7 that /docs.json states, so a page that starts from /docs.json alone
        would override the model with every request it sends.
        """
        params = dict(self.params)
        for name, value in values.items():
            param = params.get(name)
            if param is not None and _fits(param.type, value):
                params[name] = replace(param, default=value)
        return RequestSchema(params)


def _fits(json_type: str, value: Any) -> bool:
    if isinstance(value, bool):
        return json_type == "boolean"
    if json_type == "integer":
        return isinstance(value, int)
    if json_type == "number":
        return isinstance(value, (int, float))
    return False  # the model defaults are numbers and flags only


# Structured output (a schema, a regex, choices): the page offers no widget for them and writes free text, so
# it neither shows nor sends them (sending a default such as [] would ask for an impossible constraint).
STRUCTURED_OUTPUT_FIELDS = frozenset(
    {
        "response_format",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    }
)


def parse_request_schema(schema: Mapping[str, Any]) -> RequestSchema:
    """Read the /generate requestBody schema (the object with `properties`)."""
    params: dict[str, Param] = {}
    for name, prop in schema.get("properties", {}).items():
        if name == "prompt" or name in STRUCTURED_OUTPUT_FIELDS:
            continue
        kind = _json_type(prop)
        exclusive = prop.get("exclusiveMinimum")
        if isinstance(exclusive, bool):  # OpenAPI 3.0 (what /docs.json says): a flag on `minimum`
            minimum, exclusive_minimum = prop.get("minimum"), exclusive
        else:  # JSON Schema 2020-12 (pydantic): the bound itself
            minimum = exclusive if exclusive is not None else prop.get("minimum")
            exclusive_minimum = exclusive is not None
        params[name] = Param(
            name=name,
            type=kind,
            default=prop.get("default", [] if kind == "array" else None),
            title=prop.get("title", name),
            description=prop.get("description", ""),
            minimum=minimum,
            maximum=prop.get("maximum"),
            exclusive_minimum=exclusive_minimum,
            choices=tuple(prop.get("enum", ())),
            item_type=_json_type(prop.get("items", {})) if kind == "array" else "",
        )
    return RequestSchema(params)


def _json_type(prop: Mapping[str, Any]) -> str:
    if "type" in prop:
        return str(prop["type"])
    # pydantic writes `int | None` as anyOf; the non-null branch is the type
    for option in prop.get("anyOf", ()):
        if option.get("type") not in (None, "null"):
            return str(option["type"])
    return "unknown"


def request_body_schema(openapi: Mapping[str, Any]) -> Mapping[str, Any]:
    try:
        body = openapi["paths"]["/generate"]["post"]["requestBody"]
        return body["content"]["application/json"]["schema"]
    except (KeyError, TypeError):
        raise UnexpectedReply(
            "The server's /docs.json does not describe POST /generate: is this the textgen server?"
        ) from None


def fallback_request_schema() -> RequestSchema:
    """The schema shipped with the UI, for when the server is down (tests keep it equal to the server's)."""
    return parse_request_schema(json.loads(FALLBACK_SCHEMA_PATH.read_text()))


# -- Server-Sent Events ----------------------------------------------------------------------------


class SSEParser:
    """Incremental text/event-stream parser: bytes in, the JSON `data` of each complete event out.

    Chunks split anywhere: inside a line, between CR and LF, inside a UTF-8 character, so the parser
    buffers bytes and decodes only whole events.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        data = self._buffer + chunk
        # A trailing CR may be the first half of a CRLF; wait for the next chunk to know.
        held = b"\r" if data.endswith(b"\r") else b""
        if held:
            data = data[:-1]
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *complete, rest = data.split(b"\n\n")
        self._buffer = rest + held
        return [event for block in complete if (event := self._parse_block(block)) is not None]

    def close(self) -> list[dict[str, Any]]:
        """The end of the stream: a held CR was a line end after all; an unfinished event is dropped."""
        rest, self._buffer = self._buffer, b""
        return self.feed(rest.replace(b"\r", b"\n")) if rest.endswith(b"\r") else []

    @staticmethod
    def _parse_block(block: bytes) -> dict[str, Any] | None:
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            raise UnexpectedReply("The server sent an event that is not UTF-8 text.") from None
        lines = []
        for line in text.split("\n"):
            name, _, value = line.partition(":")
            if name == "data":  # other fields (event, id, retry) and comments carry nothing for us
                lines.append(value.removeprefix(" "))
        if not lines:
            return None
        try:
            event = json.loads("\n".join(lines))
        except ValueError:
            raise UnexpectedReply(f"The server sent an event that is not JSON: {text[:200]!r}") from None
        if not isinstance(event, dict):
            raise UnexpectedReply(f"The server sent an event that is not a JSON object: {text[:200]!r}")
        return event


# -- generations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """A finished generation and what the server reported about it."""

    text: str
    finish_reason: str
    model: str
    seed: int | None
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], text: str) -> Completion:
        try:
            return cls(
                text=text,
                finish_reason=str(data["finish_reason"]),
                model=str(data.get("model", "")),
                seed=data.get("seed"),
                usage=dict(data["usage"]),
                timings=dict(data["timings"]),
            )
        except (KeyError, TypeError, ValueError):
            raise UnexpectedReply(
                f"The server's answer lacks finish_reason, usage or timings: {dict(data)!r:.300}"
            ) from None


class Generation:
    """A streamed generation. Use as a context manager, iterate for the text deltas, then read `completion`.

    Leaving the context closes the connection, which makes the server cancel the request: that is how
    the UI's Stop button frees the server.
    """

    def __init__(self, client: TextgenClient, body: Mapping[str, Any]) -> None:
        self._client = client
        self._body = dict(body)
        self._response: httpx.Response | None = None
        self.text = ""
        self.completion: Completion | None = None

    def __enter__(self) -> Generation:
        request = self._client.http.build_request("POST", "/generate_stream", json=self._body)
        response = self._client.call(lambda: self._client.http.send(request, stream=True))
        if response.status_code != 200:
            try:
                self._client.call(response.read)
                raise error_from_response(response, self._client.url)
            finally:
                response.close()
        self._response = response
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._response is not None:
            self._response.close()

    def __iter__(self) -> Iterator[str]:
        if self._response is None:
            raise RuntimeError("use `with client.stream(body) as generation:` before iterating")
        parser = SSEParser()
        chunks = self._response.iter_bytes()
        while self.completion is None:
            chunk = self._client.call(lambda: next(chunks, None))
            for event in parser.feed(chunk) if chunk is not None else parser.close():
                yield from self._take(event)
            if chunk is None:
                break
        if self.completion is None:
            raise GenerationFailed(
                f"The stream ended before the generation finished ({len(self.text)} characters "
                "received). Check the server's log, then generate again."
            )

    def _take(self, event: dict[str, Any]) -> Iterator[str]:
        if self.completion is not None:
            return  # nothing follows the final event
        if "error" in event:
            raise GenerationFailed(
                f"The generation failed on the server after {len(self.text)} characters: "
                f"{event['error']}. The text so far is kept; generate again to retry."
            )
        delta = str(event.get("text", ""))
        self.text += delta
        if "finish_reason" in event:
            self.completion = Completion.from_json(event, self.text)
        if delta:
            yield delta


Health = Literal["ready", "loading", "down"]


@dataclass(frozen=True)
class HealthReport:
    state: Health
    error: TextgenError | None = None  # why it is not ready, for the user


class TextgenClient:
    """One textgen server at `url`; `timeout` bounds each wait for the server (connect, each read)."""

    def __init__(self, url: str, timeout: float = 120.0, api_key: str | None = None) -> None:
        self.url = normalize_url(url)
        self.timeout = timeout
        self.health_timeout = min(timeout, HEALTH_TIMEOUT)
        # The server's TEXTGEN_API_KEY, when it has one (default: this process's TEXTGEN_API_KEY).
        api_key = api_key if api_key is not None else os.environ.get("TEXTGEN_API_KEY", "").strip()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT)
        )

    def __enter__(self) -> TextgenClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def call(self, send: Callable[[], T]) -> T:
        """Run one httpx operation, turning its failures into TextgenErrors."""
        try:
            return send()
        except httpx.HTTPError as exc:
            raise error_from_transport(exc, self.url, self.timeout) from None

    def health(self) -> HealthReport:
        """ready: /readyz is 200; loading: the server is up but not ready; down: nothing usable answers."""
        try:
            response = self.http.get("/readyz", timeout=self.health_timeout)
        except httpx.TimeoutException:
            return HealthReport(
                "loading",
                RequestTimedOut(
                    f"The server at {self.url} accepted the connection but is not answering yet."
                ),
            )
        except httpx.HTTPError as exc:
            return HealthReport("down", error_from_transport(exc, self.url, self.health_timeout))
        if response.status_code == 200:
            return HealthReport("ready")
        if response.status_code == 503:
            return HealthReport(
                "loading", GenerationFailed(f"The server at {self.url} is loading the model.")
            )
        return HealthReport("down", error_from_response(response, self.url))

    def request_schema(self) -> RequestSchema:
        response = self.call(lambda: self.http.get("/docs.json", timeout=self.health_timeout))
        if response.status_code != 200:
            raise error_from_response(response, self.url)
        try:
            openapi = response.json()
        except ValueError:
            raise UnexpectedReply(f"{self.url}/docs.json is not JSON: is this the textgen server?") from None
        return parse_request_schema(request_body_schema(openapi))

    def sampling_defaults(self) -> dict[str, Any]:
        """GET /info's `sampling_defaults.values`: the served model's own defaults for the sampling fields a
        request leaves out ({} when the model has none, or the server is older than them)."""
        response = self.call(lambda: self.http.get("/info", timeout=self.health_timeout))
        if response.status_code != 200:
            raise error_from_response(response, self.url)
        try:
            info = response.json()
        except ValueError:
            raise UnexpectedReply(f"{self.url}/info is not JSON: is this the textgen server?") from None
        defaults = info.get("sampling_defaults") if isinstance(info, dict) else None
        values = defaults.get("values") if isinstance(defaults, dict) else None
        return dict(values) if isinstance(values, dict) else {}

    def generate(self, body: Mapping[str, Any]) -> Completion:
        """POST /generate: the whole text at once, post-processed as the body asks."""
        response = self.call(lambda: self.http.post("/generate", json=dict(body)))
        if response.status_code != 200:
            raise error_from_response(response, self.url)
        try:
            data = response.json()
        except ValueError:
            raise UnexpectedReply(f"{self.url}/generate answered with something that is not JSON.") from None
        return Completion.from_json(data, str(data.get("generated_text", "")))

    def stream(self, body: Mapping[str, Any]) -> Generation:
        """POST /generate_stream; see Generation."""
        return Generation(self, body)


def normalize_url(raw: str) -> str:
    """Accept what people type ("localhost:3000", a trailing slash) and return a base URL."""
    url = raw.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ServerUnreachable(f"{raw!r} is not a server URL; use one like {DEFAULT_URL}.")
    return url


def configured_url(env: Mapping[str, str] = os.environ) -> str:
    return env.get(URL_ENV, "").strip() or DEFAULT_URL
