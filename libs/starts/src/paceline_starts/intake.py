"""An event, its deduplication and the instances its subscribers start, written in the caller's
transaction (issue 11, "Events and event triggers").

Events arrive through the admin API (`POST /v1/events`) and the `events.in` queue (the
scheduler); both call `accept_event` inside a transaction of their own, and publish the start
commands it returns after the commit. The event's row, its trigger deduplications, every
instance it starts and their start commands (outbox) commit together, or none of them does:
an event is never half taken.

- **The event** is deduplicated by its key: the `Idempotency-Key` (or, from the queue, the
  `idempotency-key` header or the message id), else its source and id, else nothing (a fresh
  key: every copy is a new event). A repeated event answers as the first did, with
  `duplicate: true`, and starts nothing; the same key with another event is
  `IdempotencyKeyReused`.
- **Subscriptions** are the triggers of the latest version of each definition
  (`replace_subscriptions`, called where a version is created). For each trigger of the
  event's type: `when` false -> `not_started`; its `dedupe` key seen within the window ->
  `deduplicated` (naming the instance the key started); an expression that fails or inputs
  the definition refuses -> `start_failed` with the reason; else `started`. What one trigger
  does never undoes the others or the event.
- **No subscriber**: the event is recorded all the same (`no_subscriber: true`).
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from paceline_engine.definitions import (
    Definition,
    DefinitionError,
    Trigger,
    resolve_inputs,
    trigger_for_event,
)
from paceline_infra.outbox import OutboxMessage
from paceline_infra.telemetry import tracer
from paceline_starts import instances
from paceline_starts.instances import StartedHow

MAX_DATA_BYTES = 64 * 1024
"""An event's `data`, as JSON: it is copied into the `trigger` of every instance it starts."""
MAX_KEY_CHARS = 255
"""An event's idempotency key (the API's header takes at most 200, AMQP's message id 255)."""
MAX_DEPTH = 64
"""Levels of nesting in `data` (as the admin API allows in any JSON document)."""
_MAX_INDEXED_BYTES = 512
"""A key longer than this (UTF-8) is stored as its digest: PostgreSQL's b-tree indexes refuse
entries over about 2.7 kB."""
_INT64 = (-(2**63), 2**63 - 1)


class Outcome(StrEnum):
    """What one trigger did with an event."""

    STARTED = "started"
    NOT_STARTED = "not_started"
    """Its `when` is false for this event."""
    DEDUPLICATED = "deduplicated"
    """Its `dedupe` key was seen within the window: `instance_id` is the instance it started."""
    START_FAILED = "start_failed"
    """An expression failed on the event, or the definition refused the inputs."""


class ReceivedVia(StrEnum):
    API = "api"
    AMQP = "amqp"


class IdempotencyKeyReused(ValueError):
    """The event's key was used before for a different event (the admin API's 422
    `idempotency-key-reused`; the queue dead-letters it)."""


@dataclass(frozen=True, slots=True)
class Event:
    """An event as sent: `{type, id?, source?, data?}`."""

    type: str
    id: str | None = None
    """The sender's id of the event."""
    source: str | None = None
    data: Any = None

    def digest(self) -> str:
        """sha256 of the event's canonical JSON: tells a repeat from another event that
        reuses its key."""
        body = {"type": self.type, "id": self.id, "source": self.source, "data": self.data}
        return hashlib.sha256(_utf8(_canonical(body))).hexdigest()


@dataclass(frozen=True, slots=True)
class Accepted:
    """What `accept_event` recorded (or found recorded): the answer, and the start commands
    to flush after the commit (none for a duplicate)."""

    answer: dict[str, Any]
    """`{event_id, duplicate, no_subscriber, instances: [{definition, version, trigger,
    outcome, instance_id, reason}]}`, JSON-ready (ids as text)."""
    messages: list[OutboxMessage] = field(default_factory=list)

    @property
    def event_id(self) -> uuid.UUID:
        return uuid.UUID(self.answer["event_id"])

    @property
    def duplicate(self) -> bool:
        return bool(self.answer["duplicate"])


def event_key(event: Event, idempotency_key: str | None) -> str:
    """What deduplicates the event: its idempotency key, else its source and id, else a fresh
    key (the event is not deduplicated)."""
    if idempotency_key is not None:
        key = f"key:{idempotency_key}"
    elif event.id is not None:
        key = "event:" + _canonical([event.source, event.id])
    else:
        return f"fresh:{uuid.uuid4()}"
    return _indexable(key)


