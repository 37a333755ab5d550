"""The `triggers` scenario of `make bench` (issue 11): schedules firing, and a burst of events.

Phase 1: --trigger-schedules (default 1,000) schedules, each firing every second for
--trigger-seconds (default 60; `spec.end_at` ends them), of a one-`noop` definition, with
overlap `allow` (every fire starts). Fire lateness is the ledger's: the moment a scheduler
created the fire's instance minus its due instant (`lateness_ms` of each STARTED row), p50 and
p99; `fires` and `fires_expected` (schedules x seconds) say whether any were lost, and
`fires_started_per_s` is what the stack sustained. The instances are then run to their end
(`instances_per_s`, from the first fire to the last instance's end): a stack that cannot run
1,000 processes a second on this machine falls behind on running them, not on firing them.

Phase 2: --trigger-events (default 10,000) events posted over the API, IN_FLIGHT at a time, to
a definition subscribed to them (one instance per event): events_accepted_per_s is events
over the time from the first post to the last 202 (each answer comes after the event, its
deduplication and its instance are committed), p50/p99 of the answers, and how many
instances the events started (one each, or the run is an error).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from bench_common import FINAL, IN_FLIGHT, define, percentile, running_stack, say

START_BATCH = 32
"""Schedules created at once (each is one API call)."""


async def triggers(schedules: int, seconds: int, events: int) -> dict[str, Any]:
    async with running_stack(workers=2, log_name="triggers") as (env, _, api):
        name = f"bench-tick-{uuid.uuid4().hex[:6]}"
        await define(api, {"name": name, "steps": [{"id": "tick", "type": "noop"}]})
        conn = await asyncpg.connect(env.database_url)
        try:
            fired = await _schedules(api, conn, name, schedules, seconds)
            posted = await _events(api, conn, events)
        finally:
            await conn.close()
    return {"scenario": "triggers", **fired, **posted}


async def _schedules(
    api: Any, conn: asyncpg.Connection, name: str, count: int, seconds: int
) -> dict[str, Any]:
    # Creating 1,000 schedules takes a while: they all begin at one whole second after it.
    begin = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=max(10, count // 50))
    end = begin + timedelta(seconds=seconds - 1)  # start_at <= nominal <= end_at: `seconds` fires
    spec = {"interval": "1s", "start_at": _iso(begin), "end_at": _iso(end)}
    run = uuid.uuid4().hex[:6]
    say(f"triggers: creating {count} schedules, every second from {begin} for {seconds}s")

    async def create(n: int) -> None:
        body = {
            "id": f"bench-{run}-{n}",
            "definition": name,
            "spec": spec,
            "policy": {"overlap": "allow"},
        }
        answer = await api.call("POST", "/v1/schedules", json=body)
        if answer.status_code != 201:
            raise RuntimeError(f"schedule refused: {answer.status_code} {answer.text[:300]}")

    for first in range(0, count, START_BATCH):
        await asyncio.gather(*(create(n) for n in range(first, min(count, first + START_BATCH))))
    if datetime.now(UTC) > begin:
        say("  warning: the schedules were created after their first fire time")
    await asyncio.sleep((end - datetime.now(UTC)).total_seconds() + 5)
    prefix = f"bench-{run}-%"
    await _until_none(
        conn, "SELECT count(*) FROM schedules WHERE id LIKE $1 AND next_due_at IS NOT NULL", prefix
    )
    rows = await conn.fetch(
        "SELECT outcome, lateness_ms, started_at, instance_id FROM schedule_fires"
        " WHERE schedule_id LIKE $1",
        prefix,
    )
    started = [r for r in rows if r["outcome"] == "STARTED"]
    lateness = [float(r["lateness_ms"]) for r in started]
    first_start = min(r["started_at"] for r in started)
    last_start = max(r["started_at"] for r in started)
    ids = [r["instance_id"] for r in started]
    say(f"  {len(started)} fires started; running their instances to the end")
    await _until_none(
        conn,
        "SELECT count(*) FROM instances WHERE id = ANY($1::uuid[]) AND NOT status = ANY($2)",
        ids,
        list(FINAL),
    )
    last_end = await conn.fetchval(
        "SELECT max(updated_at) FROM instances WHERE id = ANY($1::uuid[])", ids
    )
    return {
        "schedules": count,
        "seconds": seconds,
        "fires_expected": count * seconds,
        "fires": len(rows),
        "fires_started": len(started),
        "fire_lateness_p50_ms": round(percentile(lateness, 50), 1),
        "fire_lateness_p99_ms": round(percentile(lateness, 99), 1),
        "fire_lateness_max_ms": round(max(lateness), 1),
        "fires_started_per_s": round(len(started) / (last_start - first_start).total_seconds(), 1),
        "instances_per_s": round(len(ids) / (last_end - first_start).total_seconds(), 1),
    }


async def _events(api: Any, conn: asyncpg.Connection, count: int) -> dict[str, Any]:
    name = f"bench-ping-{uuid.uuid4().hex[:6]}"
    kind = f"bench.{name}"
    await define(
        api,
        {
            "name": name,
            "inputs": {"n": {"type": "integer"}},
            "steps": [{"id": "pong", "type": "noop"}],
            "triggers": [{"id": "on", "event": kind, "inputs": {"n": "${trigger.event.data.n}"}}],
        },
    )
    say(f"triggers: posting {count} events, {IN_FLIGHT} at a time")
    gate = asyncio.Semaphore(IN_FLIGHT)
    answered: list[float] = []

    async def post(n: int) -> None:
        key = f"bench-{uuid.uuid4().hex}"
        body = {"type": kind, "id": key, "source": "bench", "data": {"n": n}}
        async with gate:
            sent = time.monotonic()
            answer = await api.call("POST", "/v1/events", json=body)
            answered.append((time.monotonic() - sent) * 1000)
        if answer.status_code != 202 or len(answer.json()["instances"]) != 1:
            raise RuntimeError(f"event refused: {answer.status_code} {answer.text[:300]}")

    began = time.monotonic()
    await asyncio.gather(*(post(n) for n in range(count)))
    took = time.monotonic() - began
    started = await conn.fetchval(
        "SELECT count(*) FROM instances WHERE definition = $1 AND started_how = 'event'", name
    )
    return {
        "events": count,
        "events_accepted_per_s": round(count / took, 1),
        "event_answer_p50_ms": round(percentile(answered, 50), 1),
        "event_answer_p99_ms": round(percentile(answered, 99), 1),
        "event_instances": int(started),
    }


async def _until_none(conn: asyncpg.Connection, count: str, *args: Any) -> None:
    """Poll the query `count` until it counts nothing."""
    while True:
        if not await conn.fetchval(count, *args):
            return
        await asyncio.sleep(1)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
