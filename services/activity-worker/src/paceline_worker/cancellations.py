"""The instances this worker must not start anything of: read from the `cancellations` stream.

A cancel is broadcast on a RabbitMQ stream (by the admin API when it is asked, and by the
scheduler when it records it). Every worker reads the whole stream (`x-stream-offset: first`),
so one that starts or reconnects later replays what it missed; the stream keeps messages for
`paceline_infra.amqp.STREAM_MAX_AGE`. Before it starts any activity a worker looks its
instance up here: no round trip per activity. On each new cancel it also stops what of that
instance it runs (`on_cancel`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError

from paceline_contracts.messages import CANCELLATION, InstanceCancelled
from paceline_contracts.queues import Stream
from paceline_infra.amqp import Outgoing, Publisher, open_stream

log = logging.getLogger(__name__)

KEPT_FOR = timedelta(days=7)
"""Cancels older than this are forgotten (the stream keeps them as long)."""
_MARKER_TYPE = "stream.marker"
_PREFETCH = 1000
_CATCH_UP_S = 10.0


class Cancellations:
    def __init__(self, server_id: str, on_cancel: Callable[[InstanceCancelled], None]) -> None:
        self._server_id = server_id
        self._on_cancel = on_cancel
        self._cancelled: dict[uuid.UUID, InstanceCancelled] = {}
        self._marker = uuid.uuid4().hex
        self._caught_up = asyncio.Event()

    def get(self, instance_id: uuid.UUID) -> InstanceCancelled | None:
        """The cancel of this instance, if one was asked."""
        return self._cancelled.get(instance_id)

    async def open(
        self, connection: AbstractRobustConnection, namespace: str, publisher: Publisher
    ) -> None:
        """Read the stream from its start; returns once everything that was in it when this
        was called has been read (or after `_CATCH_UP_S`, with a warning)."""
        channel = await connection.channel()
        # Streams need a prefetch, and acks to move the consumer's credit on.
        await channel.set_qos(prefetch_count=_PREFETCH)
        stream = await open_stream(channel, namespace, Stream.CANCELLATIONS)
        await stream.consume(self._on_message, arguments={"x-stream-offset": "first"})
        # A marker of our own, published now: once we read it back, we have read all before it.
        await publisher.publish(
            Outgoing(Stream.CANCELLATIONS, self._marker.encode(), _MARKER_TYPE, self._marker, {})
        )
        try:
            await asyncio.wait_for(self._caught_up.wait(), _CATCH_UP_S)
        except TimeoutError:
            log.warning(
                "cancellations: not caught up after %.0fs; going on with %d known",
                _CATCH_UP_S,
                len(self._cancelled),
            )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            if message.type == _MARKER_TYPE:
                if message.body.decode(errors="replace") == self._marker:
                    self._caught_up.set()
                return
            try:
                cancel = CANCELLATION.validate_json(message.body)
            except ValidationError as exc:
                # A stream keeps what it got: nothing to dead-letter, only to skip.
                log.warning("cancellations: skipped a message that is not a cancel: %s", exc)
                return
            self._remember(cancel)
        finally:
            try:
                await message.ack()
            except Exception:  # a channel closed by a reconnect: the stream is read again
                log.debug("cancellations: ack on a closed channel", exc_info=True)

    def _remember(self, cancel: InstanceCancelled) -> None:
        now = datetime.now(UTC)
        if cancel.at < now - KEPT_FOR:
            return
        first = cancel.instance_id not in self._cancelled
        self._cancelled.setdefault(cancel.instance_id, cancel)
        if first:
            self._forget_old(now)
        # Told again (a replay after a reconnect, or both the admin API and the scheduler):
        # stopping is idempotent, and something of the instance may have started meanwhile.
        self._on_cancel(cancel)

    def _forget_old(self, now: datetime) -> None:
        if len(self._cancelled) % 1024:
            return  # prune now and then, not on every cancel
        horizon = now - KEPT_FOR
        for instance_id in [i for i, c in self._cancelled.items() if c.at < horizon]:
            del self._cancelled[instance_id]
