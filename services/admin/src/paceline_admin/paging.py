"""Keyset pagination: an opaque cursor (base64url JSON of the last row's sort key) and limits."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

import orjson
from fastapi import Query

from paceline_admin.problems import ApiError, ProblemItem

Limit = Annotated[int, Query(ge=1, le=500, description="Items per page (1-500).")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, description="`next_cursor` of the previous page; omit for the first."),
]


def encode_cursor(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(key)).rstrip(b"=").decode()


def decode_cursor(cursor: str, length: int) -> list[Any]:
    """The sort key a cursor holds; a 422 problem for anything this API did not give out."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = orjson.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise bad_cursor() from exc
    if not isinstance(key, list) or len(key) != length or not all(isinstance(k, str) for k in key):
        raise bad_cursor()
    return key


def bad_cursor() -> ApiError:
    item = ProblemItem(path="query.cursor", message="not a cursor this API gave out")
    return ApiError(
        422,
        "the cursor is not one this API gave out; start again without it",
        kind="invalid-request",
        title="Invalid request",
        errors=[item],
    )
