"""Applies a batch of deliveries: parse, lock the instances, run the engine, commit, publish.

One transaction per batch. Outgoing messages (activity tasks, timers, events) are staged in the
outbox inside it and flushed only after the commit; deliveries are acked and claims answered
only after the commit. A delivery that cannot be parsed or refers to nothing is dead-lettered
with its reason.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
from pydantic import TypeAdapter, ValidationError

from paceline_contracts.messages import CLAIM, COMMAND, RESULT, ClaimReply, FireTimer
from paceline_contracts.queues import Queue
from paceline_engine import approvals as approvals_engine
from paceline_engine import machine
from paceline_engine.definitions import Definition
from paceline_engine.events import (
    Abandon,
    AnswerClaim,
    CloseApproval,
    CreateApproval,
    EscalateApproval,
    HistoryEntry,
    Policy,
    RecordSignal,
)
from paceline_engine.state import NotLoaded
from paceline_infra import db, outbox
from paceline_infra.amqp import Publisher, invalid_reason
from paceline_infra.batching import Delivery
from paceline_scheduler import approval_store, store, tracing
from paceline_scheduler.translate import Incoming, instance_changed, to_event, to_outbox

log = logging.getLogger(__name__)

_MAX_LOADS = 8
"""Reads one event may ask for (each answers everything the engine asked): more is a bug."""

_PARSERS: dict[Queue, TypeAdapter[Any]] = {
    Queue.COMMANDS: COMMAND,
    Queue.RESULTS: RESULT,
    Queue.CLAIMS: CLAIM,
}


async def _decided_first(conn: asyncpg.Connection, instance_id: UUID, message: Incoming) -> bool:
    """An approval's timeout whose approval the admin API decided before it came due."""
    if not isinstance(message, FireTimer) or message.purpose != approvals_engine.TIMEOUT:
        return False
    return not await approval_store.timeout_may_decide(
        conn, instance_id, message.step, message.attempt
    )


@dataclass(slots=True)
class _Parsed:
    delivery: Delivery
    message: Incoming
    abandon: str | None = None
    """Set when the message was dead-lettered: apply `Abandon` with this reason instead."""


def _error_text() -> str:
    """The exception being handled, in one line (for a dead-letter reason)."""
    error = sys.exc_info()[1]
    return f"{type(error).__name__}: {error}"[:300]


@dataclass(slots=True)
class _Outcome:
    """What one batch produced, to be written in its transaction and sent after it."""

    saved: list[store.InstanceRow] = field(default_factory=list)
    changed: dict[UUID, set[str]] = field(default_factory=dict)
    """Activities changed, by instance: the rows to write."""
    signals: list[tuple[RecordSignal, datetime]] = field(default_factory=list)
    """What became of signals, to write on their rows."""
    history: list[tuple[UUID, datetime, HistoryEntry]] = field(default_factory=list)
    messages: list[outbox.OutboxMessage] = field(default_factory=list)
    replies: list[tuple[_Parsed, ClaimReply]] = field(default_factory=list)
    unknown: list[_Parsed] = field(default_factory=list)


