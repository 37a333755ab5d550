"""Schemas of the OpenAPI document that pydantic does not write: JSON documents as the
database stores them, and process definitions (docs/definitions.md).

They are components of the document (`#/components/schemas/<Name>`), added by
`openapi_doc.complete`. A request field refers to one with `refer("Name")`: pydantic cannot
refer to a component it did not generate, so the field carries a placeholder that `complete`
replaces with the reference.

A definition's schema says what the engine's parser checks of its shape, no less (whatever it
refuses is a 422 `invalid-definition`); what JSON Schema cannot say (unique step ids, the
expression language, which steps an expression may read, the size limits across nested steps,
each activity type's parameters) the parser checks too, and the descriptions name it.
"""

from __future__ import annotations

from typing import Any

from pydantic import WithJsonSchema

from paceline_admin.documents import MAX_DEPTH, MAX_VALUES
from paceline_engine.activity_types import ACTIVITY_TYPES
from paceline_engine.definitions import (
    INPUT_TYPES,
    MAX_BRANCHES,
    MAX_DURATION_S,
    MAX_EXPRESSION_LENGTH,
    MAX_STEPS,
    MAX_TRIGGERS,
)

PLACEHOLDER = "x-paceline-schema"
"""The key of a placeholder for a reference to a component (see `refer`)."""

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$"
"""A definition's name (the engine's rule)."""
STEP_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
"""A step id or an input name (the engine's rule)."""
SIGNAL_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
"""A signal's name (the engine's rule, and the signal route's)."""
NO_NUL_PATTERN = r"^[^\x00]*$"
INT64: dict[str, Any] = {"minimum": -(2**63), "maximum": 2**63 - 1}


def refer(name: str, description: str | None = None) -> WithJsonSchema:
    """For `Annotated[...]`: the field's schema is the component `name`."""
    placeholder: dict[str, Any] = {PLACEHOLDER: name}
    if description:
        placeholder["description"] = description
    return WithJsonSchema(placeholder)


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(
    properties: dict[str, Any], required: tuple[str, ...] = (), **more: Any
) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        **more,
    }
    if required:
        schema["required"] = list(required)
    return schema


_TEXT = {"type": "string", "pattern": NO_NUL_PATTERN, "description": "Free text."}
_EXPRESSION = {
    "type": "string",
    "pattern": NO_NUL_PATTERN,
    "maxLength": MAX_EXPRESSION_LENGTH,
    "description": "An expression (docs/expressions.md).",
}


def _duration(*, zero: bool) -> dict[str, Any]:
    seconds: dict[str, Any] = {"type": "number", "maximum": MAX_DURATION_S}
    seconds["minimum" if zero else "exclusiveMinimum"] = 0
    return {
        "description": "Seconds, or a string such as `500ms`, `30s`, `5m`, `1h`; at most 30 "
        "days" + ("" if zero else ", more than zero") + " (docs/definitions.md#durations).",
        "anyOf": [seconds, {"type": "string", "pattern": NO_NUL_PATTERN}],
    }


def _input_spec(input_type: str) -> dict[str, Any]:
    defaults: dict[str, dict[str, Any]] = {
        "string": {"type": "string", "pattern": NO_NUL_PATTERN},
        "integer": {"type": "integer", **INT64},
        "number": {
            "anyOf": [{"type": "integer", **INT64}, {"type": "number", "not": {"type": "integer"}}]
        },
        "boolean": {"type": "boolean"},
        "object": ref("JsonObject"),
        "array": {"type": "array", "items": ref("JsonValue")},
    }
    default = defaults[input_type]
    return _object(
        {
            "type": {"const": input_type},
            "default": {**default, "description": "Makes the input optional."},
            "description": _TEXT,
        },
        ("type",),
    )


