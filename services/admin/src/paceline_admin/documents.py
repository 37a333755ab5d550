"""Request bodies as JSON documents: parsing JSON or YAML, and checking that a value can be
stored in a PostgreSQL jsonb column (which the JSON grammar alone does not promise)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from datetime import date, datetime
from typing import Any

import orjson
import yaml

from paceline_admin.problems import ApiError, ProblemItem

JSON_TYPES = frozenset({"application/json"})
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
MAX_DEPTH = 64
MAX_VALUES = 100_000
"""A YAML alias bomb expands to billions of values from a small body; stop walking early."""
_INT64 = (-(2**63), 2**63 - 1)
# The libyaml loader is many times faster and caps nesting depth; both are safe loaders.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def parse_body(body: bytes, content_type: str | None) -> Any:
    """The body as a Python value: YAML for a YAML media type, JSON otherwise (also when no
    Content-Type is given). Malformed bodies raise a 400 problem; other media types 415."""
    media = media_type(content_type)
    if not body.strip():
        raise ApiError(400, "the body is empty", kind="malformed-body")
    if media in YAML_TYPES:
        return await asyncio.to_thread(_load_yaml, body)
    if media and media not in JSON_TYPES and not media.endswith("+json"):
        raise ApiError(
            415,
            f"send application/json or application/yaml, not {media}",
            kind="unsupported-media-type",
        )
    return await asyncio.to_thread(_load_json, body)


def _load_json(body: bytes) -> Any:
    # The standard library's parser, not orjson: it keeps every integer exact, where orjson
    # reads one past 64 bits as a float (-9223372036854775809 would become -2**63, in range).
    # Its leniencies (NaN, lone surrogates) come out as values `as_json_document` refuses.
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise ApiError(400, "the body is nested too deeply", kind="malformed-body") from exc
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8 (nor -16, -32)
        raise ApiError(400, f"the body is not valid JSON: {exc}", kind="malformed-body") from exc


def _load_yaml(body: bytes) -> Any:
    try:
        return yaml.load(body.decode("utf-8"), Loader=_YAML_LOADER)  # noqa: S506 (a safe loader)
    except UnicodeDecodeError as exc:
        raise ApiError(400, "the YAML body is not UTF-8", kind="malformed-body") from exc
    except (yaml.YAMLError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid YAML: {exc}", kind="malformed-body") from exc


def _unstorable(text: str) -> str | None:
    """Why PostgreSQL (jsonb, text) cannot store `text`, or None."""
    if "\x00" in text:
        return "a NUL character cannot be stored"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "not valid Unicode (a lone surrogate)"
    return None


class _TooMany(Exception):
    pass


class _Walker:
    def __init__(self) -> None:
        self.values = 0
        self.problems: list[ProblemItem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(ProblemItem(path=path or "body", message=message))

    def walk(self, value: Any, path: str, depth: int) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _TooMany
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if not _INT64[0] <= value <= _INT64[1]:
                self.problem(path, "an integer outside the 64-bit range")
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                self.problem(path, "NaN and infinity are not JSON numbers")
            elif value.is_integer() and not _INT64[0] <= value <= _INT64[1]:
                # A whole number is one whatever its spelling (1e20 is 100000000000000000000).
                self.problem(path, "an integer outside the 64-bit range")
            return value
        if isinstance(value, str):
            if why := _unstorable(value):
                self.problem(path, why)
            return value
        if isinstance(value, datetime | date):
            return value.isoformat()  # YAML reads 2024-01-01 as a date; JSON has strings
        if depth >= MAX_DEPTH:
            self.problem(path, f"nested deeper than {MAX_DEPTH} levels")
            return None
        if isinstance(value, list):
            return [self.walk(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    self.problem(path, f"the key {key!r} is not a string")
                    continue
                if why := _unstorable(key):
                    self.problem(path, f"a key: {why}")
                    continue
                out[key] = self.walk(item, f"{path}.{key}" if path else key, depth + 1)
            return out
        self.problem(path, f"a {type(value).__name__} is not a JSON value")
        return None


def as_json_document(value: Any, path: str = "") -> tuple[Any, list[ProblemItem]]:
    """`value` as plain JSON (dates become ISO strings), and every reason it cannot be one."""
    walker = _Walker()
    try:
        return walker.walk(value, path, 0), walker.problems
    except _TooMany:
        return None, [ProblemItem(path=path or "body", message=f"more than {MAX_VALUES} values")]


def digest(value: Any) -> str:
    """sha256 of `value`'s canonical JSON (keys sorted): what tells a retry with an
    Idempotency-Key from a different request that reuses it."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()
