"""The activity-worker process."""

from __future__ import annotations

import asyncio
import logging

import httpx

from paceline_contracts.queues import Queue
from paceline_contracts.states import ServerStatus
from paceline_infra import amqp, telemetry
from paceline_infra.identity import ServerIdentity
from paceline_infra.presence import Presence
from paceline_worker import http_tracing, orphans
from paceline_worker.claims import Claimer
from paceline_worker.runner import ActivityRunner, RunnerConfig
from paceline_worker.settings import WorkerSettings

log = logging.getLogger(__name__)


async def serve(settings: WorkerSettings, identity: ServerIdentity, stop: asyncio.Event) -> None:
    # First: what activities of a dead worker on this host left running is killed at once.
    janitor = asyncio.create_task(orphans.janitor(), name="orphans")
    provider = telemetry.setup_tracing(identity, settings)
    try:
        connection = await amqp.connect(settings, identity.id)
    except BaseException:
        janitor.cancel()
        raise
    try:
        async with http_tracing.instrument(httpx.AsyncClient()) as http:
            publisher = await amqp.Publisher.open(connection, settings.namespace)
            claimer = Claimer(identity.id, publisher)
            await claimer.open(connection, settings.namespace)
            config = RunnerConfig(
                identity.id, settings.worker_concurrency, settings.worker_max_deliveries
            )
            runner = ActivityRunner(config, publisher, claimer, http)
            presence = Presence(
                identity,
                publisher,
                interval_s=settings.server_heartbeat_s,
                in_flight=runner.in_flight,
            )
            await presence.open(connection, settings.namespace, stop)
            beating = asyncio.create_task(presence.run(), name="presence")
            # Every cancel asked so far is known before the first activity is taken.
            await runner.cancellations.open(connection, settings.namespace, publisher)
            channel = await connection.channel()
            await channel.set_qos(
                prefetch_count=settings.worker_prefetch or settings.worker_concurrency
            )
            queue = await amqp.open_queue(channel, settings.namespace, Queue.ACTIVITIES)
            tag = await queue.consume(runner.on_message, no_ack=False)
            # One suspect at a time: each runs alone in a process of its own.
            suspects_channel = await connection.channel()
            await suspects_channel.set_qos(prefetch_count=1)
            suspects = await amqp.open_queue(suspects_channel, settings.namespace, Queue.SUSPECTS)
            suspects_tag = await suspects.consume(runner.on_suspect, no_ack=False)
            log.info("worker %s ready: concurrency %d", identity.id, settings.worker_concurrency)
            await stop.wait()
            # Friendly shutdown (SIGTERM or a drain): take nothing new, finish what runs.
            await queue.cancel(tag)
            await suspects.cancel(suspects_tag)
            await presence.announce(ServerStatus.DRAINING)
            log.info(
                "draining %d in-flight activities (grace %.0fs)",
                len(runner.in_flight()),
                settings.worker_grace_s,
            )
            cancelled = await runner.drain(settings.worker_grace_s)
            if cancelled:
                log.warning(
                    "%d activities still running at the deadline: left to the broker "
                    "and the failover rule",
                    cancelled,
                )
            await presence.announce(ServerStatus.DRAINED)
            await beating
    finally:
        janitor.cancel()
        await connection.close()
        provider.shutdown()
        log.info("worker %s stopped", identity.id)