COMPONENTS: dict[str, dict[str, Any]] = {
    "JsonValue": {
        "description": "A JSON value as the database stores it: no NUL character in a string "
        "or a key, whole numbers within 64 bits (however written: 1e3 is 1000), at most "
        f"{MAX_DEPTH} levels of nesting and {MAX_VALUES:,} values in all.",
        "anyOf": [
            {"type": "null"},
            {"type": "boolean"},
            {"type": "integer", **INT64},
            {"type": "number", "not": {"type": "integer"}},
            {"type": "string", "pattern": NO_NUL_PATTERN},
            {"type": "array", "items": ref("JsonValue")},
            ref("JsonObject"),
        ],
    },
    "JsonObject": {
        "type": "object",
        "description": "A JSON object as the database stores it (see JsonValue).",
        "propertyNames": {"pattern": NO_NUL_PATTERN},
        "additionalProperties": ref("JsonValue"),
    },
    "Inputs": {
        "type": "object",
        "description": "A start's input values, by input name: each of its input's type (docs/"
        "definitions.md#inputs), the defaults filling in the rest. Which names and types fit "
        "depends on the definition started.",
        "propertyNames": {"pattern": STEP_ID_PATTERN},
        "additionalProperties": ref("JsonValue"),
    },
    "Definition": _object(
        {
            "name": {
                "type": "string",
                "pattern": NAME_PATTERN,
                "description": "Lower-case letters, digits, `.`, `_` and `-`, at most 100.",
            },
            "description": _TEXT,
            "inputs": {
                "type": "object",
                "description": "Input name to its spec.",
                "propertyNames": {"pattern": STEP_ID_PATTERN},
                "additionalProperties": ref("InputSpec"),
            },
            "steps": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_STEPS,
                "items": ref("Step"),
                "description": f"Run in order. At most {MAX_STEPS:,} steps in all, counting "
                "those inside conditions and parallel branches, nested at most 16 deep; step "
                "ids are unique in the whole definition.",
            },
            "triggers": {
                "type": "array",
                "maxItems": MAX_TRIGGERS,
                "items": ref("Trigger"),
                "description": "Events that start an instance (docs/definitions.md#triggers); "
                "trigger ids are unique.",
            },
        },
        ("name", "steps"),
        description="A process definition (docs/definitions.md), also as the body of a "
        "definition sent as YAML. The engine's parser checks what a schema cannot: unique "
        "step ids, expressions, what each expression reads, the limits, each activity type's "
        "parameters; each problem is listed in a 422 `invalid-definition`.",
    ),
    "Trigger": _object(
        {
            "id": {"type": "string", "pattern": STEP_ID_PATTERN},
            "event": {
                "type": "string",
                "pattern": r"^[A-Za-z0-9_.:/-]{1,200}$",
                "description": "The event type it listens to (exact match).",
            },
            "description": _TEXT,
            "when": _EXPRESSION,
            "inputs": {
                "type": "object",
                "description": "The instance's inputs; values may hold `${...}` reading "
                "`trigger.event`.",
                "propertyNames": {"pattern": STEP_ID_PATTERN},
                "additionalProperties": ref("JsonValue"),
            },
            "dedupe": _EXPRESSION,
            "dedupe_window": _duration(zero=False),
        },
        ("id", "event"),
        description="A subscription to events of one type: each event for which `when` is "
        "true starts an instance with `inputs` rendered from it.",
    ),
    "InputSpec": {
        "description": "An input: its type, and a default (which makes it optional).",
        "oneOf": [_input_spec(t) for t in INPUT_TYPES],
    },
    "Step": {
        "description": "An activity (`type`), a condition (`if`), parallel branches "
        "(`parallel`) or a wait (`wait`).",
        "oneOf": [
            ref("ActivityStep"),
            ref("ConditionStep"),
            ref("ParallelStep"),
            ref("WaitStep"),
        ],
    },
    "ActivityStep": _object(
        {
            "id": {"type": "string", "pattern": STEP_ID_PATTERN},
            "type": {"enum": sorted(ACTIVITY_TYPES), "description": "The activity type."},
            "with": {
                **ref("JsonObject"),
                "description": "The type's parameters (docs/definitions.md#activity-types); "
                "a string may hold `${...}` expressions.",
            },
            "restartable": {
                "type": ["boolean", "null"],
                "description": "Overrides the type's default (not for `approval`).",
            },
            "timeout": {"anyOf": [_duration(zero=False), {"type": "null"}]},
            "retry": {
                "anyOf": [
                    _object(
                        {
                            "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
                            "backoff": {"anyOf": [_duration(zero=True), {"type": "null"}]},
                        }
                    ),
                    {"type": "null"},
                ]
            },
            "description": _TEXT,
        },
        ("id", "type"),
    ),
    "ConditionStep": _object(
        {
            "id": {"type": "string", "pattern": STEP_ID_PATTERN},
            "if": _EXPRESSION,
            "then": {"type": "array", "items": ref("Step")},
            "else": {"type": "array", "items": ref("Step")},
            "description": _TEXT,
        },
        ("id", "if"),
    ),
    "ParallelStep": _object(
        {
            "id": {"type": "string", "pattern": STEP_ID_PATTERN},
            "parallel": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BRANCHES,
                "description": "Branches, each a non-empty list of steps, all started at once.",
                "items": {"type": "array", "minItems": 1, "items": ref("Step")},
            },
            "description": _TEXT,
        },
        ("id", "parallel"),
    ),
    "WaitStep": _object(
        {
            "id": {"type": "string", "pattern": STEP_ID_PATTERN},
            "wait": {
                "oneOf": [
                    _object({"for": _duration(zero=False)}, ("for",)),
                    _object(
                        {
                            "until": {
                                "type": "string",
                                "pattern": NO_NUL_PATTERN,
                                "description": "An ISO-8601 time with an offset, or a "
                                "`${...}` giving one.",
                            }
                        },
                        ("until",),
                    ),
                    _object(
                        {
                            "signal": {"type": "string", "pattern": SIGNAL_NAME_PATTERN},
                            "timeout": {
                                "anyOf": [_duration(zero=False), {"const": "none"}],
                                "description": 'A duration, or "none" to wait for ever.',
                            },
                            "on_timeout": {"enum": ["fail", "continue"]},
                            "when": _EXPRESSION,
                        },
                        ("signal", "timeout"),
                    ),
                ]
            },
            "description": _TEXT,
        },
        ("id", "wait"),
    ),
}


