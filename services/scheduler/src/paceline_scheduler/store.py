"""The scheduler's reads and writes of the process database. Every statement is parameterised.

An instance is a small document in `instances.state` plus one row per activity in
`activities`: a transition locks the instance row, reads the activities it names (the engine
asks for more with `NotLoaded`), and writes back the document and the activities it changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from paceline_engine.definitions import Definition, parse_definition
from paceline_engine.events import HistoryEntry, RecordSignal
from paceline_engine.layout import layout_of
from paceline_engine.state import ActivityState, InstanceState, NotLoaded


@dataclass(slots=True)
class InstanceRow:
    id: UUID
    definition: str
    version: int
    state: InstanceState
    traceparent: str | None
    started_by: str
    started_how: str
    created_at: datetime
    trigger: dict[str, Any] | None = None
    """What its expressions see as `trigger` (None: started through the API)."""


async def lock_instances(conn: asyncpg.Connection, ids: Sequence[UUID]) -> dict[UUID, InstanceRow]:
    """Lock the rows in id order, so two schedulers never deadlock on the same pair."""
    rows = await conn.fetch(
        """
        SELECT id, definition, version, state, traceparent, started_by, started_how, created_at,
               trigger
        FROM instances WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
        """,
        sorted(set(ids)),
    )
    return {
        r["id"]: InstanceRow(
            r["id"],
            r["definition"],
            r["version"],
            InstanceState.partial(r["state"]),
            r["traceparent"],
            r["started_by"],
            r["started_how"],
            r["created_at"],
            r["trigger"],
        )
        for r in rows
    }


class DefinitionCache:
    """Definitions never change once saved (a change is a new version): cache them forever."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], Definition] = {}

    async def get_many(
        self, conn: asyncpg.Connection, keys: set[tuple[str, int]]
    ) -> dict[tuple[str, int], Definition]:
        missing = [k for k in keys if k not in self._cache]
        if missing:
            rows = await conn.fetch(
                """
                SELECT d.name, d.version, d.body FROM definitions d
                JOIN unnest($1::text[], $2::int[]) AS k(name, version)
                  ON d.name = k.name AND d.version = k.version
                """,
                [k[0] for k in missing],
                [k[1] for k in missing],
            )
            for r in rows:
                self._cache[(r["name"], r["version"])] = parse_definition(
                    r["body"], version=r["version"]
                )
        return {k: self._cache[k] for k in keys}


_FINAL = "('COMPLETED', 'FAILED', 'TIMED_OUT', 'CANCELLED', 'SKIPPED')"
"""Final activity statuses, spelt as the `activities_open` index's predicate spells them."""


async def load_steps(
    conn: asyncpg.Connection, rows: dict[UUID, InstanceRow], wanted: dict[UUID, set[str]]
) -> None:
    """Add the named activities of each instance to its state (those it does not hold yet)."""
    pairs = [
        (instance_id, step)
        for instance_id, steps in wanted.items()
        if instance_id in rows
        for step in steps
        if step not in rows[instance_id].state.activities
    ]
    if not pairs:
        return
    found = await conn.fetch(
        """
        SELECT a.instance_id, a.step, a.state FROM activities a
        JOIN unnest($1::uuid[], $2::text[]) AS w(instance_id, step)
          ON a.instance_id = w.instance_id AND a.step = w.step
        """,
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )
    by_instance: dict[UUID, dict[str, ActivityState]] = {i: {} for i, _ in pairs}
    for r in found:
        by_instance[r["instance_id"]][r["step"]] = ActivityState.model_validate(r["state"])
    for instance_id, loaded in by_instance.items():
        asked = {step for i, step in pairs if i == instance_id}
        rows[instance_id].state.add_loaded(loaded, asked)


async def load_needed(conn: asyncpg.Connection, row: InstanceRow, need: NotLoaded) -> None:
    """Load what the engine said it needs to apply an event to `row`."""
    if need.steps:
        await load_steps(conn, {row.id: row}, {row.id: set(need.steps)})
    if need.open or need.every:
        where = "" if need.every else f"AND status NOT IN {_FINAL}"
        found = await conn.fetch(
            f"SELECT step, state FROM activities WHERE instance_id = $1 {where}",  # noqa: S608 - constants only
            row.id,
        )
        loaded = {r["step"]: ActivityState.model_validate(r["state"]) for r in found}
        row.state.add_loaded(loaded, open=need.open, every=need.every)


async def save_states(
    conn: asyncpg.Connection,
    rows: Sequence[InstanceRow],
    changed: dict[UUID, set[str]],
    definitions: dict[tuple[str, int], Definition],
) -> None:
    """Write each instance's document, and the activities its transitions changed."""
    if not rows:
        return
    await conn.execute(
        """
        UPDATE instances AS i SET status = u.status, state = u.state::jsonb, updated_at = now()
        FROM unnest($1::uuid[], $2::text[], $3::text[]) AS u(id, status, state)
        WHERE i.id = u.id
        """,
        [r.id for r in rows],
        [r.state.status.value for r in rows],
        [r.state.model_dump_json(exclude={"activities"}) for r in rows],
    )
    ids: list[UUID] = []
    steps: list[str] = []
    statuses: list[str] = []
    positions: list[int] = []
    states: list[str] = []
    for r in rows:
        layout = layout_of(definitions[(r.definition, r.version)])
        for step in sorted(changed.get(r.id, ())):
            activity = r.state.activities.get(step)
            if activity is None:
                continue  # dispatched and taken back in the same batch: never stored
            ids.append(r.id)
            steps.append(step)
            statuses.append(activity.status.value)
            positions.append(layout.position(step))
            states.append(activity.model_dump_json())
    if not ids:
        return
    await conn.execute(
        """
        INSERT INTO activities AS a (instance_id, step, status, position, state)
        SELECT u.instance_id, u.step, u.status, u.position, u.state::jsonb
        FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[])
          AS u(instance_id, step, status, position, state)
        ON CONFLICT (instance_id, step) DO UPDATE
        SET status = excluded.status, position = excluded.position, state = excluded.state,
            updated_at = now()
        """,
        ids,
        steps,
        statuses,
        positions,
        states,
    )


async def append_history(
    conn: asyncpg.Connection, entries: Sequence[tuple[UUID, datetime, HistoryEntry]]
) -> None:
    if not entries:
        return
    data: list[Any] = [e.data for _, _, e in entries]
    await conn.execute(
        """
        INSERT INTO history (instance_id, at, kind, step, attempt, reason, data)
        SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[],
                             $5::int[], $6::text[], $7::jsonb[])
        """,
        [i for i, _, _ in entries],
        [at for _, at, _ in entries],
        [e.kind.value for _, _, e in entries],
        [e.step for _, _, e in entries],
        [e.attempt for _, _, e in entries],
        [e.reason for _, _, e in entries],
        data,
    )


async def record_signals(
    conn: asyncpg.Connection, records: Sequence[tuple[RecordSignal, datetime]]
) -> None:
    """What became of each signal (its row, inserted by the admin API)."""
    # A signal buffered and then taken by a wait in the same batch: its last fate stands.
    last = list({r.signal_id: (r, at) for r, at in records}.values())
    if not last:
        return
    records = last
    await conn.execute(
        """
        UPDATE signals AS s SET status = u.status, step = u.step, reason = u.reason,
               decided_at = u.at
        FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
          AS u(id, status, step, reason, at)
        WHERE s.id = u.id
        """,
        [UUID(r.signal_id) for r, _ in records],
        [r.fate.value for r, _ in records],
        [r.step for r, _ in records],
        [r.reason for r, _ in records],
        [at for _, at in records],
    )
