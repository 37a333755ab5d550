"""The scheduler's reads and writes of the process database. Every statement is parameterised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from paceline_engine.definitions import Definition, parse_definition
from paceline_engine.events import HistoryEntry
from paceline_engine.state import InstanceState


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


async def lock_instances(conn: asyncpg.Connection, ids: Sequence[UUID]) -> dict[UUID, InstanceRow]:
    """Lock the rows in id order, so two schedulers never deadlock on the same pair."""
    rows = await conn.fetch(
        """
        SELECT id, definition, version, state, traceparent, started_by, started_how, created_at
        FROM instances WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
        """,
        sorted(set(ids)),
    )
    return {
        r["id"]: InstanceRow(
            r["id"],
            r["definition"],
            r["version"],
            InstanceState.model_validate(r["state"]),
            r["traceparent"],
            r["started_by"],
            r["started_how"],
            r["created_at"],
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


async def save_states(conn: asyncpg.Connection, rows: Sequence[InstanceRow]) -> None:
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
        [r.state.model_dump_json() for r in rows],
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
