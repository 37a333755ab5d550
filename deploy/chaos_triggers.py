"""The chaos run's schedules and events (issue 11): work that starts without a start request,
through the same faults.

- Schedules: SCHEDULES every-INTERVAL schedules of `chaos-tick` (overlap `allow`, so every fire
  that is not missed starts), created before the faults and paused once they are over. A
  scheduler may die at any moment of a fire.
- Events: one `chaos.ping` event every EVENT_EVERY_S, each posted twice with the same
  Idempotency-Key (the second answer must be the first, `duplicate: true`); `chaos-ping`
  subscribes to them and starts one instance per event.

The checks (`checks`) read the process database, the record the API shows: each schedule's
ledger covers every nominal time once, one instance per STARTED row with that row's nominal
time, none other; each accepted event started exactly the instances its answer names, one;
every instance of either kind ended.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
from chaos_api import Api, ApiUnavailable

SCHEDULES = 3
INTERVAL_S = 2
EVENT_EVERY_S = 1.0
TICK = "chaos-tick"
PING = "chaos-ping"
EVENT_TYPE = "chaos.ping"
Outcome = tuple[str, bool, str, list[str]]
"""A check's name, whether it held, its detail, examples of what broke it."""


def definitions() -> list[dict[str, Any]]:
    tick = {"name": TICK, "steps": [{"id": "tick", "type": "noop"}]}
    ping = {
        "name": PING,
        "inputs": {"n": {"type": "integer"}},
        "steps": [{"id": "pong", "type": "noop"}],
        "triggers": [
            {"id": "on_ping", "event": EVENT_TYPE, "inputs": {"n": "${trigger.event.data.n}"}}
        ],
    }
    return [tick, ping]


@dataclass
class Triggers:
    api: Api
    schedules: list[str] = field(default_factory=list)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    """event_id -> its first answer"""
    duplicates_wrong: list[str] = field(default_factory=list)
    """Events whose repeat did not answer as the first did."""
    unconfirmed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    async def define(self) -> None:
        for definition in definitions():
            response = await self.api.call("POST", "/v1/definitions", json=definition)
            if response.status_code != 201:
                raise RuntimeError(f"definition refused: {response.status_code} {response.text}")
        run = uuid.uuid4().hex[:6]
        for n in range(SCHEDULES):
            schedule_id = f"chaos-{run}-{n}"
            body = {
                "id": schedule_id,
                "definition": TICK,
                "spec": {"interval": f"{INTERVAL_S}s"},
                "policy": {"overlap": "allow", "catchup": "all", "max_catchup": 1000},
            }
            response = await self.api.call(
                "POST", "/v1/schedules", json=body, headers={"Idempotency-Key": schedule_id}
            )
            if response.status_code != 201:
                raise RuntimeError(f"schedule refused: {response.status_code} {response.text}")
            self.schedules.append(schedule_id)

    async def run(self, until: float) -> None:
        """Post an event every EVENT_EVERY_S until the monotonic time `until`, then pause the
        schedules."""
        n = 0
        begin = time.monotonic()
        tasks: list[asyncio.Task[None]] = []
        while time.monotonic() < until:
            n += 1
            tasks.append(asyncio.create_task(self._post(n)))
            await asyncio.sleep(max(0.0, begin + n * EVENT_EVERY_S - time.monotonic()))
        await asyncio.gather(*tasks)
        for schedule_id in self.schedules:
            await self.api.call("POST", f"/v1/schedules/{schedule_id}/pause", json={}, patience=120)

    async def _post(self, n: int) -> None:
        key = f"ping-{uuid.uuid4().hex}"
        body = {"type": EVENT_TYPE, "id": key, "source": "chaos", "data": {"n": n}}
        answers = []
        for _ in range(2):
            try:
                response = await self.api.call(
                    "POST", "/v1/events", json=body, headers={"Idempotency-Key": key}, patience=90
                )
            except ApiUnavailable as exc:
                self.unconfirmed.append(f"{key}: {exc}")
                return
            if response.status_code != 202:
                self.refused.append(f"{key}: {response.status_code} {response.text[:200]}")
                return
            answers.append(response.json())
        first, again = answers
        self.events[first["event_id"]] = first
        if not again["duplicate"] or again["instances"] != first["instances"]:
            self.duplicates_wrong.append(key)


