"""Schedules fire through scheduler crashes, races and outages (issue 11), with real processes.

What every test checks in the end is the same: the fire ledger is complete (every nominal time
from the first to the last has exactly one decision), and the instances match it (one per
STARTED row, carrying that row's nominal time as `trigger.nominal_at`, none for anything else).
The ledger and the instances are read from the database: that is the record the API shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from stack_env import StackEnv

from failover.conftest import StackFactory, unique_name, wait_settled
from integration.harness import wait_for

pytestmark = pytest.mark.asyncio

FINAL = ("COMPLETED", "FAILED", "CANCELLED")


@contextlib.asynccontextmanager
async def database(api: httpx.AsyncClient) -> AsyncIterator[asyncpg.Connection]:
    env: StackEnv = api.env  # type: ignore[attr-defined]
    conn = await asyncpg.connect(env.database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def define(api: httpx.AsyncClient, steps: list[dict] | None = None) -> str:
    name = unique_name("sched")
    body = {"name": name, "steps": steps or [{"id": "n", "type": "noop"}]}
    created = await api.post("/v1/definitions", json=body)
    assert created.status_code == 201, created.text
    return name


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def create_schedule(
    api: httpx.AsyncClient,
    definition: str,
    *,
    spec: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
) -> str:
    schedule_id = unique_name("s")
    created = await api.post(
        "/v1/schedules",
        json={
            "id": schedule_id,
            "definition": definition,
            "spec": spec or {"interval": "1s"},
            "policy": policy or {},
        },
    )
    assert created.status_code == 201, created.text
    return schedule_id


async def ledger(conn: asyncpg.Connection, schedule_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT nominal_at, last_nominal_at, count, outcome, how, instance_id, due_at,"
        " decided_at, started_at, reason FROM schedule_fires WHERE schedule_id = $1"
        " ORDER BY nominal_at",
        schedule_id,
    )
    return [dict(r) for r in rows]


async def instances_of(conn: asyncpg.Connection, schedule_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, status, started_how, trigger::text AS trigger,"
        " (state->>'started_at')::timestamptz AS started_at,"
        " (state->>'finished_at')::timestamptz AS finished_at, created_at"
        " FROM instances WHERE started_by = $1 ORDER BY created_at",
        f"schedule:{schedule_id}",
    )
    return [{**dict(r), "trigger": json.loads(r["trigger"])} for r in rows]


def assert_ledger_complete(rows: list[dict[str, Any]], every: timedelta) -> None:
    """One decision per nominal time, every nominal time from the first to the last: the
    rows (a range row covering `count` of them) leave no gap."""
    assert rows, "the ledger is empty"
    expected = rows[0]["nominal_at"]
    for row in rows:
        assert row["nominal_at"] == expected, f"a gap in the ledger before {row}"
        last = row["last_nominal_at"] or row["nominal_at"]
        expected = last + every


def assert_instances_match(rows: list[dict[str, Any]], instances: list[dict[str, Any]]) -> None:
    """Exactly one instance per STARTED row, with the row's nominal time; no other."""
    started = {r["instance_id"]: r["nominal_at"] for r in rows if r["outcome"] == "STARTED"}
    assert all(i is not None for i in started), "a STARTED row without its instance"
    by_id = {i["id"]: i for i in instances}
    assert set(by_id) == set(started), (
        f"instances {len(by_id)} vs STARTED rows {len(started)}: "
        f"extra {set(by_id) - set(started)}, missing {set(started) - set(by_id)}"
    )
    for instance_id, nominal in started.items():
        trigger = by_id[instance_id]["trigger"]
        assert trigger["kind"] == "schedule", trigger
        assert trigger["nominal_at"] == iso(nominal), (trigger, nominal)
        assert by_id[instance_id]["started_how"] == "schedule"
    nominal = [i["trigger"]["nominal_at"] for i in instances]
    assert len(nominal) == len(set(nominal)), "two instances for one nominal time"


