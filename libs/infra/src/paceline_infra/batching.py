"""Deliveries gathered into batches, so one database transaction serves many messages.

The consume callback only enqueues (a dropped connection cancels callbacks, so no work happens
there); a separate loop takes up to `max_size` deliveries, waiting at most `window_s` after the
first, and hands them over together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from paceline_contracts.queues import Queue
from paceline_infra import db

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    queue: Queue
    message: AbstractIncomingMessage


class Batcher:
    def __init__(self, *, max_size: int = 200, window_s: float = 0.005) -> None:
        self._pending: asyncio.Queue[Delivery] = asyncio.Queue()
        self._max_size = max_size
        self._window_s = window_s
        self._consumers: list[tuple[AbstractQueue, str]] = []

    async def consume(self, queue: Queue, amqp_queue: AbstractQueue) -> None:
        async def on_message(message: AbstractIncomingMessage) -> None:
            self._pending.put_nowait(Delivery(queue, message))

        tag = await amqp_queue.consume(on_message, no_ack=False)
        self._consumers.append((amqp_queue, tag))

    async def stop_consuming(self) -> None:
        for amqp_queue, tag in self._consumers:
            # The channel may be gone already; then there is nothing to cancel.
            with contextlib.suppress(Exception):
                await amqp_queue.cancel(tag)
        self._consumers.clear()

    async def batches(self, stop: asyncio.Event) -> AsyncIterator[list[Delivery]]:
        loop = asyncio.get_running_loop()
        while not (stop.is_set() and self._pending.empty()):
            try:
                first = await asyncio.wait_for(self._pending.get(), 0.2)
            except TimeoutError:
                continue
            batch = [first]
            deadline = loop.time() + self._window_s
            while len(batch) < self._max_size:
                try:
                    batch.append(self._pending.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._pending.get(), remaining))
                except TimeoutError:
                    break
            yield batch


async def drive(
    batcher: Batcher,
    stop: asyncio.Event,
    handle: Callable[[list[Delivery]], Awaitable[None]],
    *,
    what: str,
) -> None:
    """Hand batches to `handle` until `stop` and the backlog is done. While the database is
    out of reach, deliveries go back to their queue and the loop backs off; it never exits
    for that, so a service rides out a database restart on its own."""
    async for batch in batcher.batches(stop):
        try:
            await handle(batch)
        except Exception as exc:
            # The database or the broker is away (a channel not yet restored after a broker
            # restart fails too): the deliveries go back to their queue, and we try again.
            log.warning(
                "%s: %s (%s); requeueing %d deliveries",
                what,
                "database unavailable" if isinstance(exc, db.UNAVAILABLE) else "failed",
                exc,
                len(batch),
            )
            for d in batch:
                try:
                    await d.message.nack(requeue=True)
                except Exception:
                    log.debug("nack failed", exc_info=True)
            await asyncio.sleep(1.0)
