"""Applies a batch of deliveries: parse, lock the instances, run the engine, commit, publish.

One transaction per batch. Outgoing messages (activity tasks, events) are staged in the outbox
inside it and flushed only after the commit; deliveries are acked only after the commit. A
delivery that cannot be parsed or refers to nothing is dead-lettered with its reason.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID

import asyncpg
from opentelemetry import trace
from pydantic import ValidationError

from paceline_contracts.messages import (
    COMMAND,
    RESULT,
    ActivityError,
    ActivityResult,
    ActivitySnapshot,
    ActivityTask,
    CancelInstance,
    InstanceChanged,
    InstanceSnapshot,
    StartInstance,
)
from paceline_contracts.queues import Queue
from paceline_contracts.states import ActivityStatus
from paceline_engine import machine
from paceline_engine.definitions import Definition
from paceline_infra import outbox, telemetry
from paceline_infra.amqp import Publisher
from paceline_infra.batching import Delivery
from paceline_scheduler import store

log = logging.getLogger(__name__)

Incoming = StartInstance | CancelInstance | ActivityResult


@dataclass(slots=True)
class _Parsed:
    delivery: Delivery
    message: Incoming


@dataclass(slots=True)
class _Outcome:
    """What one batch produced, to be written in its transaction."""

    saved: list[store.InstanceRow] = field(default_factory=list)
    history: list[tuple[UUID, datetime, machine.HistoryEntry]] = field(default_factory=list)
    messages: list[outbox.OutboxMessage] = field(default_factory=list)
    unknown: list[_Parsed] = field(default_factory=list)


def to_event(message: Incoming) -> machine.Event:
    if isinstance(message, StartInstance):
        return machine.Start()
    if isinstance(message, CancelInstance):
        return machine.Cancel(message.reason)
    if message.status is ActivityStatus.COMPLETED:
        return machine.ActivityCompleted(
            message.step,
            message.attempt,
            message.output,
            message.server_id,
            message.started_at,
            message.finished_at,
        )
    error = message.error or ActivityError(kind="failed", message="no error given")
    return machine.ActivityFailed(
        message.step,
        message.attempt,
        error,
        message.server_id,
        message.started_at,
        message.finished_at,
        timed_out=message.status is ActivityStatus.TIMED_OUT,
    )


class Processor:
    def __init__(self, pool: asyncpg.Pool, publisher: Publisher) -> None:
        self._pool = pool
        self._publisher = publisher
        self._definitions = store.DefinitionCache()

    async def handle(self, batch: list[Delivery]) -> None:
        parsed = [p for d in batch if (p := await self._parse(d)) is not None]
        if not parsed:
            return
        try:
            outcome = await self._commit(parsed)
        except (
            OSError,
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.CannotConnectNowError,
            TimeoutError,
        ):
            raise  # the database is unreachable: the caller requeues and backs off
        except Exception:
            if len(parsed) == 1:
                await self._dead_letter(parsed[0], "the scheduler could not apply it")
                log.exception("scheduler: dead-lettered a delivery it could not apply")
                return
            # Find the one delivery that breaks the batch instead of failing all of them.
            log.exception("scheduler: batch of %d failed; applying one at a time", len(parsed))
            for p in parsed:
                await self.handle([p.delivery])
            return
        for p in outcome.unknown:
            await self._dead_letter(p, f"no instance {self._instance_id(p.message)}")
        for p in parsed:
            if p not in outcome.unknown:
                await p.delivery.message.ack()
        await outbox.flush(self._pool, self._publisher, outcome.messages)

    async def _parse(self, delivery: Delivery) -> _Parsed | None:
        try:
            adapter = COMMAND if delivery.queue is Queue.COMMANDS else RESULT
            message: Incoming = adapter.validate_json(delivery.message.body)
        except ValidationError as exc:
            reason = f"not a valid {delivery.queue.value} message: " + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:10]
            )
            await self._publisher.dead_letter(delivery.queue, delivery.message, reason)
            return None
        return _Parsed(delivery, message)

    async def _dead_letter(self, parsed: _Parsed, reason: str) -> None:
        await self._publisher.dead_letter(parsed.delivery.queue, parsed.delivery.message, reason)

    @staticmethod
    def _instance_id(message: Incoming) -> UUID:
        return message.instance_id

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
            now = datetime.now(UTC)
            for instance_id, items in by_instance.items():
                row = rows.get(instance_id)
                if row is None:
                    outcome.unknown.extend(items)
                    continue
                self._apply(row, definitions[(row.definition, row.version)], items, now, outcome)
            await store.save_states(conn, outcome.saved)
            await store.append_history(conn, outcome.history)
            await outbox.stage(conn, outcome.messages)
        return outcome

    def _apply(
        self,
        row: store.InstanceRow,
        definition: Definition,
        items: list[_Parsed],
        now: datetime,
        outcome: _Outcome,
    ) -> None:
        parent = telemetry.extract(items[0].delivery.message.headers)
        kinds = ", ".join(sorted({p.message.type for p in items}))
        with telemetry.tracer().start_as_current_span(
            f"apply {kinds}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "paceline.instance_id": str(row.id),
                "messaging.batch.message_count": len(items),
            },
        ) as span:
            state = row.state
            decisions: list[machine.Decision] = []
            changed: set[str] = set()
            any_change = False
            for p in items:
                transition = machine.apply(definition, state, to_event(p.message), now)
                state = transition.state
                decisions.extend(transition.decisions)
                changed |= transition.changed_steps
                any_change = any_change or transition.changed
                outcome.history.extend((row.id, now, h) for h in transition.history)
                for h in transition.history:
                    span.add_event(
                        h.kind.value,
                        {"reason": h.reason, "step": h.step or "", "attempt": h.attempt or 0},
                    )
            if not any_change:
                return
            state.seq += 1
            row.state = state
            outcome.saved.append(row)
            headers = telemetry.inject()
            for d in decisions:
                if isinstance(d, machine.Dispatch):
                    task = ActivityTask(
                        instance_id=row.id,
                        step=d.step,
                        activity_type=d.activity_type,
                        params=d.params,
                        attempt=d.attempt,
                        restartable=d.restartable,
                        timeout_s=d.timeout_s,
                    )
                    outcome.messages.append(
                        outbox.OutboxMessage.of(
                            Queue.ACTIVITIES, task, headers, not_before=d.not_before
                        )
                    )
            span.set_attribute("paceline.instance.status", state.status.value)
            outcome.messages.append(
                outbox.OutboxMessage.of(Queue.EVENTS, self._event(row, changed), headers)
            )

    @staticmethod
    def _event(row: store.InstanceRow, changed: set[str]) -> InstanceChanged:
        state = row.state
        return InstanceChanged(
            seq=state.seq,
            instance=InstanceSnapshot(
                instance_id=row.id,
                definition=row.definition,
                version=row.version,
                status=state.status,
                started_by=row.started_by,
                started_how=row.started_how,
                created_at=row.created_at,
                started_at=state.started_at,
                finished_at=state.finished_at,
                error=state.error,
            ),
            activities=tuple(
                ActivitySnapshot(
                    step=step,
                    activity_type=a.type,
                    status=a.status,
                    restartable=a.restartable,
                    attempts=a.attempt,
                    server_id=a.server_id,
                    started_at=a.started_at,
                    finished_at=a.finished_at,
                    error=a.error,
                )
                for step, a in state.activities.items()
                if step in changed
            ),
        )
