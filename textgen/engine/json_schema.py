"""A JSON schema as textgen's grammars enforce it: what a schema leaves open, tightened as vLLM's default
grammar engine (xgrammar's strict mode) and llama.cpp's grammars tighten it. Plain JSON, no grammar engine:
the frontend closes tool parameters with it without importing torch (tests/test_layout.py)."""

from __future__ import annotations

import json
from typing import Any

# A schema as the grammar enforces it: what a schema leaves open, a small model fills until its token budget
# runs out. SmolLM2, asked for the README's {"city", "population"} schema, went on adding properties such as
# "population_per_family_per_capita" (6 answers in 6 cut at 1024 tokens, none parsing), and, once objects were
# closed, wrote "population": 1111... for as long. So:
# - an object has only the properties its schema lists unless the schema says otherwise (additionalProperties,
#   patternProperties), as vLLM's default grammar engine (xgrammar's strict mode) and llama.cpp's grammars
#   have it; schemas that combine with others on the same object (allOf, $ref, anyOf / oneOf beside properties, if)
#   stay open: closed alone, one would refuse the properties another adds;
# - an integer without bounds is one of JSON's safe integers, +-(2^53 - 1), which every parser reads exactly
#   (RFC 7493): at most 16 digits, as llama.cpp's grammars allow.
SAFE_INTEGER = 2**53 - 1
_COMBINING = ("allOf", "anyOf", "oneOf", "$ref", "if", "dependentSchemas")
_OPEN_ENDED = ("additionalProperties", "unevaluatedProperties", "patternProperties")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMAS = ("items", "prefixItems", "additionalItems", "additionalProperties", "contains", "not")


def enforced_schema(schema: str | dict[str, Any]) -> str:
    """The JSON schema (as JSON text) as the grammar enforces it: objects closed to the properties they list,
    integers bounded to JSON's safe integers, where the schema says nothing else."""
    copy = json.loads(schema) if isinstance(schema, str) else json.loads(json.dumps(schema))
    _enforce(copy, combined=False)
    return json.dumps(copy)


def _enforce(node: Any, combined: bool) -> None:
    """`node` and the schemas inside it; `combined`: it applies to an object together with other schemas."""
    if isinstance(node, list):  # items or prefixItems as a list of schemas
        for part in node:
            _enforce(part, combined=False)
        return
    if not isinstance(node, dict):
        return  # true / false schemas
    lists = "properties" in node
    if lists and not combined and not any(key in node for key in _COMBINING + _OPEN_ENDED):
        node["additionalProperties"] = False
    kinds = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
    if "integer" in kinds and "number" not in kinds and "enum" not in node and "const" not in node:
        if "minimum" not in node and "exclusiveMinimum" not in node:
            node["minimum"] = -SAFE_INTEGER
        if "maximum" not in node and "exclusiveMaximum" not in node:
            node["maximum"] = SAFE_INTEGER
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for part in node[key].values():
                _enforce(part, combined=False)
    for key in ("allOf", "anyOf", "oneOf", "if", "then", "else"):
        parts = node.get(key)
        for part in parts if isinstance(parts, list) else [parts]:
            # allOf's parts (and if / then / else) apply together; anyOf's and oneOf's are alternatives,
            # closed unless the node lists properties of its own beside them
            together = key in ("allOf", "if", "then", "else") or lists
            _enforce(part, combined=combined or together)
    for key in _SCHEMAS:
        _enforce(node.get(key), combined=False)
