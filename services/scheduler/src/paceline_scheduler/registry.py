"""The server registry: heartbeats from every server, kept in the `servers` table."""

from __future__ import annotations

import logging

import asyncpg
from pydantic import ValidationError

from paceline_contracts.messages import HEARTBEAT, ServerHeartbeat
from paceline_contracts.queues import Queue
from paceline_infra.amqp import Publisher, invalid_reason
from paceline_infra.batching import Delivery

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, pool: asyncpg.Pool, publisher: Publisher) -> None:
        self._pool = pool
        self._publisher = publisher

    async def handle(self, batch: list[Delivery]) -> None:
        beats: list[tuple[Delivery, ServerHeartbeat]] = []
        for d in batch:
            try:
                beats.append((d, HEARTBEAT.validate_json(d.message.body)))
            except ValidationError as exc:
                reason = invalid_reason("heartbeat", exc)
                await self._publisher.dead_letter(Queue.SERVERS, d.message, reason)
        newest: dict[str, ServerHeartbeat] = {}
        for _, beat in beats:
            if beat.server_id not in newest or newest[beat.server_id].at < beat.at:
                newest[beat.server_id] = beat
        if newest:
            await self._pool.executemany(
                """
                INSERT INTO servers (id, kind, host, pid, started_at, status, reported_at,
                                     last_heartbeat, in_flight)
                VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8)
                ON CONFLICT (id) DO UPDATE SET
                    status = excluded.status, reported_at = excluded.reported_at,
                    last_heartbeat = excluded.last_heartbeat, in_flight = excluded.in_flight
                WHERE servers.reported_at <= excluded.reported_at
                """,
                [
                    (
                        b.server_id,
                        b.kind.value,
                        b.host,
                        b.pid,
                        b.started_at,
                        b.status.value,
                        b.at,
                        [f.model_dump(mode="json") for f in b.in_flight],
                    )
                    for b in newest.values()
                ],
            )
        for d, _ in beats:
            await d.message.ack()
