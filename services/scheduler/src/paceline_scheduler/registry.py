"""The server registry: heartbeats from every server, kept in the `servers` table.

Servers silent for `forget_after_s` (LOST, or DRAINED and gone) are groomed away, at most once
a minute, so a stack that replaces its processes does not list them forever.
"""

from __future__ import annotations

import logging
import time

import asyncpg
from pydantic import ValidationError

from paceline_contracts.messages import HEARTBEAT, ServerHeartbeat
from paceline_contracts.queues import Queue
from paceline_infra.amqp import Publisher, invalid_reason
from paceline_infra.batching import Delivery

log = logging.getLogger(__name__)


_GROOM_EVERY_S = 60.0


class Registry:
    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, forget_after_s: float) -> None:
        self._pool = pool
        self._publisher = publisher
        self._forget_after_s = forget_after_s
        self._groomed_at = 0.0

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
        await self._groom()

    async def _groom(self) -> None:
        if time.monotonic() - self._groomed_at < _GROOM_EVERY_S:
            return
        self._groomed_at = time.monotonic()
        try:
            removed = await self._pool.execute(
                "DELETE FROM servers WHERE last_heartbeat < now() - make_interval(secs => $1)",
                self._forget_after_s,
            )
        except Exception as exc:  # the heartbeats are recorded; grooming waits for next time
            log.warning("registry: grooming failed: %s", exc)
            return
        if removed != "DELETE 0":
            log.info(
                "registry: forgot servers silent for %.0fs (%s)", self._forget_after_s, removed
            )
