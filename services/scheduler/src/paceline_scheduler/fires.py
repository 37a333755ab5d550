"""The firing loop: every scheduler fires the schedules that are due, by the database's clock.

Each round takes the due schedules (`FOR UPDATE SKIP LOCKED`: schedulers running side by side
share them, never fire one twice) and, for each, writes in one transaction its ledger rows,
the instances its fires start with their start commands (outbox), and its next due time
(paceline_starts.firing); the commands are published after the commit (by the relay if this
scheduler dies first). A scheduler killed mid-round leaves its transaction undone: the rows
unlock and the next round, here or elsewhere, decides the same nominal times again.

Then it starts the buffered fires of schedules whose earlier run ended. It sleeps until the
next due time, at most `POLL_S` (a schedule created or resumed meanwhile is seen then).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from contextlib import suppress
from datetime import timedelta

import asyncpg

from paceline_engine.schedule_spec import FireOutcome
from paceline_infra import db, outbox
from paceline_infra.amqp import Publisher
from paceline_infra.outbox import OutboxMessage
from paceline_starts import firing, schedule_store
from paceline_starts.schedule_store import Schedule

log = logging.getLogger(__name__)

POLL_S = 0.5
"""Longest sleep between rounds."""
BATCH = 100
"""Schedules one transaction fires at most."""
RETRY_S = 2.0
"""Pause after a round failed (the database unreachable, say)."""
_LEVELS = {FireOutcome.STARTED: logging.DEBUG, FireOutcome.START_FAILED: logging.WARNING}
"""A fire that started is in the ledger and the instance's trace; a refused one is news."""


class Fires:
    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, missed_after_s: float) -> None:
        self._pool = pool
        self._publisher = publisher
        self._tolerance = timedelta(seconds=missed_after_s)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                full = await self.fire_due()
                await self.release_buffered()
                wait = 0.0 if full else await self._until_next_due()
            except db.UNAVAILABLE:
                log.warning("schedules: the database is unreachable; retrying in %.0fs", RETRY_S)
                wait = RETRY_S
            except Exception:
                # The loop must outlive any one round: a schedule that breaks it is retried.
                log.exception("schedules: a round failed; retrying in %.0fs", RETRY_S)
                wait = RETRY_S
            if wait > 0:
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)

    async def _until_next_due(self) -> float:
        seconds = await schedule_store.seconds_to_next_due(self._pool)
        return POLL_S if seconds is None else max(0.0, min(POLL_S, seconds))

    async def fire_due(self) -> bool:
        """One round of due schedules; True when it took a full batch (more may be due). The
        round is one transaction; when it fails (a bug, a row that no longer parses), its
        schedules are fired again one by one, each in a savepoint, so that the one at fault
        stays due, logged, and the others fire."""
        try:
            return await self._round(one_by_one=False)
        except db.UNAVAILABLE:
            raise
        except Exception:
            log.exception("schedules: a round failed; firing its schedules one by one")
            return await self._round(one_by_one=True)

    async def _round(self, *, one_by_one: bool) -> bool:
        messages: list[OutboxMessage] = []
        async with self._pool.acquire() as conn, conn.transaction():
            now = await schedule_store.now(conn)
            due = await schedule_store.due(conn, now, BATCH)
            pending = firing.Pending()
            if not one_by_one:
                pending.known = await schedule_store.decided_after(conn, due)
            for schedule in due:
                if one_by_one:
                    work = firing.fire_due(conn, schedule, now, self._tolerance)
                    written = await self._alone(conn, schedule, work)
                else:
                    written = await firing.fire_due(conn, schedule, now, self._tolerance, pending)
                messages += _logged(schedule, written)
            await pending.write(conn)
        await outbox.flush(self._pool, self._publisher, messages)
        return len(due) == BATCH

    async def release_buffered(self) -> None:
        messages: list[OutboxMessage] = []
        async with self._pool.acquire() as conn, conn.transaction():
            now = await schedule_store.now(conn)
            for schedule in await schedule_store.with_buffered(conn, BATCH):
                work = firing.release_buffered(conn, schedule, now)
                messages += _logged(schedule, await self._alone(conn, schedule, work))
        await outbox.flush(self._pool, self._publisher, messages)

    @staticmethod
    async def _alone(
        conn: asyncpg.Connection, schedule: Schedule, work: Awaitable[firing.Written]
    ) -> firing.Written:
        """One schedule in a savepoint: a schedule that cannot be fired is logged and left as
        it was; the others of the round fire."""
        try:
            async with conn.transaction():
                return await work
        except db.UNAVAILABLE:
            raise
        except Exception:
            log.exception("schedule %s: could not fire; it stays due", schedule.id)
            return firing.Written()


def _logged(schedule: Schedule, written: firing.Written) -> list[OutboxMessage]:
    """Log what the schedule's fires became; their messages."""
    for fire in written.fires:
        log.log(
            _LEVELS.get(fire.outcome, logging.INFO),
            "schedule %s: %s %s (%s)%s",
            schedule.id,
            fire.nominal_at.isoformat(),
            fire.outcome.value,
            fire.reason,
            f" instance {fire.instance_id}" if fire.instance_id else "",
        )
    return written.messages
