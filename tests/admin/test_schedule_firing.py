"""What a fire writes (paceline_starts.firing), run on the admin tests' database at chosen
clocks: the scheduler's loop calls the same functions with the database's `now`. The
schedules are arranged with the API and their rows, so each case is exact; tests/failover/
test_schedules.py runs the loop itself, with real schedulers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from admin_support import create_definition, unique

from paceline_engine.schedule_spec import FireOutcome
from paceline_starts import firing, schedule_store


async def _schedule(client: httpx.AsyncClient, pool: asyncpg.Pool, policy: dict[str, Any]) -> str:
    name = unique("fire")
    await create_definition(client, name)
    schedule_id = unique("s")
    body = {
        "id": schedule_id,
        "definition": name,
        "inputs": {"host": "h1"},
        "spec": {"interval": "1s"},
        "policy": policy,
    }
    created = await client.post("/v1/schedules", json=body)
    assert created.status_code == 201, created.text
    return schedule_id


async def _rows(pool: asyncpg.Pool, schedule_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT nominal_at, last_nominal_at, count, outcome, how, instance_id"
        " FROM schedule_fires WHERE schedule_id = $1 ORDER BY nominal_at",
        schedule_id,
    )
    return rows


async def _fire_due(pool: asyncpg.Pool, schedule_id: str, now: datetime) -> firing.Written:
    async with pool.acquire() as conn, conn.transaction():
        schedule = await schedule_store.lock(conn, schedule_id)
        assert schedule is not None
        return await firing.fire_due(conn, schedule, now)


@pytest.fixture(autouse=True)
async def _no_commands_left(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """No relay runs in these tests: the start commands the fires staged are removed, so
    that tests counting the outbox see only their own."""
    before = {r["id"] for r in await pool.fetch("SELECT id FROM outbox")}
    yield
    after = {r["id"] for r in await pool.fetch("SELECT id FROM outbox")}
    await pool.execute("DELETE FROM outbox WHERE id = ANY($1::uuid[])", list(after - before))


def _second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


async def test_a_resume_decides_the_pause_and_leaves_later_fires_to_the_usual_rules(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """Paused for 10 s, resumed with `skip`, and no scheduler got to it for 5 s more: the
    fires of the pause are SKIPPED_PAUSED, the 5 due after the resume run as on time."""
    schedule_id = await _schedule(client, pool, {"overlap": "allow"})
    base = _second(datetime.now(UTC)) + timedelta(hours=1)
    await pool.execute(
        "UPDATE schedules SET last_nominal_at = $2, paused = false, paused_at = $3,"
        " resume_catchup = 'skip', resumed_at = $4, next_due_at = $4 WHERE id = $1",
        schedule_id,
        base,
        base + timedelta(milliseconds=500),
        base + timedelta(seconds=10, milliseconds=500),
    )
    await _fire_due(pool, schedule_id, base + timedelta(seconds=15, milliseconds=500))
    rows = await _rows(pool, schedule_id)
    assert [r["nominal_at"] for r in rows] == [base + timedelta(seconds=s) for s in range(1, 16)]
    paused, after = rows[:10], rows[10:]
    assert {(r["outcome"], r["how"]) for r in paused} == {("SKIPPED_PAUSED", "resume")}
    assert {(r["outcome"], r["how"]) for r in after} == {("STARTED", "schedule")}
    stored = await pool.fetchrow(
        "SELECT resume_catchup, resumed_at, paused_at, last_nominal_at FROM schedules"
        " WHERE id = $1",
        schedule_id,
    )
    assert (stored["resume_catchup"], stored["resumed_at"], stored["paused_at"]) == (None,) * 3
    assert stored["last_nominal_at"] == base + timedelta(seconds=15)


async def test_a_backfill_of_a_ranges_first_time_moves_the_range_on(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """A 300 s outage of an every-second schedule (`catchup: skip`) leaves a range row for the
    oldest missed fires; backfilling its first nominal time starts it, and the range then
    begins one fire later, one fewer: every nominal time is still covered once."""
    schedule_id = await _schedule(client, pool, {"overlap": "allow", "catchup": "skip"})
    base = _second(datetime.now(UTC)) - timedelta(hours=2)
    await pool.execute(
        "UPDATE schedules SET last_nominal_at = $2, next_due_at = $2 WHERE id = $1",
        schedule_id,
        base,
    )
    await _fire_due(pool, schedule_id, base + timedelta(seconds=300, milliseconds=500))
    before = await _rows(pool, schedule_id)
    ranges = [r for r in before if r["last_nominal_at"] is not None]
    assert len(ranges) == 1, before
    first, count = ranges[0]["nominal_at"], ranges[0]["count"]
    assert first == base + timedelta(seconds=1) and count > 1

    async with pool.acquire() as conn, conn.transaction():
        schedule = await schedule_store.lock(conn, schedule_id)
        assert schedule is not None
        written = await firing.backfill(conn, schedule, [first], await schedule_store.now(conn))
    assert [f.outcome for f in written.fires] == [FireOutcome.STARTED]

    after = await _rows(pool, schedule_id)
    assert after[0]["nominal_at"] == first
    assert (after[0]["outcome"], after[0]["last_nominal_at"], after[0]["count"]) == (
        "STARTED",
        None,
        None,
    )
    moved = after[1]
    assert moved["nominal_at"] == first + timedelta(seconds=1)
    assert (moved["last_nominal_at"], moved["count"]) == (ranges[0]["last_nominal_at"], count - 1)
    covered = sum(r["count"] or 1 for r in after)
    assert covered == sum(r["count"] or 1 for r in before) == 300

    # A time inside the range: its outcome is the range's, and a backfill splits the range
    # around it; every nominal time is still covered by exactly one row.
    inside = first + timedelta(seconds=50)
    async with pool.acquire() as conn, conn.transaction():
        assert await schedule_store.decided(conn, schedule_id, [inside]) == {
            inside: "SKIPPED_MISSED"
        }
        schedule = await schedule_store.lock(conn, schedule_id)
        assert schedule is not None
        written = await firing.backfill(conn, schedule, [inside], await schedule_store.now(conn))
    assert next(f.reason for f in written.fires).startswith("backfill (was SKIPPED_MISSED)")
    split = await _rows(pool, schedule_id)
    assert sum(r["count"] or 1 for r in split) == 300
    cover: dict[datetime, int] = {}
    for r in split:
        at, last = r["nominal_at"], r["last_nominal_at"] or r["nominal_at"]
        while at <= last:
            cover[at] = cover.get(at, 0) + 1
            at += timedelta(seconds=1)
    assert set(cover.values()) == {1} and len(cover) == 300
    assert [r["outcome"] for r in split if r["nominal_at"] == inside] == ["STARTED"]
