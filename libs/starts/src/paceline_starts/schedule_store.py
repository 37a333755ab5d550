"""SQL for schedules and their fire ledger. Every statement is parameterised.

A schedule's row holds what it is (definition, inputs, spec, policy), its pause, and where its
firing stands: `last_nominal_at` (the newest nominal time decided), `next_due_at` (when a
scheduler looks next; null while paused or when no fire is to come) and `buffered` (fires held
by the overlap policy, not started yet). Whoever writes a schedule's ledger holds its row
locked (`lock`, `due`, `with_buffered`): two writers of one schedule take turns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from paceline_contracts.states import InstanceStatus
from paceline_engine.schedule_spec import Catchup, FireOutcome, SchedulePolicy, ScheduleSpec

ACTIVE = [s.value for s in InstanceStatus if not s.is_final]
"""An instance in one of these has not ended: it counts as a running run of its schedule."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule as stored."""

    id: str
    definition: str
    version: int | None
    """None: the definition's latest version at fire time."""
    inputs: dict[str, Any]
    spec: ScheduleSpec
    policy: SchedulePolicy
    paused: bool
    paused_at: datetime | None
    resume_catchup: Catchup | None
    """Set by a resume: the next plan decides the fires missed while paused with it."""
    resumed_at: datetime | None
    """Set by a resume: when (fires due by then were due while paused)."""
    last_nominal_at: datetime
    next_due_at: datetime | None
    buffered: int

    @property
    def starter(self) -> str:
        """`started_by` of its instances."""
        return f"schedule:{self.id}"


_COLUMNS = """
    id, definition, version, inputs, spec, policy, paused, paused_at, resume_catchup, resumed_at,
    last_nominal_at, next_due_at, buffered
"""


def schedule_of(row: asyncpg.Record) -> Schedule:
    catchup = row["resume_catchup"]
    return Schedule(
        id=row["id"],
        definition=row["definition"],
        version=row["version"],
        inputs=row["inputs"],
        spec=ScheduleSpec.model_validate(row["spec"]),
        policy=SchedulePolicy.model_validate(row["policy"]),
        paused=row["paused"],
        paused_at=row["paused_at"],
        resume_catchup=Catchup(catchup) if catchup else None,
        resumed_at=row["resumed_at"],
        last_nominal_at=row["last_nominal_at"],
        next_due_at=row["next_due_at"],
        buffered=row["buffered"],
    )


