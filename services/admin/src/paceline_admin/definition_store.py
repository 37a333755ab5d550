"""SQL for process definitions. Every version is immutable once written."""

from __future__ import annotations

from typing import Any

import asyncpg

from paceline_starts import intake

# The two-key advisory lock space, apart from the single-key locks others use (migrations).
_LOCK_CLASS = 0x7061  # 'pa'


async def insert_next_version(pool: asyncpg.Pool, name: str, body: Any) -> asyncpg.Record:
    """Store `body` as the next version of `name`; returns its name, version and created_at
    (not the body: the caller has it, and reading a large one back is wasted work). Concurrent
    creates of one name queue on a transaction-scoped lock, so each reads the max version the
    previous one committed. The new version's triggers replace the definition's subscriptions
    in the same transaction: the latest version holds them."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _LOCK_CLASS, name)
        row: asyncpg.Record = await conn.fetchrow(
            """
            INSERT INTO definitions (name, version, body)
            SELECT $1, coalesce(max(version), 0) + 1, $2::jsonb FROM definitions WHERE name = $1
            RETURNING name, version, created_at
            """,
            name,
            body,
        )
        await intake.replace_subscriptions(conn, row["name"], row["version"])
        return row


async def latest_page(pool: asyncpg.Pool, after: str | None, limit: int) -> list[asyncpg.Record]:
    """The latest version of each name, by name, starting after `after`."""
    rows: list[asyncpg.Record] = await pool.fetch(
        """
        SELECT DISTINCT ON (name) name, version, created_at,
               count(*) OVER (PARTITION BY name) AS versions
        FROM definitions
        WHERE $1::text IS NULL OR name > $1
        ORDER BY name, version DESC
        LIMIT $2
        """,
        after,
        limit,
    )
    return rows


async def all_versions(pool: asyncpg.Pool, name: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT version, created_at, body FROM definitions WHERE name = $1 ORDER BY version",
        name,
    )
    return rows


async def one_version(
    pool: asyncpg.Pool | asyncpg.Connection, name: str, version: int | None
) -> asyncpg.Record | None:
    """The given version, or the latest when `version` is None."""
    row: asyncpg.Record | None = await pool.fetchrow(
        """
        SELECT name, version, created_at, body FROM definitions
        WHERE name = $1 AND ($2::integer IS NULL OR version = $2)
        ORDER BY version DESC LIMIT 1
        """,
        name,
        version,
    )
    return row
