"""A new instance: its PENDING row, its root span and its start command, staged in the caller's
transaction (the transactional outbox: the command is published after the commit, by the
caller's flush or else by the outbox relay).

Whoever starts an instance (the API, a schedule's fire, an event's trigger) writes it here, so
every instance has the same shape whatever started it: `started_how` says through what
(`api`, `schedule`, `event`), `started_by` who (a principal, `schedule:<id>`, `event:<id>`), and
`trigger` what its expressions see as `trigger` (definitions.py: `trigger_for_schedule`,
`trigger_for_event`; null for the API).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncpg
from opentelemetry import trace
from opentelemetry.context import Context

from paceline_contracts.messages import StartInstance
from paceline_contracts.queues import Queue
from paceline_engine.definitions import Definition, parse_definition
from paceline_engine.state import InstanceState
from paceline_infra import outbox
from paceline_infra.outbox import OutboxMessage
from paceline_infra.telemetry import caller_links, inject, trace_id_hex, tracer


class StartedHow(StrEnum):
    """Through what an instance was started (`instances.started_how`)."""

    API = "api"
    SCHEDULE = "schedule"
    EVENT = "event"


@contextmanager
def instance_root(
    instance_id: uuid.UUID, definition: str, version: int, started_by: str
) -> Iterator[trace.Span]:
    """The instance's root span: a fresh trace of its own (one per instance, whatever the
    caller sent), always recorded, linked to the caller's span (an HTTP request, a schedule's
    fire, an event's intake). Every later span of the instance descends from it: its context
    is stored with the instance."""
    with tracer().start_as_current_span(
        f"instance {definition}",
        context=Context(),
        links=caller_links(),
        attributes={
            "paceline.instance_id": str(instance_id),
            "paceline.definition": definition,
            "paceline.version": version,
            "paceline.by": started_by,
        },
    ) as span:
        yield span


@dataclass(frozen=True, slots=True)
class Staged:
    """An instance written in the caller's transaction."""

    id: uuid.UUID
    status: str
    definition: str
    version: int
    trace_id: str | None
    command: OutboxMessage
    """Its start command, staged in the outbox: flush it after the commit."""


@dataclass(frozen=True, slots=True)
class NewInstance:
    """An instance to insert (`insert_many`), with its root span made and its start command."""

    id: uuid.UUID
    definition: str
    version: int
    inputs: dict[str, Any]
    started_by: str
    started_how: StartedHow
    trigger: dict[str, Any] | None
    trace_id: str | None
    traceparent: str | None
    command: OutboxMessage

    def row(
        self, idempotency_key: str | None = None, request_hash: str | None = None
    ) -> tuple[Any, ...]:
        """The INSERT's parameters."""
        return (
            self.id,
            self.definition,
            self.version,
            InstanceState(inputs=self.inputs).document(),
            self.trace_id,
            self.traceparent,
            self.started_by,
            self.started_how.value,
            self.trigger,
            idempotency_key,
            request_hash,
        )


_INSERT = """
    INSERT INTO instances (id, definition, version, status, state, trace_id, traceparent,
                           started_by, started_how, trigger, idempotency_key, request_hash)
    VALUES ($1, $2, $3, 'PENDING', $4::jsonb, $5, $6, $7, $8, $9::jsonb, $10, $11)
"""


@contextmanager
def rooted_instance(
    *,
    definition: str,
    version: int,
    inputs: Mapping[str, Any],
    started_by: str,
    started_how: StartedHow,
    trigger: Mapping[str, Any] | None = None,
    instance_id: uuid.UUID | None = None,
) -> Iterator[NewInstance]:
    """A PENDING instance (`inputs`: resolved, see `resolve_inputs`) not written yet, inside its
    root span (`instance_root`), which ends with the block: what the block does (its INSERT)
    is part of the instance's trace. Its start command carries a PRODUCER span under it."""
    instance_id = instance_id or uuid.uuid4()
    with instance_root(instance_id, definition, version, started_by) as span:
        headers = inject()
        valid = span.get_span_context().is_valid  # not without a tracer provider
        command = OutboxMessage.of(Queue.COMMANDS, StartInstance(instance_id=instance_id))
        yield NewInstance(
            instance_id,
            definition,
            version,
            dict(inputs),
            started_by,
            started_how,
            dict(trigger) if trigger is not None else None,
            trace_id_hex(span) if valid else None,
            headers.get("traceparent"),
            command,
        )