async def lock(conn: asyncpg.Connection, schedule_id: str) -> Schedule | None:
    """The schedule, its row locked until the transaction ends; None when there is none."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM schedules WHERE id = $1 FOR UPDATE",  # noqa: S608 (constant)
        schedule_id,
    )
    return schedule_of(row) if row is not None else None


async def due(conn: asyncpg.Connection, now: datetime, limit: int) -> list[Schedule]:
    """Schedules due at `now` (the database's clock), oldest due first, locked; those another
    scheduler holds are passed over (SKIP LOCKED), so schedulers share the work."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM schedules
        WHERE next_due_at <= $1 AND NOT paused
        ORDER BY next_due_at LIMIT $2 FOR UPDATE SKIP LOCKED
        """,  # noqa: S608 (constant)
        now,
        limit,
    )
    return [schedule_of(r) for r in rows]


async def with_buffered(conn: asyncpg.Connection, limit: int) -> list[Schedule]:
    """Schedules holding buffered fires, locked (SKIP LOCKED, as `due`)."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM schedules WHERE buffered > 0 AND NOT paused
        ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
        """,  # noqa: S608 (constant)
        limit,
    )
    return [schedule_of(r) for r in rows]


async def seconds_to_next_due(conn: asyncpg.Pool | asyncpg.Connection) -> float | None:
    """Seconds from the database's clock to the earliest due schedule (negative: overdue);
    None when nothing is due ever."""
    value = await conn.fetchval(
        "SELECT EXTRACT(EPOCH FROM min(next_due_at) - clock_timestamp())::float8"
        " FROM schedules WHERE next_due_at IS NOT NULL AND NOT paused"
    )
    return float(value) if value is not None else None


async def running(conn: asyncpg.Connection, schedule: Schedule) -> list[UUID]:
    """The schedule's instances that have not ended, oldest first (as of this transaction:
    those it started itself included)."""
    rows = await conn.fetch(
        "SELECT id FROM instances WHERE started_by = $1 AND status = ANY($2::text[])"
        " ORDER BY created_at, id",
        schedule.starter,
        ACTIVE,
    )
    return [r["id"] for r in rows]


async def decided(
    conn: asyncpg.Connection, schedule_id: str, nominal: Sequence[datetime]
) -> dict[datetime, str]:
    """The outcome recorded for each of these nominal times that the ledger covers: by its own
    row, or by a range row (missed or paused fires summarised) that holds it."""
    rows = await conn.fetch(
        """
        SELECT t, f.outcome
        FROM unnest($2::timestamptz[]) AS t
        JOIN LATERAL (
            SELECT nominal_at, last_nominal_at, outcome FROM schedule_fires
            WHERE schedule_id = $1 AND nominal_at <= t ORDER BY nominal_at DESC LIMIT 1
        ) f ON f.nominal_at = t OR f.last_nominal_at >= t
        """,
        schedule_id,
        list(nominal),
    )
    return {r["t"]: r["outcome"] for r in rows}


async def range_holding(
    conn: asyncpg.Connection, schedule_id: str, nominal_at: datetime
) -> asyncpg.Record | None:
    """The range row that holds `nominal_at` (keyed on it or on an earlier time), if any."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        SELECT nominal_at, last_nominal_at, count, outcome, how, decided_at, reason
        FROM schedule_fires
        WHERE schedule_id = $1 AND nominal_at <= $2 AND last_nominal_at >= $2
        ORDER BY nominal_at DESC LIMIT 1
        """,
        schedule_id,
        nominal_at,
    )
    return row


async def split_range(
    conn: asyncpg.Connection,
    schedule_id: str,
    held: asyncpg.Record,
    nominal_at: datetime,
    before: tuple[datetime, int | None] | None,
    after: tuple[datetime, int | None] | None,
) -> None:
    """Take `nominal_at` out of the range row `held` (a backfill records it on its own): the
    range keeps the fire times before it (`before`: the last of them and how many), and a
    range row keyed on the first fire time after it holds those after it (`after`: that time
    and how many). Each part's reason says what was taken out."""
    first, last = held["nominal_at"], held["last_nominal_at"]
    reason = f"{held['reason']}; {nominal_at.isoformat()} taken out by a backfill"
    parts = []
    if before is not None:
        parts.append((first, before[0], before[1]))
    if after is not None:
        parts.append((after[0], last, after[1]))
    await conn.execute(
        "DELETE FROM schedule_fires WHERE schedule_id = $1 AND nominal_at = $2", schedule_id, first
    )
    await conn.executemany(
        """
        INSERT INTO schedule_fires (schedule_id, nominal_at, last_nominal_at, count, outcome, how,
                                    decided_at, reason)
        VALUES ($1, $2::timestamptz, NULLIF($3::timestamptz, $2::timestamptz), $4, $5, $6, $7, $8)
        """,
        [
            (
                schedule_id,
                start,
                end,
                count,
                held["outcome"],
                held["how"],
                held["decided_at"],
                reason,
            )
            for start, end, count in parts
        ],
    )


@dataclass(frozen=True, slots=True)
class Fire:
    """One ledger row: a nominal fire time and what became of it."""

    nominal_at: datetime
    outcome: FireOutcome
    how: str
    """schedule | catchup | resume | trigger | backfill"""
    reason: str
    decided_at: datetime
    due_at: datetime | None = None
    instance_id: UUID | None = None
    started_at: datetime | None = None
    last_nominal_at: datetime | None = None
    """A range row (missed fires summarised): the newest nominal time it covers."""
    count: int | None = None
    """A range row: how many nominal times it covers (None: not counted)."""

    @property
    def lateness_ms(self) -> int | None:
        if self.started_at is None or self.due_at is None:
            return None
        return round((self.started_at - self.due_at).total_seconds() * 1000)


async def record(conn: asyncpg.Connection, schedule_id: str, fires: Sequence[Fire]) -> None:
    """Write ledger rows of one schedule (`record_many`)."""
    await record_many(conn, [(schedule_id, f) for f in fires])


