"""The admin process is a server too: it heartbeats to the registry and can be drained.

A drain (a `DrainServer` on this server's control queue) sets the app's `stop` event, exactly
as SIGTERM does in `paceline-admin run`; whoever runs the app stops serving then. The admin
runs no activities, so it has nothing in flight: it reports DRAINING as soon as `stop` is set
and DRAINED when its lifespan ends, after the HTTP server has finished its requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

from paceline_admin.resources import Resources
from paceline_admin.settings import AdminSettings
from paceline_contracts.states import ServerStatus
from paceline_infra.identity import ServerIdentity
from paceline_infra.presence import Presence

log = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT_S = 5.0
"""A broker that hangs must not hold up the shutdown: a heartbeat not sent by then is given up
(the registry shows the server LOST instead of DRAINED, which is still true enough)."""
RESUME_AFTER_S = 1.0


@asynccontextmanager
async def present(
    settings: AdminSettings,
    identity: ServerIdentity,
    resources: Resources,
    stop: asyncio.Event,
) -> AsyncIterator[Presence]:
    """Heartbeat while the body runs; announce DRAINING when `stop` is set, DRAINED at the end."""
    presence = Presence(
        identity,
        resources.publisher,
        interval_s=settings.server_heartbeat_s,
        in_flight=lambda: (),
    )
    await presence.open(resources.connection, settings.namespace, stop)
    beating = asyncio.create_task(_heartbeat(presence), name="presence")
    draining = asyncio.create_task(_draining_on(stop, presence), name="draining")
    log.info("admin %s present in the server registry", identity.id)
    try:
        yield presence
    finally:
        if not stop.is_set():
            draining.cancel()  # not drained: the lifespan simply ends (e.g. in tests)
        # DRAINING goes out before DRAINED (the registry keeps the newest by time anyway).
        await asyncio.wait([draining], timeout=ANNOUNCE_TIMEOUT_S)
        await _within(presence.announce(ServerStatus.DRAINED), "DRAINED")
        await _within(beating, "the last heartbeat")


async def _heartbeat(presence: Presence) -> None:
    """`presence.run()`, resumed when a dropped broker connection cuts a heartbeat short.

    aiormq cancels the confirmation a publish waits for when its channel closes; that
    CancelledError gets past `Presence.beat` (which catches `Exception` only) and would end the
    heartbeats for good, leaving a live admin LOST in the registry."""
    while True:
        try:
            await presence.run()
            return
        except asyncio.CancelledError:
            if _cancelled():
                raise
            log.info("a heartbeat was cut short by the broker connection; going on")
        await asyncio.sleep(RESUME_AFTER_S)


def _cancelled() -> bool:
    """Whether the current task itself is being cancelled (not just an await inside it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _draining_on(stop: asyncio.Event, presence: Presence) -> None:
    await stop.wait()
    log.info("draining: no new requests; finishing those in flight")
    await presence.announce(ServerStatus.DRAINING)


async def _within(step: Awaitable[None], what: str) -> None:
    try:
        await asyncio.wait_for(step, ANNOUNCE_TIMEOUT_S)
    except TimeoutError:
        log.warning("%s not sent within %.0fs; stopping anyway", what, ANNOUNCE_TIMEOUT_S)
    except asyncio.CancelledError:
        if _cancelled():
            raise
        log.info("%s not sent: the broker connection is gone", what)