def beyond_the_parser(document: Any) -> list[tuple[str, str]]:
    """(path, message) for what the `Definition` schema refuses and the engine's parser lets
    through: a description that is not a string, and a name, step id, input name or signal
    name that ends in a line break (the parser's patterns end in `$`, which in Python matches
    before a final newline too). Only where the shape is otherwise as the parser expects."""
    found: list[tuple[str, str]] = []

    def description(raw: dict[str, Any], path: str) -> None:
        if "description" in raw and not isinstance(raw["description"], str):
            found.append((f"{path}.description" if path else "description", "a string"))

    def name(value: Any, path: str) -> None:
        if isinstance(value, str) and value.endswith("\n"):
            found.append((path, "must not end with a line break"))

    def steps(raw: Any, path: str) -> None:
        for i, step in enumerate(raw if isinstance(raw, list) else ()):
            if not isinstance(step, dict):
                continue
            here = f"{path}[{i}]"
            name(step.get("id"), f"{here}.id")
            description(step, here)
            for key in ("then", "else"):
                steps(step.get(key), f"{here}.{key}")
            branches = step.get("parallel")
            for b, branch in enumerate(branches if isinstance(branches, list) else ()):
                steps(branch, f"{here}.parallel[{b}]")
            wait = step.get("wait")
            if isinstance(wait, dict):
                name(wait.get("signal"), f"{here}.wait.signal")

    if not isinstance(document, dict):
        return found
    name(document.get("name"), "name")
    description(document, "")
    inputs = document.get("inputs")
    for key, spec in inputs.items() if isinstance(inputs, dict) else ():
        name(key, f"inputs.{key}")
        if isinstance(spec, dict):
            description(spec, f"inputs.{key}")
    steps(document.get("steps"), "steps")
    return found
