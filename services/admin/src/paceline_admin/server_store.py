"""SQL for the server registry. The scheduler writes it from heartbeats; the admin API reads it
and removes servers that are gone.

The stored status is ACTIVE, DRAINING or DRAINED as last reported. LOST is derived here, the
same way for every query: a server not DRAINED whose last heartbeat is older than
`server_lost_after_s` is LOST.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from paceline_contracts.states import ServerStatus

MAX_LISTED = 1000
"""`GET /v1/servers` lists at most this many (a registry that large is a grooming problem)."""

_SILENT = "s.last_heartbeat < now() - make_interval(secs => $1::float8)"
_GONE = f"(s.status = '{ServerStatus.DRAINED.value}' OR {_SILENT})"
_VIEW = f"""
    SELECT s.id, s.kind, s.host, s.pid, s.started_at, s.last_heartbeat, s.in_flight,
           CASE WHEN s.status <> '{ServerStatus.DRAINED.value}' AND {_SILENT}
                THEN '{ServerStatus.LOST.value}' ELSE s.status END AS status
    FROM servers s
"""  # noqa: S608 (constants only)


async def listing(
    pool: asyncpg.Pool,
    *,
    lost_after_s: float,
    kinds: Sequence[str],
    statuses: Sequence[str],
    limit: int,
) -> list[asyncpg.Record]:
    """By kind, then start time (then id, for ties); empty filters match everything."""
    rows: list[asyncpg.Record] = await pool.fetch(
        f"SELECT * FROM ({_VIEW}) v"  # noqa: S608 (constants only)
        " WHERE (cardinality($2::text[]) = 0 OR v.kind = ANY($2::text[]))"
        " AND (cardinality($3::text[]) = 0 OR v.status = ANY($3::text[]))"
        " ORDER BY v.kind, v.started_at, v.id LIMIT $4",
        lost_after_s,
        list(kinds),
        list(statuses),
        limit,
    )
    return rows


async def one(pool: asyncpg.Pool, server_id: str, *, lost_after_s: float) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(
        f"{_VIEW} WHERE s.id = $2",
        lost_after_s,
        server_id,
    )
    return row


async def remove_if_gone(pool: asyncpg.Pool, server_id: str, *, lost_after_s: float) -> bool:
    """Delete the server's row when it is DRAINED or LOST, in one statement: a server that
    heartbeats again between a check and the delete is never removed while ACTIVE."""
    deleted = await pool.fetchval(
        f"DELETE FROM servers s WHERE s.id = $2 AND {_GONE} RETURNING s.id",  # noqa: S608
        lost_after_s,
        server_id,
    )
    return deleted is not None


async def some(
    pool: asyncpg.Pool, server_ids: Sequence[str], *, lost_after_s: float
) -> dict[str, asyncpg.Record]:
    """The registry rows of these servers, by id (servers not in the registry are missing)."""
    if not server_ids:
        return {}
    rows: list[asyncpg.Record] = await pool.fetch(
        f"{_VIEW} WHERE s.id = ANY($2::text[])",
        lost_after_s,
        sorted(set(server_ids)),
    )
    return {r["id"]: r for r in rows}
