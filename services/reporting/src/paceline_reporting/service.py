"""The reporting process: events in, reporting rows out."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from paceline_contracts.queues import Queue
from paceline_infra import amqp, db, telemetry
from paceline_infra.batching import Batcher
from paceline_infra.identity import ServerIdentity
from paceline_infra.settings import Settings
from paceline_reporting.projector import Projector

log = logging.getLogger(__name__)

_DB_DOWN = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    TimeoutError,
)


async def serve(settings: Settings, identity: ServerIdentity, stop: asyncio.Event) -> None:
    provider = telemetry.setup_tracing(identity, settings)
    pool = await db.create_pool(settings.reporting_database_url, max_size=4)
    connection = await amqp.connect(settings, identity.id)
    try:
        publisher = await amqp.Publisher.open(connection, settings.namespace)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        batcher = Batcher(max_size=500, window_s=0.02)
        await batcher.consume(
            Queue.EVENTS, await amqp.open_queue(channel, settings.namespace, Queue.EVENTS)
        )
        projector = Projector(pool, publisher)
        log.info("reporting %s ready", identity.id)
        stopping = asyncio.create_task(_stop_consuming_on(stop, batcher))
        async for batch in batcher.batches(stop):
            try:
                await projector.handle(batch)
            except _DB_DOWN as exc:
                log.warning("reporting database unavailable (%s); requeueing", exc)
                for d in batch:
                    try:
                        await d.message.nack(requeue=True)
                    except Exception:
                        log.debug("nack failed", exc_info=True)
                await asyncio.sleep(1.0)
        await stopping
    finally:
        await connection.close()
        await pool.close()
        provider.shutdown()


async def _stop_consuming_on(stop: asyncio.Event, batcher: Batcher) -> None:
    await stop.wait()
    await batcher.stop_consuming()
