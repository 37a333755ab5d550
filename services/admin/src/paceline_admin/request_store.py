"""SQL for operators' requests (cancels and resolves): recorded by the admin API in the same
transaction as the command they cause, one per target under a primary key, so that of two at
the same moment exactly one is recorded (the other waits for its commit, then sees it)."""

from __future__ import annotations

from uuid import UUID

import asyncpg


async def cancel_target(pool: asyncpg.Pool, instance_id: UUID) -> asyncpg.Record | None:
    """The instance's status, traceparent, end and the engine's record of a cancel (`engine_
    cancel`), with the first cancel request (`by`, `reason`, `requested_at`: null when none);
    None when there is no such instance."""
    row: asyncpg.Record | None = await pool.fetchrow(
        """
        SELECT i.status, i.traceparent, i.state->'cancel' AS engine_cancel,
               i.state->'error' AS error, (i.state->>'finished_at')::timestamptz AS finished_at,
               c.by, c.reason, c.requested_at
        FROM instances i LEFT JOIN cancel_requests c ON c.instance_id = i.id
        WHERE i.id = $1
        """,
        instance_id,
    )
    return row


async def insert_cancel(
    conn: asyncpg.Connection, instance_id: UUID, *, by: str, reason: str
) -> asyncpg.Record | None:
    """The new request (`by`, `reason`, `requested_at`), or None when there already is one (a
    concurrent first request waits here for the other's transaction)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        "INSERT INTO cancel_requests (instance_id, by, reason) VALUES ($1, $2, $3)"
        " ON CONFLICT (instance_id) DO NOTHING RETURNING by, reason, requested_at",
        instance_id,
        by,
        reason,
    )
    return row


async def cancel_request(
    conn: asyncpg.Pool | asyncpg.Connection, instance_id: UUID
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT by, reason, requested_at FROM cancel_requests WHERE instance_id = $1",
        instance_id,
    )
    return row


async def resolve_target(pool: asyncpg.Pool, instance_id: UUID, step: str) -> asyncpg.Record | None:
    """The instance's status and traceparent, the state of its activity `step` (null when no
    such activity was dispatched) and who asked for its cancel (null when nobody did); None
    when there is no such instance."""
    row: asyncpg.Record | None = await pool.fetchrow(
        """
        SELECT i.status, i.traceparent, a.state AS activity,
               c.by AS cancel_by, c.requested_at AS cancel_requested_at
        FROM instances i LEFT JOIN cancel_requests c ON c.instance_id = i.id
        LEFT JOIN activities a ON a.instance_id = i.id AND a.step = $2
        WHERE i.id = $1
        """,
        instance_id,
        step,
    )
    return row


_RESOLVE = "SELECT attempt, action, by, forced, requested_at FROM resolve_requests"


async def resolve_request(
    conn: asyncpg.Pool | asyncpg.Connection, instance_id: UUID, step: str, attempt: int
) -> asyncpg.Record | None:
    """The decision recorded on this attempt of the activity, if any."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"{_RESOLVE} WHERE instance_id = $1 AND step = $2 AND attempt = $3",
        instance_id,
        step,
        attempt,
    )
    return row


async def latest_resolve(pool: asyncpg.Pool, instance_id: UUID, step: str) -> asyncpg.Record | None:
    """The decision recorded on the activity's latest flagged attempt, if any."""
    row: asyncpg.Record | None = await pool.fetchrow(
        f"{_RESOLVE} WHERE instance_id = $1 AND step = $2 ORDER BY attempt DESC LIMIT 1",
        instance_id,
        step,
    )
    return row


async def insert_resolve(
    conn: asyncpg.Connection,
    instance_id: UUID,
    step: str,
    attempt: int,
    *,
    action: str,
    by: str,
    forced: bool,
) -> bool:
    """Whether this decision was recorded: False when the attempt already has one (a
    concurrent decision waits here for the other's transaction)."""
    inserted = await conn.fetchval(
        "INSERT INTO resolve_requests (instance_id, step, attempt, action, by, forced)"
        " VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (instance_id, step, attempt) DO NOTHING RETURNING true",
        instance_id,
        step,
        attempt,
        action,
        by,
        forced,
    )
    return bool(inserted)