def data_problem(data: Any, path: str = "") -> str | None:
    """Why `data` cannot be an event's data (stored as jsonb, copied into instances), or
    None: a NUL or a lone surrogate in a string or a key, an integer beyond 64 bits, NaN or
    infinity, more than MAX_DEPTH levels, more than MAX_DATA_BYTES of JSON. `path` names
    `data` in the reason."""
    why = storable_problem(data, path)
    if why is None and len(_utf8(_canonical(data))) > MAX_DATA_BYTES:
        why = f"{path}: " if path else ""
        why += f"larger than {MAX_DATA_BYTES} bytes of JSON"
    return why


def storable_problem(value: Any, path: str = "", depth: int = 0) -> str | None:
    """Why PostgreSQL's jsonb (through the pools' JSON codec) cannot store `value`, with where
    (`data.hosts[2]`), or None."""
    where = f"{path}: " if path else ""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if _INT64[0] <= value <= _INT64[1] else f"{where}an integer beyond 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where}NaN and infinity are not JSON numbers"
    if isinstance(value, str):
        return _text_problem(value, where)
    if depth >= MAX_DEPTH:
        return f"{where}nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, list):
        for i, item in enumerate(value):
            if why := storable_problem(item, f"{path}[{i}]", depth + 1):
                return why
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}a key that is not a string"
            if why := _text_problem(key, f"{where}a key: "):
                return why
            if why := storable_problem(item, f"{path}.{key}" if path else key, depth + 1):
                return why
        return None
    return f"{where}a {type(value).__name__} is not a JSON value"


def key_problem(key: str) -> str | None:
    """Why `key` cannot be an event's idempotency key, or None."""
    if not 1 <= len(key) <= MAX_KEY_CHARS:
        return f"1 to {MAX_KEY_CHARS} characters"
    return _text_problem(key, "")


async def accept_event(
    conn: asyncpg.Connection,
    event: Event,
    *,
    idempotency_key: str | None,
    received_by: str,
    received_via: ReceivedVia,
) -> Accepted:
    """Record `event` and start what its subscribers start, in `conn`'s transaction (the
    caller holds one; publish `messages` after the commit). A repeat of an event recorded
    before answers its first answer with `duplicate: true` and writes nothing; raises
    IdempotencyKeyReused when the key was used for a different event. `event.data` must be
    storable (`data_problem`)."""
    event_id = uuid.uuid4()
    key = event_key(event, idempotency_key)
    digest = event.digest()
    with tracer().start_as_current_span(
        f"event {event.type}",
        attributes={
            "paceline.event_id": str(event_id),
            "paceline.event_type": event.type,
            "paceline.by": received_by,
        },
    ) as span:
        # The key first: a concurrent copy of the event waits here until this transaction
        # ends, then finds it recorded.
        inserted = await conn.fetchval(
            """
            INSERT INTO events (id, event_key, request_hash, type, source, event_id, data,
                                received_by, received_via, answer)
            VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, '{}'::jsonb)
            ON CONFLICT (event_key) DO NOTHING
            RETURNING id
            """,
            event_id,
            key,
            digest,
            event.type,
            event.source,
            event.id,
            event.data,
            received_by,
            received_via.value,
        )
        if inserted is None:
            span.set_attribute("paceline.duplicate", True)
            return await _recorded(conn, key, digest)
        starts, messages = await _start_subscribers(conn, event, event_id)
        answer: dict[str, Any] = {
            "event_id": str(event_id),
            "duplicate": False,
            "no_subscriber": not starts,
            "instances": starts,
        }
        await conn.execute("UPDATE events SET answer = $2::jsonb WHERE id = $1", event_id, answer)
        span.set_attribute("paceline.started", len(messages))
        return Accepted(answer, messages)


async def _recorded(conn: asyncpg.Connection, key: str, digest: str) -> Accepted:
    row = await conn.fetchrow("SELECT request_hash, answer FROM events WHERE event_key = $1", key)
    if row is None:  # the conflicting row is committed (or ours): it cannot vanish
        raise RuntimeError(f"event key {key!r} conflicted but no event holds it")
    if row["request_hash"] != digest:
        raise IdempotencyKeyReused("this idempotency key was already used for a different event")
    answer = dict(row["answer"])
    answer["duplicate"] = True
    return Accepted(answer)


# --- subscribers --------------------------------------------------------------------------------


