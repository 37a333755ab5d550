"""PostgreSQL: pools and versioned SQL migrations."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from importlib.resources.abc import Traversable
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

log = logging.getLogger(__name__)

_DB_NAME = re.compile(r"^[A-Za-z0-9_]{1,63}$")
_MIGRATION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_MIGRATION_LOCK = 0x7061636500000001  # 'pace' + 1: one migrator at a time per server

UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # e.g. "pool is closing", a connection lost mid-query
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,  # e.g. the server is shutting down
    asyncpg.exceptions.InternalClientError,  # a pooled connection the server closed
    TimeoutError,
)
"""Errors that mean the database is out of reach, not that a request or message is bad."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("jsonb", "json"):
        await conn.set_type_codec(
            type_name,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=60,
    )
    assert pool is not None
    return pool


def database_name(url: str) -> str:
    name = urlsplit(url).path.lstrip("/")
    if not _DB_NAME.match(name):
        raise ValueError(f"database name {name!r}: use letters, digits and '_'")
    return name


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


async def ensure_database(url: str) -> None:
    """Create the database named in `url` when it does not exist yet."""
    name = database_name(url)
    admin_url = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                # Identifiers cannot be parameters; the name was checked against _DB_NAME.
                await conn.execute(f'CREATE DATABASE "{name}"')
                log.info("created database %s", name)
            except asyncpg.DuplicateDatabaseError:
                pass  # another migrator won the race
    finally:
        await conn.close()


async def migrate(
    url: str,
    migrations: Traversable,
    after: Callable[[asyncpg.Connection], Awaitable[object]] | None = None,
) -> list[str]:
    """Apply, in order, each `NNNN_name.sql` not applied yet; returns the names applied.
    `after` then runs on the same connection (JSON codecs set), still under the migration
    lock: the data steps SQL cannot do, which must be idempotent."""
    await ensure_database(url)
    files = sorted(
        (f for f in migrations.iterdir() if _MIGRATION.match(f.name)), key=lambda f: f.name
    )
    conn = await asyncpg.connect(url)
    applied: list[str] = []
    try:
        # A session lock on a connection of our own (pooled connections drop session locks).
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for f in files:
            version = int(f.name[:4])
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(f.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    version,
                    f.name,
                )
            applied.append(f.name)
            log.info("applied migration %s to %s", f.name, database_name(url))
        if after is not None:
            await _init_connection(conn)
            await after(conn)
    finally:
        await conn.close()
    return applied
