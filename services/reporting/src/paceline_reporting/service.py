"""The reporting process: events in, reporting rows out."""

from __future__ import annotations

import asyncio
import logging

from paceline_contracts.queues import Queue
from paceline_contracts.states import ServerStatus
from paceline_infra import amqp, db, telemetry
from paceline_infra.batching import Batcher, drive
from paceline_infra.identity import ServerIdentity
from paceline_infra.presence import Presence
from paceline_infra.settings import Settings
from paceline_reporting.projector import Projector

log = logging.getLogger(__name__)


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
        presence = Presence(identity, publisher, interval_s=settings.server_heartbeat_s)
        await presence.open(connection, settings.namespace, stop)
        beating = asyncio.create_task(presence.run(), name="presence")
        log.info("reporting %s ready", identity.id)
        stopping = asyncio.create_task(_stop_consuming_on(stop, presence, batcher))
        await drive(batcher, stop, Projector(pool, publisher).handle, what="reporting")
        await stopping
        await presence.announce(ServerStatus.DRAINED)
        await beating
    finally:
        await connection.close()
        await pool.close()
        provider.shutdown()


async def _stop_consuming_on(stop: asyncio.Event, presence: Presence, batcher: Batcher) -> None:
    await stop.wait()
    await presence.announce(ServerStatus.DRAINING)
    await batcher.stop_consuming()
