"""RabbitMQ: topology, publishing with confirms, and dead-lettering with a reason.

Acknowledgement is an explicit policy here, never an accident: consumers take deliveries with
`no_ack=False`, settle each one themselves, and a message is only ever acked after what it
asked for is durable elsewhere (committed, or published with a confirm).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from paceline_contracts.queues import (
    Destination,
    Queue,
    Stream,
    control_exchange_name,
    dead_letter_exchange_name,
    dead_queue_name,
    exchange_name,
    queue_name,
    stream_name,
)
from paceline_infra.settings import Settings

log = logging.getLogger(__name__)

DELIVERY_LIMIT = 20
"""The broker's own backstop against a message that is redelivered forever. Paceline's crash
budget for activities is enforced below it, by the worker, so the budget can be a setting."""
STREAM_MAX_AGE = "7D"
"""How long a stream keeps its messages: a worker that starts later replays this much of the
cancellations. It matches the consumer timeout `deploy/ensure-services.sh` sets (7 days), the
longest an activity message may sit unacked."""
STREAM_SEGMENT_BYTES = 1_000_000
"""Streams drop whole segments once they are older than `STREAM_MAX_AGE`: small segments make
that retention close to exact."""
REASON_HEADER = "x-paceline-reason"
SOURCE_HEADER = "x-paceline-queue"


def _reraise_if_cancelled() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def invalid_reason(what: str, error: ValidationError) -> str:
    """The dead-letter reason for a message that does not parse: what it should have been,
    and where it is wrong (at most ten problems)."""
    problems = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:10]
    )
    return f"not a valid {what}: {problems}"


def queue_arguments(namespace: str, queue: Queue) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": dead_letter_exchange_name(namespace),
        "x-dead-letter-routing-key": queue.value,
        # At-least-once dead-lettering: the default (at-most-once) may drop what it moves.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": DELIVERY_LIMIT,
    }


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """A connection that reconnects, re-declares and re-consumes on its own."""
    return await aio_pika.connect_robust(
        settings.amqp_url,
        heartbeat=settings.amqp_heartbeat_s,
        client_properties={"connection_name": name},
    )


async def declare_topology(channel: AbstractChannel, namespace: str) -> None:
    """Every exchange and queue, idempotently: any service may start first."""
    exchange = await channel.declare_exchange(
        exchange_name(namespace), aio_pika.ExchangeType.DIRECT, durable=True
    )
    dlx = await channel.declare_exchange(
        dead_letter_exchange_name(namespace), aio_pika.ExchangeType.DIRECT, durable=True
    )
    await channel.declare_exchange(
        control_exchange_name(namespace), aio_pika.ExchangeType.DIRECT, durable=True
    )
    for queue in Queue:
        dead = await channel.declare_queue(
            dead_queue_name(namespace, queue), durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(dlx, routing_key=queue.value)
        live = await open_queue(channel, namespace, queue)
        await live.bind(exchange, routing_key=queue.value)
    for stream in Stream:
        log_queue = await open_stream(channel, namespace, stream)
        await log_queue.bind(exchange, routing_key=stream.value)


async def open_queue(channel: AbstractChannel, namespace: str, queue: Queue) -> AbstractQueue:
    return await channel.declare_queue(
        queue_name(namespace, queue), durable=True, arguments=queue_arguments(namespace, queue)
    )


async def open_stream(channel: AbstractChannel, namespace: str, stream: Stream) -> AbstractQueue:
    """A stream, declared with the same arguments everywhere (a mismatch is refused)."""
    return await channel.declare_queue(
        stream_name(namespace, stream),
        durable=True,
        arguments={
            "x-queue-type": "stream",
            "x-max-age": STREAM_MAX_AGE,
            "x-stream-max-segment-size-bytes": STREAM_SEGMENT_BYTES,
        },
    )


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish."""

    queue: Destination
    body: bytes
    message_type: str
    message_id: str
    headers: Mapping[str, str]
    reply_to: str | None = None
    correlation_id: str | None = None


class Publisher:
    """Publishes persistent messages and waits for the broker's confirm of each."""

    def __init__(
        self, channel: AbstractChannel, exchange: AbstractExchange, dlx: AbstractExchange
    ) -> None:
        self._channel = channel
        self._exchange = exchange
        self._dlx = dlx

    @classmethod
    async def open(cls, connection: AbstractRobustConnection, namespace: str) -> Publisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare_topology(channel, namespace)
        exchange = await channel.get_exchange(exchange_name(namespace), ensure=False)
        dlx = await channel.get_exchange(dead_letter_exchange_name(namespace), ensure=False)
        return cls(channel, exchange, dlx)

    async def publish(self, message: Outgoing) -> None:
        """Returns once the broker has the message (a quorum of replicas, for quorum queues);
        raises when it refused it, could not route it, or the connection dropped."""
        try:
            await self._exchange.publish(
                aio_pika.Message(
                    message.body,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    content_type="application/json",
                    message_id=message.message_id,
                    type=message.message_type,
                    headers=dict(message.headers),
                    reply_to=message.reply_to,
                    correlation_id=message.correlation_id,
                ),
                routing_key=message.queue.value,
                mandatory=True,
            )
        except asyncio.CancelledError:
            _reraise_if_cancelled()
            # aiormq cancels the wait for a confirm when the connection drops: for the caller
            # that is a failed publish, to retry, not a reason to stop.
            raise ConnectionError("the connection dropped before the broker confirmed") from None

    async def publish_all(self, messages: Iterable[Outgoing]) -> list[BaseException | None]:
        """Publish concurrently (confirms overlap instead of one round trip each); the result
        says, per message, None when confirmed or the error."""
        results = await asyncio.gather(*(self.publish(m) for m in messages), return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]

    async def reply(self, reply_to: str, correlation_id: str, body: bytes) -> None:
        """Answer a request on the queue it named. Not mandatory: when the asker is gone, so
        is its queue, and the answer is simply dropped (it asks again, or its work returns)."""
        await self._channel.default_exchange.publish(
            aio_pika.Message(body, correlation_id=correlation_id, content_type="application/json"),
            routing_key=reply_to,
        )

    async def dead_letter(
        self, queue: Queue, message: AbstractIncomingMessage, reason: str
    ) -> None:
        """Move a message that cannot be handled to `<queue>.dead` with the reason in its
        headers, then ack it: it is kept, and the consumer goes on."""
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:2000]
        headers[SOURCE_HEADER] = queue.value
        await self._dlx.publish(
            aio_pika.Message(
                message.body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type=message.content_type,
                message_id=message.message_id,
                type=message.type,
                headers=headers,
            ),
            routing_key=queue.value,
            mandatory=True,
        )
        await message.ack()
        log.warning("dead-lettered a message from %s: %s", queue.value, reason[:300])
