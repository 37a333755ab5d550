"""The scheduler process: commands, claims and results in; the outbox relay; the registry;
the schedules' firing loop."""

from __future__ import annotations

import asyncio
import logging

from aio_pika.abc import AbstractQueue, AbstractRobustConnection

from paceline_contracts.queues import Queue
from paceline_contracts.states import ServerKind, ServerStatus
from paceline_infra import amqp, db, telemetry
from paceline_infra.batching import Batcher, drive
from paceline_infra.identity import ServerIdentity
from paceline_infra.outbox import Relay
from paceline_infra.presence import Presence
from paceline_scheduler.events_in import EventsIn
from paceline_scheduler.fires import Fires
from paceline_scheduler.processor import Processor
from paceline_scheduler.registry import Registry
from paceline_scheduler.settings import SchedulerSettings

log = logging.getLogger(__name__)


async def serve(settings: SchedulerSettings, identity: ServerIdentity, stop: asyncio.Event) -> None:
    assert identity.kind is ServerKind.SCHEDULER
    provider = telemetry.setup_tracing(identity, settings)
    pool = await db.create_pool(settings.database_url, max_size=8)
    connection = await amqp.connect(settings, identity.id)
    try:
        publisher = await amqp.Publisher.open(connection, settings.namespace)
        work = Batcher(
            max_size=settings.scheduler_batch_size,
            window_s=settings.scheduler_batch_window_ms / 1000,
        )
        for queue in (Queue.CLAIMS, Queue.COMMANDS, Queue.RESULTS):
            await work.consume(
                queue, await _open(connection, settings, queue, settings.scheduler_prefetch)
            )
        beats = Batcher(max_size=500, window_s=0.05)
        await beats.consume(Queue.SERVERS, await _open(connection, settings, Queue.SERVERS, 500))
        events = Batcher(max_size=settings.scheduler_batch_size, window_s=0.005)
        await events.consume(
            Queue.EVENTS_IN,
            await _open(connection, settings, Queue.EVENTS_IN, settings.scheduler_prefetch),
        )
        presence = Presence(identity, publisher, interval_s=settings.server_heartbeat_s)
        await presence.open(connection, settings.namespace, stop)
        tasks = [
            asyncio.create_task(presence.run(), name="presence"),
            asyncio.create_task(Relay(pool, publisher).run(stop), name="outbox-relay"),
            asyncio.create_task(
                Fires(pool, publisher, settings.schedule_missed_after_s).run(stop), name="schedules"
            ),
            asyncio.create_task(
                drive(
                    beats,
                    stop,
                    Registry(pool, publisher, settings.server_forget_after_s).handle,
                    what="registry",
                ),
                name="registry",
            ),
            asyncio.create_task(
                drive(events, stop, EventsIn(pool, publisher).handle, what="events.in"),
                name="events-in",
            ),
        ]
        log.info("scheduler %s ready (namespace %s)", identity.id, settings.namespace)
        stopping = asyncio.create_task(_stop_consuming_on(stop, presence, work, beats, events))
        processor = Processor(pool, publisher, settings.policy())
        await drive(work, stop, processor.handle, what="scheduler")
        await stopping
        await presence.announce(ServerStatus.DRAINED)
        await asyncio.gather(*tasks)
    finally:
        await connection.close()
        await pool.close()
        provider.shutdown()
        log.info("scheduler %s stopped", identity.id)


async def _open(
    connection: AbstractRobustConnection, settings: SchedulerSettings, queue: Queue, prefetch: int
) -> AbstractQueue:
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    return await amqp.open_queue(channel, settings.namespace, queue)


async def _stop_consuming_on(stop: asyncio.Event, presence: Presence, *batchers: Batcher) -> None:
    await stop.wait()
    await presence.announce(ServerStatus.DRAINING)
    for batcher in batchers:
        await batcher.stop_consuming()
