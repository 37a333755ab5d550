"""A server's presence: heartbeats to the registry, and the control messages sent to it.

Every service runs one. It reports ACTIVE, DRAINING (with what it still runs) and DRAINED, so
`GET /v1/servers` shows each server and what a drain waits for; a server that stops reporting
is shown as LOST by whoever reads the registry. A drain arrives on the server's own exclusive
queue and is handled exactly like SIGTERM: both set `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError

from paceline_contracts.messages import DRAIN, InFlightActivity, ServerHeartbeat
from paceline_contracts.queues import Queue, control_exchange_name, control_queue_name
from paceline_contracts.states import ServerStatus
from paceline_infra.amqp import Outgoing, Publisher
from paceline_infra.identity import ServerIdentity

log = logging.getLogger(__name__)

InFlight = Callable[[], Sequence[InFlightActivity]]


class Presence:
    def __init__(
        self,
        identity: ServerIdentity,
        publisher: Publisher,
        *,
        interval_s: float,
        in_flight: InFlight = lambda: (),
    ) -> None:
        self._identity = identity
        self._publisher = publisher
        self._interval_s = interval_s
        self._in_flight = in_flight
        self.status = ServerStatus.ACTIVE
        self.drain_requested_by: str | None = None
        self._drained = asyncio.Event()

    async def open(
        self, connection: AbstractRobustConnection, namespace: str, stop: asyncio.Event
    ) -> None:
        """Listen for control messages; a drain sets `stop`."""
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            control_exchange_name(namespace), aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(
            control_queue_name(namespace, self._identity.id), exclusive=True, auto_delete=True
        )
        await queue.bind(exchange, routing_key=self._identity.id)

        async def on_control(message: AbstractIncomingMessage) -> None:
            try:
                drain = DRAIN.validate_json(message.body)
            except ValidationError as exc:
                log.warning("ignored a control message that is not a drain: %s", exc)
                return
            log.info("drain requested by %s", drain.by)
            self.drain_requested_by = drain.by
            stop.set()

        await queue.consume(on_control, no_ack=True)

    async def run(self) -> None:
        """Heartbeat until DRAINED is announced: a draining server keeps reporting what it
        still waits for."""
        while not self._drained.is_set():
            await self.beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self._interval_s)

    async def announce(self, status: ServerStatus) -> None:
        """Report a new status at once (DRAINED also ends the heartbeats)."""
        self.status = status
        if status is ServerStatus.DRAINED:
            self._drained.set()
        await self.beat()

    async def beat(self) -> None:
        heartbeat = ServerHeartbeat(
            server_id=self._identity.id,
            kind=self._identity.kind,
            host=self._identity.host,
            pid=self._identity.pid,
            started_at=self._identity.started_at,
            status=self.status,
            at=datetime.now(UTC),
            in_flight=tuple(self._in_flight()),
        )
        try:
            await self._publisher.publish(
                Outgoing(
                    Queue.SERVERS,
                    heartbeat.model_dump_json().encode(),
                    heartbeat.type,
                    uuid.uuid4().hex,
                    {},
                )
            )
        except Exception as exc:
            log.info("heartbeat not sent: %s", exc)
