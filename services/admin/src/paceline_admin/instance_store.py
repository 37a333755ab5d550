"""SQL for instances, their activities and their history. The admin API only inserts PENDING
instances (paceline_starts.instances); every later change is the scheduler's.

An instance is a small document (`instances.state`: status, inputs, counters) and one row per
activity (`activities`, with the step's depth-first `position` in the definition, NULL for a
row carried over from the single-document layout until the scheduler next writes it)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

_SUMMARY = """
    i.id, i.definition, i.version, i.status, i.trace_id, i.started_by, i.started_how,
    i.created_at, (i.state->>'started_at')::timestamptz AS started_at,
    (i.state->>'finished_at')::timestamptz AS finished_at
"""

_DETAIL = f"""
    SELECT {_SUMMARY}, i.state, i.trigger, d.body AS definition_body,
           c.by AS cancel_by, c.reason AS cancel_reason, c.requested_at AS cancel_requested_at
    FROM instances i
    JOIN definitions d ON d.name = i.definition AND d.version = i.version
    LEFT JOIN cancel_requests c ON c.instance_id = i.id
    WHERE i.id = $1
"""  # noqa: S608 (constants only)


async def by_idempotency_key(pool: asyncpg.Pool, key: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT id, status, definition, version, trace_id, request_hash FROM instances"
        " WHERE idempotency_key = $1",
        key,
    )
    return row


async def detail(
    conn: asyncpg.Pool | asyncpg.Connection, instance_id: UUID
) -> asyncpg.Record | None:
    """The instance with its state document, its definition (to order activities stored
    without a position) and its first cancel request (`cancel_by`, `cancel_reason`,
    `cancel_requested_at`: null when none)."""
    row: asyncpg.Record | None = await conn.fetchrow(_DETAIL, instance_id)
    return row


async def page(
    pool: asyncpg.Pool,
    *,
    statuses: Sequence[str],
    definition: str | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Newest first. The order (created_at DESC, id ASC) is the one the indexes have."""
    where: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if statuses:
        where.append(f"i.status = ANY({arg(list(statuses))}::text[])")
    if definition is not None:
        where.append(f"i.definition = {arg(definition)}")
    if after is not None:
        at, last_id = arg(after[0]), arg(after[1])
        where.append(f"(i.created_at < {at} OR (i.created_at = {at} AND i.id > {last_id}))")
    # Only placeholders are interpolated; every value travels as a parameter.
    sql = (
        f"SELECT {_SUMMARY} FROM instances i"  # noqa: S608 (placeholders only)
        f"{' WHERE ' + ' AND '.join(where) if where else ''}"
        f" ORDER BY i.created_at DESC, i.id ASC LIMIT {arg(limit)}"
    )
    rows: list[asyncpg.Record] = await pool.fetch(sql, *args)
    return rows


async def current_status(pool: asyncpg.Pool | asyncpg.Connection, instance_id: UUID) -> str | None:
    status: str | None = await pool.fetchval(
        "SELECT status FROM instances WHERE id = $1", instance_id
    )
    return status


_FINAL = "('COMPLETED', 'FAILED', 'TIMED_OUT', 'CANCELLED', 'SKIPPED')"
"""Final activity statuses, spelt as the `activities_open` index's predicate spells them."""

UNPLACED = 2**31 - 1
"""The position of a row without one (carried over from the single-document layout): it
sorts after every positioned row."""


async def open_activities(
    conn: asyncpg.Pool | asyncpg.Connection, instance_id: UUID
) -> dict[str, Any]:
    """The activities of the instance not in a final status, by step: their state documents."""
    rows = await conn.fetch(
        f"SELECT step, state FROM activities WHERE instance_id = $1 AND status NOT IN {_FINAL}",  # noqa: S608 (constants only)
        instance_id,
    )
    return {r["step"]: r["state"] for r in rows}


