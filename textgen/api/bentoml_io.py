"""BentoML input and output specs: the raw JSON body in, a ready starlette Response out.

Every route validates its own body, so that each error has the route family's shape and names the bare
field (api/errors.py). The input spec therefore takes any JSON and hands it over as a one-item list — the
form a batchable API (/generate) needs — while the schema it publishes (/schema.json, /docs.json) is the
flat request object. BentoML's own clients read that schema, so they call every route with keyword
arguments, `SyncHTTPClient(url).generate(prompt="What is AI?", max_new_tokens=10)`, and send exactly the
flat body a curl user sends.
"""

from __future__ import annotations

import json
from typing import Any

from _bentoml_sdk.io_models import IORootModel
from pydantic import BaseModel, field_validator
from starlette.responses import Response

from textgen.engine.params import fmt_number


def json_body(schema: type[BaseModel], doc: str, maximums: dict[str, int] | None = None) -> type[IORootModel]:
    """An input spec for a JSON body documented by `schema`.

    `maximums` publishes this server's configured limits (e.g. TEXTGEN_MAX_NEW_TOKENS) in place of the
    schema's absolute bounds.
    """

    class Body(IORootModel[list[Any]]):  # any JSON: the route's own parse says what is wrong
        @field_validator("root", mode="before")
        @classmethod
        def _one_item(cls, value: Any) -> Any:
            return [value]

        @classmethod
        def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> "Body":
            # BentoML's IORootModel.model_validate_json builds model_json_schema() for every request only to
            # see whether the body is a string; built anew each time, the schema cost 3.4 ms of the event loop
            # per request (3.4% of the worker's samples at 32 clients, Zen 4 EPYC). This body is JSON.
            return cls.model_validate(json.loads(json_data), **kwargs)

        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
            # No "root_input" key: clients then send keyword arguments as the flat object.
            body_schema = schema.model_json_schema(*args, **kwargs)
            for name, maximum in (maximums or {}).items():
                field = body_schema["properties"][name]
                field["description"] = field["description"].replace(
                    f", {fmt_number(field['maximum'])}]", f", {maximum}]"
                )
                field["maximum"] = maximum
            return body_schema

    Body.__root_input__ = True  # server side: the whole body is the API's one argument
    Body.__name__ = Body.__qualname__ = f"{schema.__name__}Body"
    Body.__doc__ = doc
    return Body


def response_spec(
    schema: type[BaseModel], media_type: str, doc: str, batched: bool = False
) -> type[IORootModel]:
    """An output spec for an API that returns ready starlette Responses; `schema` documents the 200 body.

    `batched`: the API is batchable and returns one Response per request of the batch; BentoML hands each
    request its item as a one-item list.
    """

    class Reply(IORootModel[schema]):  # type: ignore[valid-type]
        @classmethod
        async def to_http_response(cls, obj: Any, serde: Any) -> Response:
            if batched:
                (obj,) = obj
            return obj

        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
            # The OpenAPI document (asked with a ref_template) shows what one event's data holds; the routes
            # list BentoML's clients read (/schema.json) says "text", so they yield the event text as it
            # comes instead of parsing the whole stream as one JSON document.
            if media_type == "text/event-stream" and "ref_template" not in kwargs:
                return {
                    "type": "string",
                    "description": f"Server-Sent Events; each data is a {schema.__name__}",
                }
            return super().model_json_schema(*args, **kwargs)

    Reply.media_type = media_type
    Reply.__name__ = Reply.__qualname__ = f"{schema.__name__}Reply"
    Reply.__doc__ = doc
    return Reply