def new_instance(**described: Any) -> NewInstance:
    """`rooted_instance`'s instance, its root span ended at once (written later, with others:
    `insert_many`). Takes `rooted_instance`'s arguments."""
    with rooted_instance(**described) as new:
        return new


async def insert_many(conn: asyncpg.Connection, new: Sequence[NewInstance]) -> None:
    """Insert these instances and stage their start commands, in `conn`'s transaction."""
    if not new:
        return
    await conn.executemany(_INSERT, [n.row() for n in new])
    await outbox.stage(conn, [n.command for n in new])


async def stage_instance(
    conn: asyncpg.Connection,
    *,
    definition: str,
    version: int,
    inputs: Mapping[str, Any],
    started_by: str,
    started_how: StartedHow,
    trigger: Mapping[str, Any] | None = None,
    instance_id: uuid.UUID | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Staged | None:
    """Insert the PENDING instance (`inputs`: resolved, see `resolve_inputs`) and stage its
    start command, in `conn`'s transaction (the caller holds one). None when another
    transaction already used `idempotency_key` (the insert waits for it to end, so two
    concurrent retries never make two instances); nothing is staged then."""
    with rooted_instance(
        definition=definition,
        version=version,
        inputs=inputs,
        started_by=started_by,
        started_how=started_how,
        trigger=trigger,
        instance_id=instance_id,
    ) as new:
        row = await conn.fetchrow(
            _INSERT
            + " ON CONFLICT (idempotency_key) DO NOTHING"
            + " RETURNING id, status, definition, version, trace_id",
            *new.row(idempotency_key, request_hash),
        )
        if row is None:
            return None
        await outbox.stage(conn, [new.command])
    return Staged(
        row["id"], row["status"], row["definition"], row["version"], row["trace_id"], new.command
    )


# --- definitions ---------------------------------------------------------------------------------

CACHE_SIZE = 256
"""Parsed definitions kept, the most recently used."""

_cache: OrderedDict[tuple[str, int], Definition] = OrderedDict()


async def parsed(name: str, version: int, body: Any) -> Definition:
    """The stored definition `name` `version` (whose body is `body`), parsed off the event
    loop the first time: a (name, version) never changes once saved, and parsing a large one
    takes a good fraction of a second. Raises DefinitionError when it no longer validates
    (the engine's rules changed since it was stored; not cached)."""
    key = (name, version)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    definition = await asyncio.to_thread(parse_definition, body, version=version)
    _cache[key] = definition
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return definition


async def stored_definition(
    conn: asyncpg.Pool | asyncpg.Connection, name: str, version: int | None
) -> asyncpg.Record | None:
    """The row (`name`, `version`, `created_at`, `body`) of the given version, or of the
    latest when `version` is None; None when there is none."""
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        SELECT name, version, created_at, body FROM definitions
        WHERE name = $1 AND ($2::integer IS NULL OR version = $2)
        ORDER BY version DESC LIMIT 1
        """,
        name,
        version,
    )
    return row


async def resolved_definition(
    conn: asyncpg.Connection, name: str, version: int | None
) -> tuple[int, Definition] | None:
    """The version of `name` that runs (`version`, or the latest when None) and its parsed
    definition; None when there is none. A version stored once never changes or goes, so a
    cached one is not read again (only "which is the latest" is asked). Raises DefinitionError
    when it no longer validates."""
    if version is None:
        version = await conn.fetchval("SELECT max(version) FROM definitions WHERE name = $1", name)
        if version is None:
            return None
    hit = _cache.get((name, version))
    if hit is not None:
        _cache.move_to_end((name, version))
        return version, hit
    row = await stored_definition(conn, name, version)
    if row is None:
        return None
    return version, await parsed(name, version, row["body"])
