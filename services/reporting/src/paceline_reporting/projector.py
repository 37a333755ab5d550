"""Turns instance events into reporting rows, one transaction per batch.

Each event carries snapshots and a sequence number; a row is only replaced by a newer
snapshot, so redeliveries and out-of-order arrivals leave the same result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from paceline_contracts.messages import EVENT, ActivitySnapshot, InstanceChanged
from paceline_contracts.queues import Queue
from paceline_infra import telemetry
from paceline_infra.amqp import Publisher, invalid_reason
from paceline_infra.batching import Delivery

log = logging.getLogger(__name__)


def _duration_ms(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return int((end - start).total_seconds() * 1000)


class Projector:
    def __init__(self, pool: asyncpg.Pool, publisher: Publisher) -> None:
        self._pool = pool
        self._publisher = publisher

    async def handle(self, batch: list[Delivery]) -> None:
        events: list[tuple[Delivery, InstanceChanged]] = []
        for d in batch:
            try:
                events.append((d, EVENT.validate_json(d.message.body)))
            except ValidationError as exc:
                reason = invalid_reason("event", exc)
                await self._publisher.dead_letter(Queue.EVENTS, d.message, reason)
        if not events:
            return
        with _batch_span([d.message for d, _ in events]):
            async with self._pool.acquire() as conn, conn.transaction():
                await _upsert_instances(conn, [e for _, e in events])
                await _upsert_activities(conn, [e for _, e in events])
        for d, _ in events:
            await d.message.ack()


def _batch_span(messages: Sequence[AbstractIncomingMessage]) -> AbstractContextManager[Any]:
    """`process events`: a batch of one continues its instance's trace (the scheduler's
    producer span is its parent); a larger batch is a trace of its own, linked to every
    event's context (the messaging conventions' batch shape)."""
    single = len(messages) == 1
    return telemetry.tracer().start_as_current_span(
        f"process {Queue.EVENTS.value}",
        context=telemetry.extract(messages[0].headers) if single else Context(),
        kind=SpanKind.CONSUMER,
        links=[] if single else telemetry.batch_links([m.headers for m in messages]),
        attributes={
            **telemetry.messaging(
                "process", Queue.EVENTS.value, messages[0].message_id if single else None
            ),
            "messaging.batch.message_count": len(messages),
        },
    )


async def _upsert_instances(conn: asyncpg.Connection, events: Sequence[InstanceChanged]) -> None:
    # Within a batch keep the newest snapshot of each instance: one row may not be updated
    # twice by one INSERT ... ON CONFLICT.
    newest: dict[object, InstanceChanged] = {}
    for e in events:
        key = e.instance.instance_id
        if key not in newest or newest[key].seq < e.seq:
            newest[key] = e
    rows = [
        (
            e.instance.instance_id,
            e.instance.definition,
            e.instance.version,
            e.instance.status.value,
            e.instance.started_by,
            e.instance.started_how,
            e.instance.created_at,
            e.instance.started_at,
            e.instance.finished_at,
            _duration_ms(e.instance.started_at, e.instance.finished_at),
            e.instance.error.kind if e.instance.error else None,
            e.instance.error.message if e.instance.error else None,
            e.seq,
        )
        for e in newest.values()
    ]
    await conn.executemany(
        """
        INSERT INTO instance_reports (instance_id, definition, version, status, started_by,
            started_how, created_at, started_at, finished_at, duration_ms, error_kind, error, seq)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
        ON CONFLICT (instance_id) DO UPDATE SET
            status = excluded.status, started_at = excluded.started_at,
            finished_at = excluded.finished_at, duration_ms = excluded.duration_ms,
            error_kind = excluded.error_kind, error = excluded.error, seq = excluded.seq,
            updated_at = now()
        WHERE instance_reports.seq < excluded.seq
        """,
        rows,
    )


async def _upsert_activities(conn: asyncpg.Connection, events: Sequence[InstanceChanged]) -> None:
    newest: dict[tuple[object, str], tuple[int, ActivitySnapshot]] = {}
    for e in events:
        for a in e.activities:
            key = (e.instance.instance_id, a.step)
            if key not in newest or newest[key][0] < e.seq:
                newest[key] = (e.seq, a)
    rows = []
    for (instance_id, step), (seq, a) in newest.items():
        rows.append(
            (
                instance_id,
                step,
                a.activity_type,
                a.status.value,
                a.restartable,
                a.attempts,
                a.server_id,
                a.started_at,
                a.finished_at,
                _duration_ms(a.started_at, a.finished_at),
                a.error.kind if a.error else None,
                seq,
            )
        )
    if not rows:
        return
    await conn.executemany(
        """
        INSERT INTO activity_reports (instance_id, step, activity_type, status, restartable,
            attempts, server_id, started_at, finished_at, duration_ms, error_kind, seq)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        ON CONFLICT (instance_id, step) DO UPDATE SET
            status = excluded.status, restartable = excluded.restartable,
            attempts = excluded.attempts, server_id = excluded.server_id,
            started_at = excluded.started_at, finished_at = excluded.finished_at,
            duration_ms = excluded.duration_ms, error_kind = excluded.error_kind,
            seq = excluded.seq
        WHERE activity_reports.seq < excluded.seq
        """,
        rows,
    )
