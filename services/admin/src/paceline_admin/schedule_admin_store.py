"""SQL of the schedule routes: a schedule's row (create, change, pause, resume, delete) and the
reads of its ledger and runs. Every statement is parameterised; every time written is the
database's clock (`paceline_starts.schedule_store.now`), which the scheduler compares due times
with. Firing (a trigger, a backfill) is `paceline_starts.firing`'s, with the row locked
(`schedule_store.lock`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeAlias
from uuid import UUID

import asyncpg

from paceline_engine.schedule_spec import COUNT_BUDGET, FireOutcome
from paceline_starts.schedule_store import ACTIVE

Conn: TypeAlias = asyncpg.Pool | asyncpg.Connection

COLUMNS = """
    id, definition, version, inputs, spec, policy, note, paused, paused_at, pause_note,
    resume_catchup, last_nominal_at, next_due_at, buffered, created_by, revision, created_at,
    updated_at
"""
SUMMARY = """
    id, definition, version, spec, paused, note, last_nominal_at, next_due_at, buffered,
    created_by, revision, created_at, updated_at
"""
FIRE_COLUMNS = """
    nominal_at, last_nominal_at, count, outcome, how, instance_id, due_at, decided_at, started_at,
    lateness_ms, reason
"""
RUNNING_SHOWN = 100
"""A schedule's view lists at most this many of its running instances."""


async def insert(
    conn: asyncpg.Connection,
    *,
    schedule_id: str,
    definition: str,
    version: int | None,
    inputs: dict[str, Any],
    spec: dict[str, Any],
    policy: dict[str, Any],
    note: str | None,
    paused: bool,
    now: datetime,
    next_due_at: datetime | None,
    created_by: str,
    idempotency_key: str | None,
    request_hash: str,
) -> bool:
    """Whether the schedule was created: False when its id or its Idempotency-Key is taken
    (a concurrent create with either waits here for the other's transaction)."""
    created = await conn.fetchval(
        """
        INSERT INTO schedules (id, definition, version, inputs, spec, policy, note, paused,
                               paused_at, last_nominal_at, next_due_at, created_by,
                               idempotency_key, request_hash, created_at, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $8 THEN $9::timestamptz END, $9,
                CASE WHEN $8 THEN NULL ELSE $10::timestamptz END, $11, $12, $13, $9, $9)
        ON CONFLICT DO NOTHING RETURNING true
        """,
        schedule_id,
        definition,
        version,
        inputs,
        spec,
        policy,
        note,
        paused,
        now,
        next_due_at,
        created_by,
        idempotency_key,
        request_hash,
    )
    return bool(created)


async def by_key(conn: Conn, idempotency_key: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT id, request_hash FROM schedules WHERE idempotency_key = $1", idempotency_key
    )
    return row


async def one(conn: Conn, schedule_id: str, *, lock: bool = False) -> asyncpg.Record | None:
    """Every column of the schedule (locked until the transaction ends with `lock`)."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM schedules WHERE id = $1"  # noqa: S608 (constants only)
        + (" FOR UPDATE" if lock else ""),
        schedule_id,
    )
    return row


async def page(
    conn: Conn,
    *,
    definition: str | None,
    paused: bool | None,
    after: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Schedules by id (byte order, whatever the database's collation), after `after`."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        SELECT {SUMMARY} FROM schedules
        WHERE ($1::text IS NULL OR definition = $1)
          AND ($2::boolean IS NULL OR paused = $2)
          AND ($3::text IS NULL OR id COLLATE "C" > $3::text COLLATE "C")
        ORDER BY id COLLATE "C" LIMIT $4
        """,  # noqa: S608 (constants only)
        definition,
        paused,
        after,
        limit,
    )
    return rows


async def update(
    conn: asyncpg.Connection,
    schedule_id: str,
    *,
    definition: str,
    version: int | None,
    inputs: dict[str, Any],
    spec: dict[str, Any],
    policy: dict[str, Any],
    note: str | None,
    last_nominal_at: datetime,
    next_due_at: datetime | None,
    paused_at: datetime | None,
    resume_catchup: str | None,
    now: datetime,
) -> None:
    """Store a PATCH's result (the row is locked by the caller)."""
    await conn.execute(
        """
        UPDATE schedules SET definition = $2, version = $3, inputs = $4, spec = $5, policy = $6,
                             note = $7, last_nominal_at = $8, next_due_at = $9, paused_at = $10,
                             resume_catchup = $11, revision = revision + 1, updated_at = $12
        WHERE id = $1
        """,
        schedule_id,
        definition,
        version,
        inputs,
        spec,
        policy,
        note,
        last_nominal_at,
        next_due_at,
        paused_at,
        resume_catchup,
        now,
    )