async def all_ended(conn: asyncpg.Connection, schedule_id: str, timeout: float = 60) -> None:
    async def ended() -> bool:
        instances = await instances_of(conn, schedule_id)
        return all(i["status"] in FINAL for i in instances)

    await wait_for(ended, timeout, f"every instance of {schedule_id} to end")


async def until_ended(conn: asyncpg.Connection, schedule_id: str, end_at: datetime) -> None:
    """Wait past the schedule's `end_at` until its fires are all decided (no due time left)."""

    async def done() -> bool:
        row = await conn.fetchrow(
            "SELECT next_due_at, buffered FROM schedules WHERE id = $1", schedule_id
        )
        return row["next_due_at"] is None and row["buffered"] == 0

    await asyncio.sleep(max(0.0, (end_at - datetime.now(UTC)).total_seconds()))
    await wait_for(done, 30, f"schedule {schedule_id} to have fired to its end")


def ends_in(seconds: float) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)


async def test_schedulers_killed_at_fires_leave_one_instance_per_nominal_time(
    make_stack: StackFactory,
) -> None:
    """Two schedulers race on ten every-second schedules while one or the other is SIGKILLed
    every 0.7 s (in the middle of a round's transaction, some of the time): no fire is doubled,
    none is lost, no instance is left without its ledger row."""
    stack, api = await make_stack(workers=[{}])
    stack.add("scheduler")
    definition = await define(api)
    end_at = ends_in(9)
    spec = {"interval": "1s", "end_at": iso(end_at)}
    ids = [
        await create_schedule(api, definition, spec=spec, policy={"overlap": "allow"})
        for _ in range(10)
    ]
    names = [s.name for s in stack.of_kind("scheduler")]
    kills = 0
    while datetime.now(UTC) < end_at - timedelta(seconds=1):
        victim = names[kills % len(names)]
        stack.kill(victim)
        kills += 1
        await asyncio.sleep(0.3)
        stack.start(victim)
        await asyncio.sleep(0.4)
    assert kills >= 8
    async with database(api) as conn:
        for schedule_id in ids:
            await until_ended(conn, schedule_id, end_at)
            await all_ended(conn, schedule_id)
            rows = await ledger(conn, schedule_id)
            assert_ledger_complete(rows, timedelta(seconds=1))
            # Every fire was on time or nearly: a scheduler was always back within a second.
            assert {r["outcome"] for r in rows} == {"STARTED"}, rows
            instances = await instances_of(conn, schedule_id)
            assert_instances_match(rows, instances)
            assert {i["status"] for i in instances} == {"COMPLETED"}


async def test_every_scheduler_down_then_catch_up_per_policy(make_stack: StackFactory) -> None:
    """The only scheduler is SIGKILLed for 7 s while three every-second schedules should fire;
    a fire more than 1 s late counts as missed here (`PACELINE_SCHEDULE_MISSED_AFTER_S=1`).
    The first round after the restart decides the missed fires by each policy: `skip` runs
    none, `latest` the most recent (none when a fire was on time in that round), `all` the
    three most recent (`max_catchup: 3`), oldest first."""
    stack, api = await make_stack(workers=[{}], extra_env={"PACELINE_SCHEDULE_MISSED_AFTER_S": "1"})
    definition = await define(api)
    end_at = ends_in(16)
    spec = {"interval": "1s", "end_at": iso(end_at)}
    policies = {
        "skip": {"catchup": "skip", "overlap": "allow"},
        "latest": {"catchup": "latest", "overlap": "allow"},
        "all": {"catchup": "all", "max_catchup": 3, "overlap": "allow"},
    }
    ids = {
        name: await create_schedule(api, definition, spec=spec, policy=policy)
        for name, policy in policies.items()
    }
    await asyncio.sleep(2.5)
    (scheduler,) = stack.of_kind("scheduler")
    stack.kill(scheduler.name)
    down_at = datetime.now(UTC)
    await asyncio.sleep(7)
    stack.start(scheduler.name)
    async with database(api) as conn:
        for name, schedule_id in ids.items():
            await until_ended(conn, schedule_id, end_at)
            await all_ended(conn, schedule_id)
            rows = await ledger(conn, schedule_id)
            assert_ledger_complete(rows, timedelta(seconds=1))
            assert_instances_match(rows, await instances_of(conn, schedule_id))
            late = [r for r in rows if r["decided_at"] > down_at]
            first_round = [r for r in late if r["decided_at"] == late[0]["decided_at"]]
            missed = [r for r in first_round if r["how"] == "catchup"]
            assert len(missed) >= 4, f"{name}: the outage missed too few fires: {first_round}"
            ran = [r for r in missed if r["outcome"] == "STARTED"]
            skipped = [r for r in missed if r["outcome"] == "SKIPPED_MISSED"]
            assert len(ran) + len(skipped) == len(missed), missed
            on_time = any(r["how"] == "schedule" for r in first_round)
            if name == "skip":
                assert ran == [], ran
            elif name == "latest":
                assert ran == ([] if on_time else [missed[-1]]), first_round
            else:
                assert ran == missed[-3:], first_round
            for row in skipped:
                assert "missed" in row["reason"], row