async def _start_subscribers(
    conn: asyncpg.Connection, event: Event, event_id: uuid.UUID
) -> tuple[list[dict[str, Any]], list[OutboxMessage]]:
    """What each trigger subscribed to the event's type did (by definition name, then in the
    definition's order), and the start commands of the instances started."""
    rows = await conn.fetch(
        """
        SELECT definition, version, array_agg(trigger_id) AS trigger_ids
        FROM subscriptions WHERE event_type = $1
        GROUP BY definition, version ORDER BY definition
        """,
        event.type,
    )
    starts: list[dict[str, Any]] = []
    messages: list[OutboxMessage] = []
    for row in rows:
        name, version, ids = row["definition"], row["version"], list(row["trigger_ids"])
        try:
            definition = await _definition(conn, name, version)
        except DefinitionError as exc:
            why = f"definition {name!r} version {version} no longer validates: {_problems(exc)}"
            starts += [_start(name, version, i, Outcome.START_FAILED, None, why) for i in ids]
            continue
        if definition is None:
            why = f"definition {name!r} version {version} does not exist"
            starts += [_start(name, version, i, Outcome.START_FAILED, None, why) for i in ids]
            continue
        by_id = {t.id: t for t in definition.triggers}
        for trigger_id in [t.id for t in definition.triggers if t.id in ids] + sorted(
            set(ids) - by_id.keys()
        ):
            trigger = by_id.get(trigger_id)
            if trigger is None or trigger.event != event.type:
                why = f"version {version} has no trigger {trigger_id!r} for {event.type!r}"
                starts.append(_start(name, version, trigger_id, Outcome.START_FAILED, None, why))
                continue
            start, message = await _fire(conn, definition, trigger, event, event_id)
            starts.append(start)
            if message is not None:
                messages.append(message)
    return starts, messages


async def _definition(conn: asyncpg.Connection, name: str, version: int) -> Definition | None:
    """Version `version` of `name`, parsed (`instances.resolved_definition`: a version already
    parsed is not read again, so a large body is not read for every event)."""
    found = await instances.resolved_definition(conn, name, version)
    return found[1] if found is not None else None


async def _fire(
    conn: asyncpg.Connection,
    definition: Definition,
    trigger: Trigger,
    event: Event,
    event_id: uuid.UUID,
) -> tuple[dict[str, Any], OutboxMessage | None]:
    """One trigger on the event: its entry in the answer, and the start command of the
    instance it started (None when it started none)."""
    name, version = definition.name, definition.version

    def entry(
        outcome: Outcome, instance_id: uuid.UUID | None = None, reason: str | None = None
    ) -> dict[str, Any]:
        return _start(name, version, trigger.id, outcome, instance_id, reason)

    seen = trigger_for_event(
        trigger.id, event.type, event.id or str(event_id), event.source, event.data
    )
    # Expressions are the definition author's and the data the sender's: whatever they raise
    # is this trigger's failure, said in the answer, never the event's.
    try:
        if not trigger.matches(seen):
            return entry(Outcome.NOT_STARTED, reason="`when` is false for this event"), None
    except Exception as exc:
        return entry(Outcome.START_FAILED, reason=f"`when` failed on the event: {exc}"), None
    try:
        dedupe_key = trigger.dedupe_key(seen)
    except Exception as exc:
        return entry(Outcome.START_FAILED, reason=f"`dedupe` failed on the event: {exc}"), None
    if dedupe_key is not None:
        dedupe_key = _indexable(dedupe_key)
        earlier = await _live_dedupe(conn, name, trigger.id, dedupe_key)
        if earlier is not None:
            return entry(
                Outcome.DEDUPLICATED, earlier["instance_id"], _seen(dedupe_key, earlier)
            ), None
    try:
        inputs = resolve_inputs(definition, trigger.start_inputs(seen))
    except DefinitionError as exc:
        return entry(
            Outcome.START_FAILED, reason=f"the inputs were refused: {_problems(exc)}"
        ), None
    except Exception as exc:
        return entry(Outcome.START_FAILED, reason=f"`inputs` failed on the event: {exc}"), None
    if why := storable_problem(inputs, "inputs"):
        return entry(Outcome.START_FAILED, reason=f"the inputs cannot be stored: {why}"), None
    instance_id = uuid.uuid4()
    if dedupe_key is not None:
        assert trigger.dedupe_window_s is not None
        claimed = await conn.fetchval(
            """
            INSERT INTO trigger_dedupe AS d (definition, trigger_id, dedupe_key, event,
                                             instance_id, expires_at)
            VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
            ON CONFLICT (definition, trigger_id, dedupe_key) DO UPDATE
                SET event = EXCLUDED.event, instance_id = EXCLUDED.instance_id,
                    expires_at = EXCLUDED.expires_at
                WHERE d.expires_at <= now()
            RETURNING instance_id
            """,
            name,
            trigger.id,
            dedupe_key,
            event_id,
            instance_id,
            trigger.dedupe_window_s,
        )
        if claimed is None:  # a concurrent event took the key first (it waited for it)
            earlier = await _live_dedupe(conn, name, trigger.id, dedupe_key, live=False)
            assert earlier is not None
            return entry(
                Outcome.DEDUPLICATED, earlier["instance_id"], _seen(dedupe_key, earlier)
            ), None
    staged = await instances.stage_instance(
        conn,
        definition=name,
        version=version,
        inputs=inputs,
        started_by=f"event:{event_id}",
        started_how=StartedHow.EVENT,
        trigger=seen,
        instance_id=instance_id,
    )
    assert staged is not None  # no idempotency key: nothing to conflict with
    return entry(Outcome.STARTED, staged.id), staged.command


