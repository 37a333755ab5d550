"""The scheduler process: consumes commands and results, runs the outbox relay."""

from __future__ import annotations

import asyncio
import logging

from paceline_contracts.queues import Queue
from paceline_contracts.states import ServerKind
from paceline_infra import amqp, db, telemetry
from paceline_infra.batching import Batcher
from paceline_infra.identity import ServerIdentity
from paceline_infra.outbox import Relay
from paceline_scheduler.processor import DB_DOWN, Processor
from paceline_scheduler.settings import SchedulerSettings

log = logging.getLogger(__name__)


async def serve(settings: SchedulerSettings, identity: ServerIdentity, stop: asyncio.Event) -> None:
    assert identity.kind is ServerKind.SCHEDULER
    provider = telemetry.setup_tracing(identity, settings)
    pool = await db.create_pool(settings.database_url, max_size=8)
    connection = await amqp.connect(settings, identity.id)
    try:
        publisher = await amqp.Publisher.open(connection, settings.namespace)
        batcher = Batcher(
            max_size=settings.scheduler_batch_size,
            window_s=settings.scheduler_batch_window_ms / 1000,
        )
        for queue in (Queue.CLAIMS, Queue.COMMANDS, Queue.RESULTS):
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=settings.scheduler_prefetch)
            await batcher.consume(queue, await amqp.open_queue(channel, settings.namespace, queue))
        processor = Processor(pool, publisher, settings.policy())
        relay = asyncio.create_task(Relay(pool, publisher).run(stop), name="outbox-relay")
        log.info("scheduler %s ready (namespace %s)", identity.id, settings.namespace)
        stopping = asyncio.create_task(_stop_consuming_on(stop, batcher))
        async for batch in batcher.batches(stop):
            try:
                await processor.handle(batch)
            except DB_DOWN as exc:
                log.warning(
                    "scheduler: database unavailable (%s); requeueing %d deliveries",
                    exc,
                    len(batch),
                )
                for d in batch:
                    try:
                        await d.message.nack(requeue=True)
                    except Exception:
                        log.debug("nack failed", exc_info=True)
                await asyncio.sleep(1.0)
        await stopping
        await relay
    finally:
        await connection.close()
        await pool.close()
        provider.shutdown()
        log.info("scheduler %s stopped", identity.id)


async def _stop_consuming_on(stop: asyncio.Event, batcher: Batcher) -> None:
    await stop.wait()
    await batcher.stop_consuming()