async def status_and_activities(
    pool: asyncpg.Pool, instance_id: UUID
) -> tuple[str, dict[str, Any]] | None:
    """The instance's status and its open activities (by step), or None."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        status: str | None = await conn.fetchval(
            "SELECT status FROM instances WHERE id = $1", instance_id
        )
        if status is None:
            return None
        return status, await open_activities(conn, instance_id)


async def activity_page(
    conn: asyncpg.Pool | asyncpg.Connection,
    instance_id: UUID,
    *,
    statuses: Sequence[str] = (),
    after: tuple[int, str] | None = None,
    limit: int,
) -> list[asyncpg.Record]:
    """Activities in definition order (rows without a position last, by step), from after the
    keyset `after` (position, step); each with `step`, `position` (never null here) and
    `state`."""
    args: list[Any] = [instance_id]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    where = ["instance_id = $1"]
    if statuses:
        where.append(f"status = ANY({arg(list(statuses))}::text[])")
    key = f"coalesce(position, {UNPLACED})"
    if after is not None:
        # bigint: a cursor may name any position of 10 digits, past every integer column.
        where.append(f"({key}, step) > ({arg(after[0])}::bigint, {arg(after[1])}::text)")
    # Only placeholders and constants are interpolated; every value travels as a parameter.
    sql = (
        f"SELECT step, {key} AS position, state FROM activities"  # noqa: S608 (placeholders only)
        f" WHERE {' AND '.join(where)} ORDER BY {key}, step LIMIT {arg(limit)}"
    )
    rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
    return rows


async def activity_count(conn: asyncpg.Pool | asyncpg.Connection, instance_id: UUID) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM activities WHERE instance_id = $1", instance_id
    )
    return count


async def outputs(
    conn: asyncpg.Pool | asyncpg.Connection, instance_id: UUID, limit: int
) -> tuple[dict[str, Any], bool]:
    """Each finished (completed or skipped) activity's output, by step: the first `limit` in
    definition order, and whether there are more."""
    rows = await conn.fetch(
        "SELECT step, state->'output' AS output FROM activities"  # noqa: S608 (constants only)
        f" WHERE instance_id = $1 AND status IN ('COMPLETED', 'SKIPPED')"
        f" ORDER BY coalesce(position, {UNPLACED}), step LIMIT $2",
        instance_id,
        limit + 1,
    )
    return {r["step"]: r["output"] for r in rows[:limit]}, len(rows) > limit


async def history(
    pool: asyncpg.Pool, instance_id: UUID, *, after: int, limit: int
) -> list[asyncpg.Record] | None:
    """Events in order, from after the event id `after` (0: the first), at most `limit`; None
    when there is no such instance."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        if not await conn.fetchval("SELECT 1 FROM instances WHERE id = $1", instance_id):
            return None
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT id, at, kind, step, attempt, reason, data FROM history"
            " WHERE instance_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            instance_id,
            after,
            limit,
        )
        return rows


# Every INTERRUPTED activity of a FLAGGED instance, one row each, keyed by when it was flagged.
# An activity without a flag (written by an older engine) sorts by the row's last change.
_FLAGGED = """
    SELECT i.id AS instance_id, i.definition, i.version, a.step, a.state AS activity,
           coalesce((a.state->'flag'->>'flagged_at')::timestamptz, a.updated_at) AS flagged_at
    FROM activities a JOIN instances i ON i.id = a.instance_id
    WHERE i.status = 'FLAGGED' AND a.status = 'INTERRUPTED'
"""


async def flag_page(
    pool: asyncpg.Pool,
    *,
    definition: str | None,
    after: tuple[datetime, UUID, str] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Oldest flag first; ties by instance id, then step (the keyset the cursor holds)."""
    where: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    inner = _FLAGGED
    if definition is not None:
        inner += f" AND i.definition = {arg(definition)}"
    if after is not None:
        key = f"({arg(after[0])}::timestamptz, {arg(after[1])}::uuid, {arg(after[2])}::text)"
        where.append(f"(f.flagged_at, f.instance_id, f.step) > {key}")
    # Only placeholders are interpolated; every value travels as a parameter.
    sql = (
        f"SELECT * FROM ({inner}) f"  # noqa: S608 (placeholders only)
        f"{' WHERE ' + ' AND '.join(where) if where else ''}"
        f" ORDER BY f.flagged_at, f.instance_id, f.step LIMIT {arg(limit)}"
    )
    rows: list[asyncpg.Record] = await pool.fetch(sql, *args)
    return rows