async def pause(
    conn: asyncpg.Connection, schedule_id: str, note: str | None, now: datetime
) -> None:
    """Paused from now; a schedule paused already (or resumed, with the fires of its pause
    not decided yet) keeps when its pause began. The note replaces the last one when given.
    Pausing a paused schedule with no new note changes nothing (not even its revision)."""
    await conn.execute(
        """
        UPDATE schedules SET paused = true, paused_at = coalesce(paused_at, $3),
                             pause_note = coalesce($2, CASE WHEN paused THEN pause_note END),
                             next_due_at = NULL, revision = revision + 1, updated_at = $3
        WHERE id = $1 AND (NOT paused OR ($2::text IS NOT NULL AND $2 IS DISTINCT FROM pause_note))
        """,
        schedule_id,
        note,
        now,
    )


async def resume(conn: asyncpg.Connection, schedule_id: str, catchup: str, now: datetime) -> None:
    """Due at once: the next scheduler round decides the fires of the pause with `catchup`
    (`paused_at` stays until then: it bounds them)."""
    await conn.execute(
        """
        UPDATE schedules SET paused = false, pause_note = NULL, resume_catchup = $2,
                             resumed_at = $3, next_due_at = $3, revision = revision + 1,
                             updated_at = $3
        WHERE id = $1
        """,
        schedule_id,
        catchup,
        now,
    )


async def delete(conn: Conn, schedule_id: str) -> bool:
    """Whether there was such a schedule (its ledger goes with it)."""
    deleted = await conn.fetchval("DELETE FROM schedules WHERE id = $1 RETURNING true", schedule_id)
    return bool(deleted)


async def last_fire(conn: Conn, schedule_id: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {FIRE_COLUMNS} FROM schedule_fires WHERE schedule_id = $1"  # noqa: S608
        " ORDER BY nominal_at DESC LIMIT 1",
        schedule_id,
    )
    return row


async def counts(conn: Conn, schedule_id: str) -> tuple[dict[str, int], bool]:
    """Nominal times by outcome (every outcome, 0 included; a range row counts those it holds,
    at least COUNT_BUDGET + 1 when it was not counted), and whether the counts are exact."""
    rows = await conn.fetch(
        """
        SELECT outcome,
               sum(CASE WHEN last_nominal_at IS NULL THEN 1 ELSE coalesce(count, $2) END) AS n,
               bool_or(last_nominal_at IS NOT NULL AND count IS NULL) AS uncounted
        FROM schedule_fires WHERE schedule_id = $1 GROUP BY outcome
        """,
        schedule_id,
        COUNT_BUDGET + 1,
    )
    found = {o.value: 0 for o in FireOutcome}
    exact = True
    for r in rows:
        found[r["outcome"]] = int(r["n"])
        exact = exact and not r["uncounted"]
    return found, exact


async def running(conn: Conn, schedule_id: str) -> tuple[list[UUID], int]:
    """The first RUNNING_SHOWN of the schedule's instances that have not ended (oldest first),
    and how many there are."""
    rows = await conn.fetch(
        "SELECT id, count(*) OVER () AS total FROM instances"
        " WHERE started_by = $1 AND status = ANY($2::text[])"
        " ORDER BY created_at, id LIMIT $3",
        f"schedule:{schedule_id}",
        ACTIVE,
        RUNNING_SHOWN,
    )
    return [r["id"] for r in rows], (int(rows[0]["total"]) if rows else 0)


async def fires(
    conn: Conn,
    schedule_id: str,
    *,
    since: datetime | None,
    until: datetime | None,
    outcomes: Sequence[str],
    after: datetime | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Ledger rows by nominal time, after `after`: those whose nominal times (a range's, from
    its first to its last) meet [since, until), with one of `outcomes` (none: any)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        SELECT {FIRE_COLUMNS} FROM schedule_fires
        WHERE schedule_id = $1
          AND ($2::timestamptz IS NULL OR coalesce(last_nominal_at, nominal_at) >= $2)
          AND ($3::timestamptz IS NULL OR nominal_at < $3)
          AND (cardinality($4::text[]) = 0 OR outcome = ANY($4::text[]))
          AND ($5::timestamptz IS NULL OR nominal_at > $5)
        ORDER BY nominal_at LIMIT $6
        """,  # noqa: S608 (constants only)
        schedule_id,
        since,
        until,
        list(outcomes),
        after,
        limit,
    )
    return rows


async def exists(conn: Conn, schedule_id: str) -> bool:
    return bool(await conn.fetchval("SELECT true FROM schedules WHERE id = $1", schedule_id))
