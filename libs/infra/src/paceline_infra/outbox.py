"""The transactional outbox: a state change and the messages it causes commit together.

`stage` writes messages in the caller's transaction. After the commit, `flush` publishes the
ones that are due at once (with confirms, concurrently) and deletes them. Whatever a crash or a
broker outage left behind, and messages held back on purpose (a retry's backoff), is published
by the `Relay`, which any number of processes may run: rows are claimed with SKIP LOCKED.
Consumers are idempotent, so the rare double publish (a flush slower than the grace period) is
harmless; a lost message is not possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import orjson
from opentelemetry.context import Context
from pydantic import BaseModel

from paceline_contracts.queues import Destination, destination
from paceline_infra import telemetry
from paceline_infra.amqp import Outgoing, Publisher

log = logging.getLogger(__name__)

GRACE_S = 5.0
"""How long the relay leaves a fresh row to the process that wrote it."""


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    queue: Destination
    body: bytes
    message_type: str
    headers: Mapping[str, str] = field(default_factory=dict)
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    not_before: datetime | None = None
    """Held back until then: the relay publishes it, not the flush."""

    @classmethod
    def of(
        cls,
        queue: Destination,
        message: BaseModel,
        not_before: datetime | None = None,
        *,
        context: Context | None = None,
    ) -> OutboxMessage:
        """The message, with a PRODUCER span (child of `context`, default the current span)
        whose context it carries to its consumer."""
        message_id = uuid.uuid4()
        message_type = str(getattr(message, "type", ""))
        instance_id = getattr(message, "instance_id", None)
        headers = telemetry.produced(
            queue.value,
            str(message_id),
            context=context,
            attributes={
                "paceline.message.type": message_type,
                **({"paceline.instance_id": str(instance_id)} if instance_id else {}),
            },
        )
        return cls(
            queue,
            message.model_dump_json().encode(),
            message_type,
            headers,
            id=message_id,
            not_before=not_before,
        )

    def outgoing(self) -> Outgoing:
        return Outgoing(self.queue, self.body, self.message_type, str(self.id), self.headers)


async def stage(conn: asyncpg.Connection, messages: Sequence[OutboxMessage]) -> None:
    """Insert in the caller's transaction: they are sent if and only if it commits."""
    if not messages:
        return
    await conn.execute(
        """
        INSERT INTO outbox (id, queue, message_type, body, headers, available_at, delayed)
        SELECT u.id, u.queue, u.message_type, u.body, u.headers::jsonb,
               coalesce(u.not_before, now()), u.not_before IS NOT NULL
        FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[],
                    $6::timestamptz[]) AS u(id, queue, message_type, body, headers, not_before)
        """,
        [m.id for m in messages],
        [m.queue.value for m in messages],
        [m.message_type for m in messages],
        [m.body for m in messages],
        [orjson.dumps(dict(m.headers)).decode() for m in messages],
        [m.not_before for m in messages],
    )


async def flush(
    pool: asyncpg.Pool, publisher: Publisher, messages: Sequence[OutboxMessage]
) -> None:
    """After the commit: publish what is due now and forget it. Failures stay for the relay."""
    due = [m for m in messages if m.not_before is None]
    if not due:
        return
    errors = await publisher.publish_all(m.outgoing() for m in due)
    sent = [m.id for m, err in zip(due, errors, strict=True) if err is None]
    failed = len(due) - len(sent)
    if failed:
        log.warning(
            "outbox: %d of %d publishes failed; the relay will retry them (%s)",
            failed,
            len(due),
            next(e for e in errors if e is not None),
        )
    if sent:
        try:
            await pool.execute("DELETE FROM outbox WHERE id = ANY($1::uuid[])", sent)
        except Exception as exc:  # e.g. a pooled connection the server closed
            # Published but not forgotten: the relay sends them once more; consumers dedupe.
            log.warning("outbox: could not delete %d sent rows: %s", len(sent), exc)


class Relay:
    """Publishes what `flush` did not: rows left by a crash, an outage, or held back."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: Publisher,
        *,
        interval_s: float = 0.25,
        batch: int = 500,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._interval_s = interval_s
        self._batch = batch

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                sent = await self.relay_once()
            except Exception as exc:  # the relay must outlive any outage
                log.warning("outbox relay: %s; trying again", exc)
                sent = 0
            if sent < self._batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._interval_s)

    async def relay_once(self) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """
                SELECT id, queue, message_type, body, headers FROM outbox
                WHERE available_at <= now()
                  AND (delayed OR created_at < now() - make_interval(secs => $2))
                ORDER BY available_at
                LIMIT $1
                FOR UPDATE SKIP LOCKED
                """,
                self._batch,
                GRACE_S,
            )
            if not rows:
                return 0
            messages = [
                Outgoing(
                    destination(r["queue"]),
                    r["body"],
                    r["message_type"],
                    str(r["id"]),
                    r["headers"],
                )
                for r in rows
            ]
            errors = await self._publisher.publish_all(messages)
            sent = [r["id"] for r, err in zip(rows, errors, strict=True) if err is None]
            await conn.execute("DELETE FROM outbox WHERE id = ANY($1::uuid[])", sent)
            if len(sent) < len(rows):
                log.warning(
                    "outbox relay: %d publishes failed; retrying later", len(rows) - len(sent)
                )
            return len(sent)
