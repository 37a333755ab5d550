"""Keyset pagination: limits, and cursors that name the last row's sort key.

A cursor is opaque to clients, but its form is published: each list's `cursor` parameter has a
pattern in the OpenAPI document, and every string that fits it is a position in the list (the
page after it), whether or not this API gave it out. So the schema says exactly which cursors
are accepted: one that does not fit is a 422 at `query.cursor`, and nothing past the pattern
can fail. The parts of a key are written with `.` between them:

- a time as whole microseconds since 1970-01-01T00:00:00Z (at most 16 digits: before 2286);
- an id (a UUID) as 32 lower-case hex digits;
- a number in decimal;
- a text (a definition's name, a step) as it is, without NUL; last, so it may hold dots.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

from fastapi import Query

Limit = Annotated[int, Query(ge=1, le=500, description="Items per page (1-500).")]

MAX_CURSOR_LENGTH = 1024
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

TIME = r"[0-9]{1,16}"
ID = r"[0-9a-f]{32}"
TEXT = r"[^\x00]+"


def _pattern(*parts: str) -> str:
    return "^" + r"\.".join(parts) + "$"


NAME_CURSOR = _pattern(TEXT)
"""Definitions, by name: the last name."""
TIME_ID_CURSOR = _pattern(TIME, ID)
"""Instances (newest first) and approvals (oldest first): creation time and id."""
FLAG_CURSOR = _pattern(TIME, ID, TEXT)
"""Flags, oldest first: when flagged, the instance id and the step."""
POSITION_CURSOR = _pattern(r"[0-9]{1,10}", TEXT)
"""An instance's activities, in definition order: the position and the step."""
EVENT_CURSOR = _pattern(r"[0-9]{1,18}")
"""An instance's history: the last event's id."""


def cursor_query(pattern: str) -> Any:
    """The `cursor` query parameter of a list whose cursors fit `pattern`."""
    return Query(
        pattern=pattern,
        max_length=MAX_CURSOR_LENGTH,
        description="`next_cursor` of the previous page; omit for the first.",
    )


def encode_cursor(*key: datetime | UUID | int | str) -> str:
    """The cursor of a sort key (its parts in order; a text part only last)."""
    return ".".join(_encode(part) for part in key)


def _encode(part: datetime | UUID | int | str) -> str:
    if isinstance(part, datetime):
        return str((part - EPOCH) // _MICROSECOND)
    if isinstance(part, UUID):
        return part.hex
    return str(part)


def cursor_parts(cursor: str, count: int) -> list[str]:
    """The `count` parts of a cursor that fits its list's pattern (a text part is last)."""
    parts = cursor.split(".", count - 1)
    assert len(parts) == count, "the cursor's pattern is checked before this"
    return parts


def cursor_time(part: str) -> datetime:
    return EPOCH + int(part) * _MICROSECOND


def cursor_id(part: str) -> UUID:
    return UUID(hex=part)
