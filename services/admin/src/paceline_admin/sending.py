"""Commands through the transactional outbox: a request is recorded with the messages it
causes in one transaction, and they are published right after the commit.

A request is refused (503, nothing recorded) when the broker connection is down at the start,
so that a recorded request is one the broker could take. Once committed, the messages are
durable: what the flush does not publish (the broker dropped in between, or is slow), the
scheduler's outbox relay publishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from paceline_admin.problems import RETRY_SOON, ApiError
from paceline_infra import outbox
from paceline_infra.amqp import Publisher
from paceline_infra.outbox import OutboxMessage

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 5.0
"""After this the answer goes out anyway: the messages are committed in the outbox, and the
outbox relay publishes whatever a flush did not."""


def require_broker(connection: AbstractRobustConnection, what: str) -> None:
    """503 when the broker connection is down: then nothing is recorded (try again)."""
    if connection.is_closed or not connection.connected.is_set():
        raise ApiError(
            503,
            f"the message broker is not connected: the {what} was not recorded or sent; try again",
            kind="broker-unavailable",
            headers=RETRY_SOON,
        )


async def flush(
    pool: asyncpg.Pool, publisher: Publisher, messages: Sequence[OutboxMessage], what: str
) -> None:
    """Publish committed outbox messages now, waiting at most FLUSH_TIMEOUT_S."""
    try:
        async with asyncio.timeout(FLUSH_TIMEOUT_S):
            await outbox.flush(pool, publisher, messages)
    except TimeoutError:
        log.warning(
            "%s not confirmed within %.0fs; the outbox relay sends it", what, FLUSH_TIMEOUT_S
        )
