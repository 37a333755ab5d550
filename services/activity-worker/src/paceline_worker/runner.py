"""Runs activity messages: each in its own task, result published with a confirm, then acked.

The consume callback only parses and starts a task: aio-pika cancels a running callback when the
connection drops, and an activity must not be cancelled by a network blip. If the broker
redelivers an attempt this worker is still running (its channel was replaced), the new delivery
is attached to the running task and acked with it, never run a second time here; an attempt it
already finished gets its result again.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import trace
from pydantic import ValidationError

from paceline_contracts.messages import ACTIVITY_TASK, ActivityError, ActivityResult, ActivityTask
from paceline_contracts.queues import Queue
from paceline_contracts.states import ActivityStatus
from paceline_infra import telemetry
from paceline_infra.amqp import Outgoing, Publisher
from paceline_worker.adapters import ActivityFailure, run_activity

log = logging.getLogger(__name__)

AttemptKey = tuple[uuid.UUID, str, int]
_FINISHED_KEPT = 10_000


@dataclass(slots=True)
class _InFlight:
    task: ActivityTask
    deliveries: list[AbstractIncomingMessage]
    runner: asyncio.Task[None] | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class ActivityRunner:
    def __init__(self, server_id: str, publisher: Publisher, http: httpx.AsyncClient) -> None:
        self._server_id = server_id
        self._publisher = publisher
        self._http = http
        self._in_flight: dict[AttemptKey, _InFlight] = {}
        self._finished: OrderedDict[AttemptKey, Outgoing] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> list[ActivityTask]:
        return [f.task for f in self._in_flight.values()]

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            task = ACTIVITY_TASK.validate_json(message.body)
        except ValidationError as exc:
            reason = "not a valid activity message: " + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:10]
            )
            await self._publisher.dead_letter(Queue.ACTIVITIES, message, reason)
            return
        key = (task.instance_id, task.step, task.attempt)
        if (running := self._in_flight.get(key)) is not None:
            running.deliveries.append(message)
            log.info("attempt %s is already running here; will ack its redelivery with it", key)
            return
        if (result := self._finished.get(key)) is not None:
            # Finished here already (its ack was lost with a channel): answer it again.
            resettle = asyncio.create_task(self._settle([message], result))
            self._background.add(resettle)
            resettle.add_done_callback(self._background.discard)
            return
        flight = _InFlight(task, [message])
        self._in_flight[key] = flight
        flight.runner = asyncio.create_task(
            self._run(key, flight, message.headers), name=f"activity {key}"
        )

    async def _run(self, key: AttemptKey, flight: _InFlight, headers: Any) -> None:
        task = flight.task
        with telemetry.tracer().start_as_current_span(
            f"run {task.activity_type}",
            context=telemetry.extract(headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "paceline.instance_id": str(task.instance_id),
                "paceline.step": task.step,
                "paceline.attempt": task.attempt,
                "paceline.restartable": task.restartable,
                "paceline.server_id": self._server_id,
            },
        ) as span:
            status, output, error = await self._execute(task)
            span.set_attribute("paceline.activity.status", status.value)
            result = ActivityResult(
                instance_id=task.instance_id,
                step=task.step,
                attempt=task.attempt,
                status=status,
                output=output,
                error=error,
                server_id=self._server_id,
                started_at=flight.started_at,
                finished_at=datetime.now(UTC),
            )
            outgoing = Outgoing(
                Queue.RESULTS,
                result.model_dump_json().encode(),
                result.type,
                str(uuid.uuid4()),
                telemetry.inject(),
            )
        self._finished[key] = outgoing
        while len(self._finished) > _FINISHED_KEPT:
            self._finished.popitem(last=False)
        del self._in_flight[key]
        await self._settle(flight.deliveries, outgoing)

    async def _execute(
        self, task: ActivityTask
    ) -> tuple[ActivityStatus, Any, ActivityError | None]:
        try:
            async with asyncio.timeout(task.timeout_s):
                output = await run_activity(task.activity_type, task.params, http=self._http)
        except TimeoutError:
            return (
                ActivityStatus.TIMED_OUT,
                None,
                ActivityError(
                    kind="timeout", message=f"ran longer than its timeout of {task.timeout_s:g}s"
                ),
            )
        except ActivityFailure as failure:
            return ActivityStatus.FAILED, None, failure.to_error()
        except Exception as exc:
            log.exception("adapter %s raised", task.activity_type)
            return (
                ActivityStatus.FAILED,
                None,
                ActivityError(kind="adapter", message=f"{type(exc).__name__}: {exc}"),
            )
        return ActivityStatus.COMPLETED, output, None

    async def _settle(self, deliveries: list[AbstractIncomingMessage], result: Outgoing) -> None:
        """Publish the result until the broker confirms it, then ack. Never ack first: a crash
        in between would lose the result and the activity with it."""
        delay = 0.1
        while True:
            try:
                await self._publisher.publish(result)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("result publish failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        for delivery in deliveries:
            try:
                await delivery.ack()
            except Exception:
                # and the finished-attempt cache answers that redelivery with this result.
                log.info("ack failed for a delivery of a closed channel")

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for in-flight activities; cancel the rest (left unacked, the
        broker hands them to a survivor). Returns how many were cancelled."""
        tasks = [f.runner for f in self._in_flight.values() if f.runner is not None]
        if not tasks:
            return 0
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)
