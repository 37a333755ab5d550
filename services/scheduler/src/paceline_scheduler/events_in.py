"""The `events.in` queue: events from outside, as `POST /v1/events` takes them (issue 11).

A message's body is the event, `{"type", "id"?, "source"?, "data"?}` (unknown fields refused);
its `idempotency-key` header, else its AMQP message id, is its key (else its source and id).
Each batch of deliveries is applied in one transaction, each event in a savepoint of its own
(paceline_starts.intake: the event's row, its deduplications, the instances it starts and
their start commands); the deliveries are acked only after the commit, and the commands
published after it (by the outbox relay if this scheduler dies first). A scheduler killed
mid-batch acks nothing: the events come back, and their keys keep a repeat from starting
anything twice.

A malformed message (not JSON, not an object, a missing or bad `type`, data that cannot be
stored) and one whose key was used for a different event are dead-lettered to
`events.in.dead` with the reason; the consumer goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, ConfigDict, StringConstraints, TypeAdapter, ValidationError

from paceline_contracts.queues import Queue
from paceline_infra import db, outbox
from paceline_infra.amqp import Publisher, invalid_reason
from paceline_infra.batching import Delivery
from paceline_infra.outbox import OutboxMessage
from paceline_infra.telemetry import extract, messaging, tracer
from paceline_starts import intake
from paceline_starts.intake import ReceivedVia

log = logging.getLogger(__name__)

RECEIVED_BY = f"amqp:{Queue.EVENTS_IN.value}"
KEY_HEADERS = ("idempotency-key", "Idempotency-Key")
"""The headers that may carry an event's idempotency key (before its message id)."""

_Text = StringConstraints(min_length=1, max_length=200)


class EventBody(BaseModel):
    """An event as a message body: the body of `POST /v1/events`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Annotated[
        str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:/-]+$")
    ]
    id: Annotated[str, _Text] | None = None
    source: Annotated[str, _Text] | None = None
    data: Any = None


_BODY = TypeAdapter(EventBody)


class Malformed(ValueError):
    """A message that is not an event: dead-lettered with this reason."""


@dataclass(frozen=True, slots=True)
class _Incoming:
    delivery: Delivery
    event: intake.Event
    key: str | None


def parse(message: AbstractIncomingMessage) -> tuple[intake.Event, str | None]:
    """The event a message carries and its idempotency key; raises Malformed."""
    try:
        body = _BODY.validate_json(message.body)
    except ValidationError as exc:
        raise Malformed(invalid_reason("event", exc)) from None
    problems = [
        f"{name}: {why}"
        for name, value in (("id", body.id), ("source", body.source))
        if value is not None and (why := intake.storable_problem(value))
    ]
    if why := intake.data_problem(body.data, "data"):
        problems.append(why)
    key = _key(message.headers, message.message_id)
    if isinstance(key, Malformed):
        problems.append(str(key))
        key = None
    if problems:
        raise Malformed(f"not a valid event: {'; '.join(problems)}")
    event = intake.Event(type=body.type, id=body.id, source=body.source, data=body.data)
    return event, key


def _key(headers: Mapping[str, Any] | None, message_id: str | None) -> str | Malformed | None:
    for name in KEY_HEADERS:
        value = (headers or {}).get(name)
        if value is None:
            continue
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                return Malformed(f"{name} header: not UTF-8")
        if not isinstance(value, str):
            return Malformed(f"{name} header: not text")
        if why := intake.key_problem(value):
            return Malformed(f"{name} header: {why}")
        return value
    if message_id:
        if why := intake.key_problem(message_id):
            return Malformed(f"message id: {why}")
        return message_id
    return None


class EventsIn:
    """Applies batches of `events.in` deliveries (for `paceline_infra.batching.drive`)."""

    def __init__(self, pool: asyncpg.Pool, publisher: Publisher) -> None:
        self._pool = pool
        self._publisher = publisher

    async def handle(self, batch: list[Delivery]) -> None:
        incoming: list[_Incoming] = []
        for delivery in batch:
            try:
                event, key = parse(delivery.message)
            except Malformed as exc:
                await self._publisher.dead_letter(Queue.EVENTS_IN, delivery.message, str(exc))
                continue
            incoming.append(_Incoming(delivery, event, key))
        if not incoming:
            return
        applied: list[_Incoming] = []
        refused: list[tuple[_Incoming, str]] = []
        messages: list[OutboxMessage] = []
        async with self._pool.acquire() as conn, conn.transaction():
            for item in incoming:
                try:
                    accepted = await self._accept(conn, item)
                except intake.IdempotencyKeyReused as exc:
                    refused.append((item, f"{exc} (key {item.key!r})"))
                    continue
                except (*db.UNAVAILABLE, asyncpg.TransactionRollbackError):
                    raise  # not this event's fault: the batch goes back to the queue
                except Exception as exc:
                    log.exception("events.in: could not apply an event; dead-lettering it")
                    refused.append((item, f"the scheduler could not apply it: {exc!r}"))
                    continue
                applied.append(item)
                messages += accepted.messages
                if not accepted.duplicate:
                    log.info(
                        "event %s (%s) from %s: %d instance(s) started",
                        accepted.event_id,
                        item.event.type,
                        RECEIVED_BY,
                        len(accepted.messages),
                    )
        for item in applied:
            await item.delivery.message.ack()
        for item, reason in refused:
            await self._publisher.dead_letter(Queue.EVENTS_IN, item.delivery.message, reason)
        await outbox.flush(self._pool, self._publisher, messages)

    async def _accept(self, conn: asyncpg.Connection, item: _Incoming) -> intake.Accepted:
        """One event in a savepoint: what fails in it undoes only its own rows."""
        message = item.delivery.message
        with tracer().start_as_current_span(
            f"process {Queue.EVENTS_IN.value}",
            context=extract(message.headers),
            kind=SpanKind.CONSUMER,
            attributes=messaging("process", Queue.EVENTS_IN.value, message.message_id),
        ):
            async with conn.transaction():
                return await intake.accept_event(
                    conn,
                    item.event,
                    idempotency_key=item.key,
                    received_by=RECEIVED_BY,
                    received_via=ReceivedVia.AMQP,
                )