async def test_overlap_policies_with_a_slow_process(make_stack: StackFactory) -> None:
    """Every-second schedules of a process that takes 2.5 s, one per overlap policy: `skip`
    never runs two at once and records the fires it skipped; `buffer_one` holds one fire and
    starts it when the run ended; `buffer_all` holds every fire and runs them one after the
    other; `allow` runs them side by side; `cancel_previous` cancels the running one and starts
    the newest fire when it ended."""
    _, api = await make_stack(workers=[{"PACELINE_WORKER_CONCURRENCY": "16"}])
    definition = await define(api, [{"id": "nap", "type": "sleep", "with": {"seconds": 2.5}}])
    end_at = ends_in(8)
    spec = {"interval": "1s", "end_at": iso(end_at)}
    overlaps = ["skip", "buffer_one", "buffer_all", "allow", "cancel_previous"]
    ids = {
        o: await create_schedule(api, definition, spec=spec, policy={"overlap": o})
        for o in overlaps
    }
    async with database(api) as conn:
        results = {}
        for overlap, schedule_id in ids.items():
            await until_ended(conn, schedule_id, end_at)
            await all_ended(conn, schedule_id, timeout=120)
            rows = await ledger(conn, schedule_id)
            assert_ledger_complete(rows, timedelta(seconds=1))
            instances = await instances_of(conn, schedule_id)
            assert_instances_match(rows, instances)
            results[overlap] = (rows, instances)

    def outcomes(overlap: str) -> list[str]:
        return [r["outcome"] for r in results[overlap][0]]

    def most_at_once(overlap: str) -> int:
        """The most instances running at once: from when the scheduler started running each
        (not its row's `created_at`, the start of the transaction that wrote it, which may
        begin before the run it waits for has ended) to when it ended."""
        spans = [(i["started_at"], i["finished_at"]) for i in results[overlap][1]]
        return max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)

    assert "SKIPPED_OVERLAP" in outcomes("skip")
    assert most_at_once("skip") == 1
    assert {r["status"] for r in results["skip"][1]} == {"COMPLETED"}

    one = results["buffer_one"][0]
    held_then_started = [r for r in one if r["outcome"] == "STARTED" and "held" in r["reason"]]
    assert held_then_started, one
    assert "SKIPPED_OVERLAP" in outcomes("buffer_one")
    assert most_at_once("buffer_one") == 1

    assert set(outcomes("buffer_all")) == {"STARTED"}, outcomes("buffer_all")
    assert most_at_once("buffer_all") == 1

    assert set(outcomes("allow")) == {"STARTED"}
    assert most_at_once("allow") >= 2

    cancelled = [i for i in results["cancel_previous"][1] if i["status"] == "CANCELLED"]
    assert cancelled, results["cancel_previous"][1]
    assert most_at_once("cancel_previous") == 1
    assert results["cancel_previous"][1][-1]["status"] == "COMPLETED"