async def record_many(conn: asyncpg.Connection, fires: Sequence[tuple[str, Fire]]) -> None:
    """Write ledger rows, each with its schedule's id; a row for a nominal time already
    recorded is replaced (a backfill starting a fire that was skipped, a buffered fire that
    started)."""
    if not fires:
        return
    await conn.executemany(
        """
        INSERT INTO schedule_fires (schedule_id, nominal_at, last_nominal_at, count, outcome, how,
                                    instance_id, due_at, decided_at, started_at, lateness_ms,
                                    reason)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        ON CONFLICT (schedule_id, nominal_at) DO UPDATE SET
            last_nominal_at = EXCLUDED.last_nominal_at, count = EXCLUDED.count,
            due_at = EXCLUDED.due_at,
            outcome = EXCLUDED.outcome, how = EXCLUDED.how, instance_id = EXCLUDED.instance_id,
            decided_at = EXCLUDED.decided_at, started_at = EXCLUDED.started_at,
            lateness_ms = EXCLUDED.lateness_ms, reason = EXCLUDED.reason
        """,
        [
            (
                schedule_id,
                f.nominal_at,
                f.last_nominal_at,
                f.count,
                f.outcome.value,
                f.how,
                f.instance_id,
                f.due_at,
                f.decided_at,
                f.started_at,
                f.lateness_ms,
                f.reason,
            )
            for schedule_id, f in fires
        ],
    )


async def oldest_buffered(conn: asyncpg.Connection, schedule_id: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT nominal_at, due_at, how, reason FROM schedule_fires"
        " WHERE schedule_id = $1 AND outcome = 'BUFFERED' ORDER BY nominal_at LIMIT 1",
        schedule_id,
    )
    return row


async def unbuffer_all(
    conn: asyncpg.Connection, schedule_id: str, now: datetime, reason: str
) -> int:
    """Record every buffered fire SKIPPED_OVERLAP with `reason`; how many there were."""
    done = await conn.execute(
        "UPDATE schedule_fires SET outcome = 'SKIPPED_OVERLAP', decided_at = $2, reason = $3"
        " WHERE schedule_id = $1 AND outcome = 'BUFFERED'",
        schedule_id,
        now,
        reason,
    )
    return int(done.split()[-1])


@dataclass(frozen=True, slots=True)
class Advance:
    """Where a schedule's firing stands after a plan."""

    schedule_id: str
    last_nominal_at: datetime
    next_due_at: datetime | None
    buffered: int


async def advance(conn: asyncpg.Connection, advances: Sequence[Advance]) -> None:
    """Store where each schedule's firing stands (and forget a resume's answer: it is used)."""
    if not advances:
        return
    await conn.executemany(
        """
        UPDATE schedules SET last_nominal_at = $2, next_due_at = $3, buffered = $4,
                             resume_catchup = NULL, resumed_at = NULL,
                             paused_at = CASE WHEN paused THEN paused_at END
        WHERE id = $1
        """,
        [(a.schedule_id, a.last_nominal_at, a.next_due_at, a.buffered) for a in advances],
    )


async def decided_after(
    conn: asyncpg.Connection, schedules: Sequence[Schedule]
) -> dict[str, dict[datetime, str]]:
    """For each schedule, the ledger rows after its last decided nominal time (written by a
    triggered run or a backfill, not by a plan): the outcome by nominal time."""
    rows = await conn.fetch(
        """
        SELECT f.schedule_id, f.nominal_at, f.outcome
        FROM unnest($1::text[], $2::timestamptz[]) AS s(id, last)
        JOIN schedule_fires f ON f.schedule_id = s.id AND f.nominal_at > s.last
        """,
        [s.id for s in schedules],
        [s.last_nominal_at for s in schedules],
    )
    found: dict[str, dict[datetime, str]] = {s.id: {} for s in schedules}
    for r in rows:
        found[r["schedule_id"]][r["nominal_at"]] = r["outcome"]
    return found


async def set_buffered(conn: asyncpg.Connection, schedule_id: str, buffered: int) -> None:
    await conn.execute("UPDATE schedules SET buffered = $2 WHERE id = $1", schedule_id, buffered)


async def now(conn: asyncpg.Connection) -> datetime:
    """The database's clock (every due time is compared with it, never a server's)."""
    value: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return value