async def checks(database_url: str, triggers: Triggers) -> list[Outcome]:
    """(name, ok, detail, examples) for the schedules' ledgers and the events' instances."""
    conn = await asyncpg.connect(database_url)
    try:
        return [
            await _ledgers(conn, triggers),
            await _events(conn, triggers),
            await _trigger_instances_ended(conn),
        ]
    finally:
        await conn.close()


async def _ledgers(
    conn: asyncpg.Connection, triggers: Triggers
) -> tuple[str, bool, str, list[str]]:
    wrong: list[str] = []
    fired = 0
    for schedule_id in triggers.schedules:
        rows = await conn.fetch(
            "SELECT nominal_at, last_nominal_at, outcome, instance_id FROM schedule_fires"
            " WHERE schedule_id = $1 ORDER BY nominal_at",
            schedule_id,
        )
        instances = await conn.fetch(
            "SELECT id, trigger->>'nominal_at' AS nominal FROM instances WHERE started_by = $1",
            f"schedule:{schedule_id}",
        )
        expected = rows[0]["nominal_at"] if rows else None
        for row in rows:
            if row["nominal_at"] != expected:
                wrong.append(f"{schedule_id}: no ledger row for {expected}")
                break
            expected = (row["last_nominal_at"] or row["nominal_at"]) + timedelta(seconds=INTERVAL_S)
        started = {r["instance_id"] for r in rows if r["outcome"] == "STARTED"}
        have = {r["id"] for r in instances}
        if started != have:
            wrong.append(
                f"{schedule_id}: {len(started)} STARTED rows, {len(have)} instances (without "
                f"a row: {len(have - started)}, without an instance: {len(started - have)})"
            )
        nominal = [r["nominal"] for r in instances]
        if len(nominal) != len(set(nominal)):
            wrong.append(f"{schedule_id}: two instances for one nominal time")
        fired += len(started)
    detail = f"{len(triggers.schedules)} schedules, {fired} fires started, ledgers complete"
    if not fired:
        wrong.append("no schedule fired at all")
    return "schedule ledgers match their instances", not wrong, detail, wrong[:5]


async def _events(conn: asyncpg.Connection, triggers: Triggers) -> Outcome:
    wrong = [f"repeat answered differently: {k}" for k in triggers.duplicates_wrong]
    wrong += [f"refused: {r}" for r in triggers.refused]
    for event_id, answer in triggers.events.items():
        named = {i["instance_id"] for i in answer["instances"] if i.get("instance_id")}
        rows = await conn.fetch(
            "SELECT id FROM instances WHERE started_by = $1", f"event:{event_id}"
        )
        have = {str(r["id"]) for r in rows}
        if len(named) != 1 or have != named:
            wrong.append(f"event {event_id}: answer names {named}, the database has {have}")
    detail = (
        f"{len(triggers.events)} events accepted (each posted twice), "
        f"{len(triggers.unconfirmed)} never answered"
    )
    return "each event started its instance once", not wrong, detail, wrong[:5]


async def _trigger_instances_ended(conn: asyncpg.Connection) -> Outcome:
    rows = await conn.fetch(
        "SELECT id, status, started_by FROM instances WHERE started_how IN ('schedule', 'event')"
        " AND status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')"
    )
    total = await conn.fetchval(
        "SELECT count(*) FROM instances WHERE started_how IN ('schedule', 'event')"
    )
    examples = [f"{r['id']} {r['status']} ({r['started_by']})" for r in rows[:5]]
    return "every scheduled and event instance ended", not rows, f"{total} instances", examples