class Processor:
    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, policy: Policy) -> None:
        self._pool = pool
        self._publisher = publisher
        self._policy = policy
        self._definitions = store.DefinitionCache()

    async def handle(self, batch: list[Delivery]) -> None:
        parsed = [p for d in batch if (p := await self._parse(d)) is not None]
        if not parsed:
            return
        try:
            outcome = await self._commit(parsed)
        except db.UNAVAILABLE:
            raise  # the database is unreachable: the caller requeues and backs off
        except Exception:
            if not await self._database_answers():
                raise  # not this batch's fault: the caller requeues it and backs off
            if len(parsed) == 1:
                log.exception("scheduler: dead-lettering a delivery it could not apply")
                reason = f"the scheduler could not apply it: {_error_text()}"
                await self._dead_letter(parsed[0], reason)
                await self._abandon(parsed[0], reason)
                return
            # Find the one delivery that breaks the batch instead of failing all of them.
            log.exception("scheduler: batch of %d failed; applying one at a time", len(parsed))
            for p in parsed:
                await self.handle([p.delivery])
            return
        for p, reply in outcome.replies:
            await self._reply(p, reply)
        for p in outcome.unknown:
            await self._dead_letter(p, f"no instance {p.message.instance_id}")
        unknown = {id(p) for p in outcome.unknown}
        for p in parsed:
            if id(p) not in unknown:
                await p.delivery.message.ack()
        await outbox.flush(self._pool, self._publisher, outcome.messages)

    async def _abandon(self, parsed: _Parsed, reason: str) -> None:
        """A message of the instance could not be applied and was dead-lettered: the instance
        fails, with the reason, rather than wait for ever for what that message would have
        done. When even that cannot be applied, the error is logged."""
        dead = f"{parsed.delivery.queue.value}.dead"
        what = f"a {parsed.message.type} message could not be applied ({reason}); moved to {dead}"
        try:
            outcome = await self._commit([_Parsed(parsed.delivery, parsed.message, what)])
        except Exception:
            log.exception(
                "scheduler: could not fail instance %s either", parsed.message.instance_id
            )
            return
        await outbox.flush(self._pool, self._publisher, outcome.messages)

    async def _database_answers(self) -> bool:
        try:
            await self._pool.fetchval("SELECT 1")
        except Exception:  # any failure here means: do not blame the message
            return False
        return True

    async def _parse(self, delivery: Delivery) -> _Parsed | None:
        try:
            message = _PARSERS[delivery.queue].validate_json(delivery.message.body)
        except ValidationError as exc:
            reason = invalid_reason(f"{delivery.queue.value} message", exc)
            await self._publisher.dead_letter(delivery.queue, delivery.message, reason)
            return None
        return _Parsed(delivery, message)

    async def _dead_letter(self, parsed: _Parsed, reason: str) -> None:
        await self._publisher.dead_letter(parsed.delivery.queue, parsed.delivery.message, reason)

    async def _reply(self, parsed: _Parsed, reply: ClaimReply) -> None:
        incoming = parsed.delivery.message
        if not incoming.reply_to or not incoming.correlation_id:
            return
        try:
            await self._publisher.reply(
                incoming.reply_to, incoming.correlation_id, reply.model_dump_json().encode()
            )
        except Exception as exc:
            log.warning("claim reply to %s failed: %s", incoming.reply_to, exc)

    async def _commit(self, parsed: list[_Parsed]) -> _Outcome:
        by_instance: dict[UUID, list[_Parsed]] = defaultdict(list)
        for p in parsed:
            by_instance[p.message.instance_id].append(p)
        outcome = _Outcome()
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await store.lock_instances(conn, list(by_instance))
            definitions = await self._definitions.get_many(
                conn, {(r.definition, r.version) for r in rows.values()}
            )
            # The activities the messages name, for every instance in one read; the engine
            # asks for anything else it needs (NotLoaded).
            named: dict[UUID, set[str]] = defaultdict(set)
            for p in parsed:
                if (step := getattr(p.message, "step", None)) is not None:
                    named[p.message.instance_id].add(step)
            await store.load_steps(conn, rows, named)
            # The database's clock, not this host's: every scheduler (and the outbox relay that
            # fires timers) then agrees on what time it is.
            now: datetime = await conn.fetchval("SELECT clock_timestamp()")
            for instance_id, items in by_instance.items():
                row = rows.get(instance_id)
                if row is None:
                    outcome.unknown.extend(items)
                    continue
                definition = definitions[(row.definition, row.version)]
                await self._apply(conn, row, definition, items, now, outcome)
            await store.save_states(conn, outcome.saved, outcome.changed, definitions)
            await store.record_signals(conn, outcome.signals)
            await store.append_history(conn, outcome.history)
            await outbox.stage(conn, outcome.messages)
        return outcome

    async def _apply(
        self,
        conn: asyncpg.Connection,
        row: store.InstanceRow,
        definition: Definition,
        items: list[_Parsed],
        now: datetime,
        outcome: _Outcome,
    ) -> None:
        queue = items[0].delivery.queue.value
        messages = [p.delivery.message for p in items]
        with tracing.consuming(row, queue, messages) as span:
            state = row.state
            decisions = []
            changed: set[str] = set()
            any_change = False
            approvals: list[approval_store.ApprovalDecision] = []
            for p in items:
                event = Abandon(p.abandon) if p.abandon else to_event(p.message)
                if await _decided_first(conn, row.id, p.message):
                    continue  # a decision recorded first wins; its command ends the approval
                for _ in range(_MAX_LOADS):
                    try:
                        transition = machine.apply(
                            definition, state, event, now, self._policy, trigger=row.trigger
                        )
                        break
                    except NotLoaded as need:
                        # `state` is what the earlier events of the batch made it: loading
                        # adds only activities it does not hold.
                        row.state = state
                        await store.load_needed(conn, row, need)
                else:
                    raise RuntimeError(f"the engine kept asking for more to apply {event!r}")
                tracing.record(
                    span,
                    row,
                    state,
                    transition.state,
                    transition.history,
                    now,
                    event,
                )
                state = transition.state
                changed |= transition.changed_steps
                any_change = any_change or transition.changed
                outcome.history.extend((row.id, now, h) for h in transition.history)
                for d in transition.decisions:
                    if isinstance(d, AnswerClaim):
                        outcome.replies.append(
                            (
                                p,
                                ClaimReply(
                                    granted=d.granted,
                                    attempt=d.attempt,
                                    reason=d.reason,
                                    quarantine=d.quarantine,
                                ),
                            )
                        )
                    elif isinstance(d, RecordSignal):
                        outcome.signals.append((d, now))
                    elif isinstance(d, CreateApproval | EscalateApproval | CloseApproval):
                        approvals.append(d)
                    else:
                        decisions.append(d)
            if not any_change:
                return
            state.seq += 1
            row.state = state
            outcome.saved.append(row)
            outcome.changed[row.id] = changed
            outcome.messages.extend(
                await approval_store.apply(
                    conn, row.id, row.definition, row.started_by, approvals, now
                )
            )
            outcome.messages.extend(
                m for d in decisions if (m := to_outbox(row, d, now)) is not None
            )
            outcome.messages.append(
                outbox.OutboxMessage.of(Queue.EVENTS, instance_changed(row, changed))
            )
