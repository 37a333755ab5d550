"""The data half of migration 0005 (activity rows): for each instance carried over from the
single-document layout, the join counts and conditions in progress the engine now keeps
(paceline_engine.upgrade), and each activity row's position in its definition.

Run by `paceline-scheduler migrate` after the SQL migrations, under the migration lock, before
any scheduler of this version runs. A carried-over document is one without `joins`: every
document this version writes has it. Idempotent, and resumable: each batch commits.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from paceline_engine.layout import layout_of
from paceline_engine.state import InstanceState
from paceline_engine.upgrade import carry_over
from paceline_scheduler.store import DefinitionCache

log = logging.getLogger(__name__)

BATCH = 200


async def carry_over_instances(conn: asyncpg.Connection) -> int:
    """Upgrade every carried-over instance; returns how many."""
    definitions = DefinitionCache()
    done = 0
    while True:
        async with conn.transaction():
            rows = await conn.fetch(
                "SELECT id, definition, version, state FROM instances"
                " WHERE NOT (state ? 'joins') ORDER BY id LIMIT $1 FOR UPDATE",
                BATCH,
            )
            if not rows:
                return done
            known = await definitions.get_many(
                conn, {(r["definition"], r["version"]) for r in rows}
            )
            for row in rows:
                await _carry_over(conn, row, known[(row["definition"], row["version"])])
            done += len(rows)
            log.info("carried over %d instance(s) to activity rows", done)


async def _carry_over(conn: asyncpg.Connection, row: asyncpg.Record, definition: Any) -> None:
    stored = await conn.fetch(
        "SELECT step, state FROM activities WHERE instance_id = $1", row["id"]
    )
    document: dict[str, Any] = dict(row["state"])
    complete = InstanceState.model_validate(
        {**document, "activities": {r["step"]: r["state"] for r in stored}}
    )
    kept = carry_over(definition, complete)
    document["joins"] = kept.joins
    document["branches"] = kept.branches
    await conn.execute("UPDATE instances SET state = $2 WHERE id = $1", row["id"], document)
    layout = layout_of(definition)  # rows of steps no longer in it keep no position
    steps = [r["step"] for r in stored if _placed(layout, r["step"])]
    await conn.execute(
        "UPDATE activities AS a SET position = u.position"
        " FROM unnest($2::text[], $3::int[]) AS u(step, position)"
        " WHERE a.instance_id = $1 AND a.step = u.step",
        row["id"],
        steps,
        [layout.position(s) for s in steps],
    )


def _placed(layout: Any, step: str) -> bool:
    try:
        layout.position(step)
    except KeyError:
        return False
    return True