async def test_pause_and_resume_with_each_catch_up_answer(make_stack: StackFactory) -> None:
    """Three every-second schedules paused for 4 s, resumed with `skip`, `latest` and `all`:
    the fires due while paused are SKIPPED_PAUSED, but for what the answer runs (none, the
    most recent, each)."""
    _, api = await make_stack(workers=[{}])
    definition = await define(api)
    ids = {
        answer: await create_schedule(
            api, definition, policy={"overlap": "allow", "max_catchup": 10}
        )
        for answer in ("skip", "latest", "all")
    }
    await asyncio.sleep(1.5)
    paused_at = {}
    for schedule_id in ids.values():
        paused = await api.post(f"/v1/schedules/{schedule_id}/pause", json={"note": "test"})
        assert paused.status_code == 200, paused.text
        assert paused.json()["paused"] is True
        paused_at[schedule_id] = datetime.now(UTC)
    await asyncio.sleep(4)
    for answer, schedule_id in ids.items():
        resumed = await api.post(f"/v1/schedules/{schedule_id}/resume", json={"catchup": answer})
        assert resumed.status_code == 200, resumed.text
    await asyncio.sleep(2)
    for schedule_id in ids.values():
        assert (await api.post(f"/v1/schedules/{schedule_id}/pause", json={})).status_code == 200
    async with database(api) as conn:
        for answer, schedule_id in ids.items():
            await all_ended(conn, schedule_id)
            rows = await ledger(conn, schedule_id)
            assert_ledger_complete(rows, timedelta(seconds=1))
            assert_instances_match(rows, await instances_of(conn, schedule_id))
            during = [r for r in rows if r["how"] == "resume"]
            assert len(during) >= 3, rows
            ran = [r for r in during if r["outcome"] == "STARTED"]
            rest = [r for r in during if r["outcome"] != "STARTED"]
            assert {r["outcome"] for r in rest} <= {"SKIPPED_PAUSED"}, rest
            if answer == "skip":
                assert ran == []
            elif answer == "latest":
                assert ran == [during[-1]]
            else:
                assert ran == during


async def test_backfill_twice_starts_each_nominal_time_once(make_stack: StackFactory) -> None:
    """A backfill of five past days of a daily schedule starts five instances, which run and
    see their schedule and nominal time as `trigger`; the same backfill again starts none, and
    its dry run says there is nothing to start."""
    _, api = await make_stack(workers=[{}])
    seen = {"schedule": "${trigger.schedule}", "nominal_at": "${trigger.nominal_at}"}
    definition = await define(api, [{"id": "n", "type": "noop", "with": seen}])
    schedule_id = await create_schedule(api, definition, spec={"cron": "0 3 * * *"})
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    window = {"from": iso(today - timedelta(days=5)), "until": iso(today)}
    first = await api.post(
        f"/v1/schedules/{schedule_id}/backfill", json={**window, "overlap": "allow"}
    )
    assert first.status_code == 200, first.text
    started = [f for f in first.json()["fires"] if f["outcome"] == "STARTED"]
    assert len(started) == 5, first.json()
    again = await api.post(
        f"/v1/schedules/{schedule_id}/backfill", json={**window, "overlap": "allow"}
    )
    assert again.status_code == 200, again.text
    assert [f for f in again.json()["fires"] if f["outcome"] == "STARTED"] == []
    dry = await api.post(f"/v1/schedules/{schedule_id}/backfill", json={**window, "dry_run": True})
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] is True
    for fire in started:
        done = await wait_settled(api, fire["instance_id"], "COMPLETED")
        assert done["started_how"] == "schedule"
        assert done["started_by"] == f"schedule:{schedule_id}"
        assert done["outputs"]["n"] == {"schedule": schedule_id, "nominal_at": fire["nominal_at"]}
    async with database(api) as conn:
        rows = await ledger(conn, schedule_id)
        assert len(rows) == 5
        assert_instances_match(rows, await instances_of(conn, schedule_id))