async def _live_dedupe(
    conn: asyncpg.Connection, definition: str, trigger_id: str, key: str, *, live: bool = True
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        """
        SELECT event, instance_id, expires_at FROM trigger_dedupe
        WHERE definition = $1 AND trigger_id = $2 AND dedupe_key = $3
          AND (NOT $4 OR expires_at > now())
        """,
        definition,
        trigger_id,
        key,
        live,
    )
    return row


def _seen(key: str, earlier: asyncpg.Record) -> str:
    until: datetime = earlier["expires_at"]
    return (
        f"dedupe key {key!r} already started instance {earlier['instance_id']} (event "
        f"{earlier['event']}); it is remembered until {until.isoformat()}"
    )


def _start(
    definition: str,
    version: int,
    trigger_id: str,
    outcome: Outcome,
    instance_id: uuid.UUID | None,
    reason: str | None,
) -> dict[str, Any]:
    return {
        "definition": definition,
        "version": version,
        "trigger": trigger_id,
        "outcome": outcome.value,
        "instance_id": str(instance_id) if instance_id is not None else None,
        "reason": reason,
    }


def _problems(exc: DefinitionError, most: int = 5) -> str:
    shown = "; ".join(str(p) for p in exc.problems[:most])
    more = len(exc.problems) - most
    return shown + (f" (and {more} more)" if more > 0 else "")


# --- subscriptions ------------------------------------------------------------------------------


async def replace_subscriptions(conn: asyncpg.Connection, name: str, version: int) -> None:
    """Make the triggers of version `version` of `name` (stored, and valid) its subscriptions,
    in place of those of its earlier versions: call it in the transaction that stores the
    version, the latest. Migration 0008 wrote the first ones the same way."""
    await conn.execute("DELETE FROM subscriptions WHERE definition = $1", name)
    await conn.execute(
        """
        INSERT INTO subscriptions (event_type, definition, version, trigger_id)
        SELECT t->>'event', d.name, d.version, t->>'id'
        FROM definitions d,
             jsonb_array_elements(CASE jsonb_typeof(d.body->'triggers')
                                  WHEN 'array' THEN d.body->'triggers'
                                  ELSE '[]'::jsonb END) t
        WHERE d.name = $1 AND d.version = $2
        ON CONFLICT DO NOTHING
        """,
        name,
        version,
    )


async def subscriptions(
    conn: asyncpg.Pool | asyncpg.Connection, name: str
) -> list[tuple[str, int, str]]:
    """The subscriptions of `name`: (event type, version, trigger id), by event type."""
    rows = await conn.fetch(
        "SELECT event_type, version, trigger_id FROM subscriptions WHERE definition = $1"
        " ORDER BY event_type, trigger_id",
        name,
    )
    return [(r["event_type"], r["version"], r["trigger_id"]) for r in rows]


# --- helpers -----------------------------------------------------------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _indexable(key: str) -> str:
    if len(_utf8(key)) <= _MAX_INDEXED_BYTES:
        return key
    return "sha256:" + hashlib.sha256(_utf8(key)).hexdigest()


def _text_problem(text: str, where: str) -> str | None:
    if "\x00" in text:
        return f"{where}a NUL character cannot be stored"
    try:
        text.encode()
    except UnicodeEncodeError:
        return f"{where}not valid Unicode (a lone surrogate)"
    return None
