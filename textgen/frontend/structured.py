"""Structured output as the clients ask for it: OpenAI's `response_format`, vLLM's `structured_outputs` and its
older `guided_*` fields. Every route takes all of them and turns them into one engine Constraint
(textgen/engine/grammar.py enforces it); giving two at once is an error, never a silent choice.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from textgen.engine.params import Constraint, ParamError


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(
        "response", description="A name for the schema (OpenAI requires one; textgen ignores it)."
    )
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="The JSON schema.")
    strict: bool | None = Field(
        None, description="Accepted for OpenAI's clients: the output always follows the schema."
    )


class ResponseFormat(BaseModel):
    """OpenAI's: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of these."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = Field(None, description="A regular expression the whole output matches.")
    choice: list[str] | None = Field(None, description="The output is one of these strings.")
    grammar: str | None = Field(None, description="A Lark or GBNF (llama.cpp) grammar.")
    json_object: bool | None = Field(None, description="true: any JSON object.")


class StructuredOutputFields(BaseModel):
    """The structured-output fields every route takes."""

    response_format: ResponseFormat | None = Field(
        None,
        description='OpenAI\'s: {"type": "json_object"} (any JSON object) or {"type": "json_schema", '
        '"json_schema": {"name": ..., "schema": {...}}}; the output always parses, unless the token '
        'budget cuts it (finish_reason "length").',
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: one of json (a schema), regex, choice, grammar, json_object."
    )
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's older name for a JSON schema.")
    guided_regex: str | None = Field(None, description="vLLM's older name for a regular expression.")
    guided_choice: list[str] | None = Field(None, description="vLLM's older name for a list of choices.")
    guided_grammar: str | None = Field(None, description="vLLM's older name for a grammar.")

    def constraint(self) -> Constraint | None:
        """The one constraint these fields ask for, or None for free text."""
        given = [c for c in self._constraints() if c is not None]
        if len(given) > 1:
            names = ", ".join(c.field for c in given)
            raise ParamError(given[1].field, f"give one structured-output constraint, not several ({names})")
        return given[0] if given else None

    def _constraints(self) -> list[Constraint | None]:
        fmt, so = self.response_format, self.structured_outputs
        found: list[Constraint | None] = [
            _from_response_format(fmt) if fmt is not None else None,
            _schema(self.guided_json, "guided_json"),
            _text("regex", self.guided_regex, "guided_regex"),
            _choice(self.guided_choice, "guided_choice"),
            _text("grammar", self.guided_grammar, "guided_grammar"),
        ]
        if so is not None:
            found += [
                _schema(so.json_, "structured_outputs.json"),
                _text("regex", so.regex, "structured_outputs.regex"),
                _choice(so.choice, "structured_outputs.choice"),
                _text("grammar", so.grammar, "structured_outputs.grammar"),
                Constraint("json_object", field="structured_outputs.json_object") if so.json_object else None,
            ]
        return found


# The body members that ask for structured output.
STRUCTURED_FIELDS = frozenset(StructuredOutputFields.model_fields)


def may_constrain(body: Any) -> bool:
    """Whether a request body may ask for a grammar (Frontend.index_vocabulary_for asks): a structured-output
    field, or a "required" or named tool_choice (frontend/tools.py)."""
    if not isinstance(body, dict):
        return False
    return not STRUCTURED_FIELDS.isdisjoint(body) or body.get("tool_choice", "none") not in ("none", "auto")


def _from_response_format(fmt: ResponseFormat) -> Constraint | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json_object", field="response_format")
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise ParamError(
            "response_format",
            'response_format of type "json_schema" needs "json_schema": {"name": ..., "schema": {...}}',
        )
    return Constraint("json_schema", json.dumps(fmt.json_schema.schema_), "response_format")


def _schema(schema: dict[str, Any] | str | None, field: str) -> Constraint | None:
    if schema is None:
        return None
    return Constraint("json_schema", schema if isinstance(schema, str) else json.dumps(schema), field)


def _text(kind: Literal["regex", "grammar"], text: str | None, field: str) -> Constraint | None:
    if text is None:
        return None
    if not text:
        raise ParamError(field, f"{field} must not be empty")
    return Constraint(kind, text, field)


def _choice(choices: list[str] | None, field: str) -> Constraint | None:
    if choices is None:
        return None
    if not choices or not all(choices):
        raise ParamError(field, f"{field} must be a list of non-empty strings")
    return Constraint("choice", json.dumps(choices), field)
