"""Runs activity messages: each in its own task, result published with a confirm, then acked.

The consume callback only parses and starts a task: aio-pika cancels a running callback when
the connection drops, and an activity must not be cancelled by a network blip. A task waits
for a free slot (the concurrency), claims its attempt (see claims.py), runs the adapter, and
settles. Messages beyond the concurrency are only prefetched: never claimed, so a survivor may
run them if this worker dies. If the broker redelivers an attempt this worker is still running
(its channel was replaced), the new delivery is acked with the running one, never run twice
here; an attempt it already finished gets its result again.

Suspects (messages from the `suspects` queue) run alone, in a runner process of their own
(isolation.py), outside the slots. Nothing of a cancelled instance starts: the task looks its
instance up in `Cancellations` before it claims and again before the adapter starts; what is
running when a cancel arrives is stopped (`stop_instance`), and so is what still runs when a
drain reaches its grace deadline. A stopped attempt is reported (CANCELLED, or INTERRUPTED for
a drain), with whether it had started: its effect may have happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError
from opentelemetry import trace
from pydantic import ValidationError

from paceline_contracts.messages import (
    ACTIVITY_TASK,
    ActivityError,
    ActivityQuarantined,
    ActivityResult,
    ActivityTask,
    InFlightActivity,
    InstanceCancelled,
)
from paceline_contracts.queues import Queue
from paceline_contracts.states import ActivityStatus, ErrorKind
from paceline_infra import telemetry
from paceline_infra.amqp import Outgoing, Publisher, invalid_reason
from paceline_worker.adapters import ActivityFailure, run_activity
from paceline_worker.cancellations import Cancellations
from paceline_worker.claims import Claimer
from paceline_worker.isolation import RunnerCrashed, run_isolated

log = logging.getLogger(__name__)

AttemptKey = tuple[uuid.UUID, str, int]
Ending = tuple[ActivityStatus, Any, ActivityError | None]
_FINISHED_KEPT = 10_000
_STOP_WAIT_S = 20.0
"""How long a drain waits for stopped activities to report, after their grace deadline."""


_ERROR_STATUSES = {ActivityStatus.FAILED, ActivityStatus.TIMED_OUT, ActivityStatus.INTERRUPTED}


@dataclass(slots=True, eq=False)  # compared and hashed by identity: one per delivery
class _InFlight:
    task: ActivityTask
    deliveries: list[AbstractIncomingMessage]
    redelivered: bool
    delivery_count: int
    source: Queue
    runner: asyncio.Task[None] | None = None
    started: bool = False
    """The adapter was started: from here on, cancelling it may leave an effect behind."""
    adapter: asyncio.Task[Any] | None = None
    stop: ActivityStatus | None = None
    """Why this worker stopped the adapter: CANCELLED (a cancel) or INTERRUPTED (a drain)."""


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    server_id: str
    concurrency: int
    """Activities run at once; more may be prefetched, but not started nor claimed."""
    max_deliveries: int
    """A backstop: a message delivered this often is quarantined without being run. (The
    crash budget, counted by the scheduler from claims, normally acts first.)"""


class ActivityRunner:
    def __init__(
        self, config: RunnerConfig, publisher: Publisher, claimer: Claimer, http: httpx.AsyncClient
    ) -> None:
        self.cancellations = Cancellations(config.server_id, self.stop_instance)
        self._server_id = config.server_id
        self._max_deliveries = config.max_deliveries
        self._slots = asyncio.Semaphore(config.concurrency)
        self._publisher = publisher
        self._claimer = claimer
        self._http = http
        self._flights: set[_InFlight] = set()
        """Every delivery being handled: waiting for a slot, claiming, or running."""
        self._running: dict[AttemptKey, _InFlight] = {}
        """By the attempt actually run (the one the scheduler granted)."""
        self._finished: OrderedDict[AttemptKey, Outgoing] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()

    def in_flight(self) -> list[InFlightActivity]:
        """What this worker runs or holds: what a drain waits for."""
        return [
            InFlightActivity(
                instance_id=f.task.instance_id, step=f.task.step, attempt=f.task.attempt
            )
            for f in self._flights
        ]

    def stop_instance(self, cancel: InstanceCancelled) -> None:
        """A cancel: stop what of the instance runs here (what waits will not start)."""
        for flight in list(self._flights):
            if flight.task.instance_id != cancel.instance_id:
                continue
            if flight.adapter is not None and not flight.adapter.done() and flight.stop is None:
                log.info(
                    "stopping %s/%s attempt %d: its instance was cancelled by %s",
                    cancel.instance_id,
                    flight.task.step,
                    flight.task.attempt,
                    cancel.by,
                )
                flight.stop = ActivityStatus.CANCELLED
                flight.adapter.cancel()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await self._take(message, Queue.ACTIVITIES)

    async def on_suspect(self, message: AbstractIncomingMessage) -> None:
        await self._take(message, Queue.SUSPECTS)

    async def _take(self, message: AbstractIncomingMessage, source: Queue) -> None:
        try:
            await self._receive(message, source)
        except Exception:
            # E.g. the publisher's channel is not restored yet after a broker restart.
            log.exception("could not take an activity message; it goes back to the queue")
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)

    async def _receive(self, message: AbstractIncomingMessage, source: Queue) -> None:
        try:
            task = ACTIVITY_TASK.validate_json(message.body)
        except ValidationError as exc:
            await self._publisher.dead_letter(
                source, message, invalid_reason("activity message", exc)
            )
            return
        delivery_count = _delivery_count(message)
        if delivery_count >= self._max_deliveries:
            await self._quarantine(task, message, delivery_count + 1, source)
            return
        redelivered = message.redelivered or delivery_count > 0
        if task.restartable and not redelivered:
            # A second copy of an attempt this worker runs or ran (a repeated publish).
            key = (task.instance_id, task.step, task.attempt)
            if (running := self._running.get(key)) is not None:
                running.deliveries.append(message)
                return
            if (result := self._finished.get(key)) is not None:
                self._spawn(self._settle([message], result))
                return
        flight = _InFlight(task, [message], redelivered, delivery_count, source)
        self._flights.add(flight)
        flight.runner = asyncio.create_task(self._run(flight, message.headers))

    async def _quarantine(
        self, task: ActivityTask, message: AbstractIncomingMessage, deliveries: int, source: Queue
    ) -> None:
        """A poison message: it took a worker down again and again. Tell the scheduler (which
        flags the activity), then move it to the dead-letter queue instead of running it."""
        notice = ActivityQuarantined(
            instance_id=task.instance_id,
            step=task.step,
            attempt=task.attempt,
            deliveries=deliveries,
            server_id=self._server_id,
        )
        message_id = uuid.uuid4().hex
        await self._publisher.publish(
            Outgoing(
                Queue.RESULTS,
                notice.model_dump_json().encode(),
                notice.type,
                message_id,
                telemetry.produced(
                    Queue.RESULTS.value, message_id, context=telemetry.extract(message.headers)
                ),
            )
        )
        await self._publisher.dead_letter(
            source,
            message,
            f"crash budget exhausted: delivered {deliveries} times, a worker went down each time",
        )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run(self, flight: _InFlight, headers: Any) -> None:
        try:
            # A suspect runs in a process of its own, outside the slots: it never waits behind
            # long activities, and it takes nothing of this worker down if it crashes.
            slot = contextlib.nullcontext() if flight.task.isolated else self._slots
            async with slot:
                outcome = await self._claim_and_execute(flight, headers)
            if outcome is not None:
                key, result = outcome
                self._finished[key] = result
                while len(self._finished) > _FINISHED_KEPT:
                    self._finished.popitem(last=False)
                self._running.pop(key, None)
                await self._settle(flight.deliveries, result)
        finally:
            self._flights.discard(flight)

    async def _claim_and_execute(
        self, flight: _InFlight, headers: Any
    ) -> tuple[AttemptKey, Outgoing] | None:
        """Claim when the rule asks for it, then run; None when there is nothing to run
        here (refused, or joined to the same attempt already running or done here).

        Two spans: `process <queue>` (receipt and claim) ends before the activity starts,
        so it is exported even if this worker is killed while the activity runs (the
        scheduler then draws the lost attempt); `activity <type>` covers the run itself."""
        task = flight.task
        known = {**telemetry.carried(headers), **self._attributes(task, task.attempt)}
        with telemetry.tracer().start_as_current_span(
            f"process {flight.source.value}",
            context=telemetry.extract(headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                **telemetry.messaging(
                    "process", flight.source.value, flight.deliveries[0].message_id
                ),
                **known,
                "messaging.rabbitmq.redelivered": flight.redelivered,
                "paceline.delivery_count": flight.delivery_count,
            },
        ) as span:
            claimed = await self._claim(flight, span)
            if claimed is None or isinstance(claimed[1], Outgoing):
                return claimed
            key, attempt = claimed
            self._running[key] = flight
            flight.started = True
            activity_context = trace.set_span_in_context(span)
        with telemetry.tracer().start_as_current_span(
            f"activity {task.activity_type}",
            context=activity_context,
            attributes={**known, "paceline.attempt": attempt},
        ) as span:
            started_at = datetime.now(UTC)
            status, output, error = await self._execute(flight)
            span.set_attribute("paceline.activity.status", status.value)
            if status in _ERROR_STATUSES:
                # The kind only: an error's message may quote a command's stderr.
                kind = error.kind if error is not None else status.value
                telemetry.fail(span, str(kind), f"{status.value}: {kind}")
                log.info(
                    "%s/%s attempt %d ended %s (%s)",
                    task.instance_id,
                    task.step,
                    attempt,
                    status.value,
                    kind,
                )
                if error is not None and error.outcome_unknown:
                    span.set_attribute("paceline.outcome_unknown", True)
            cancel = self.cancellations.get(task.instance_id)
            report = ActivityResult(
                instance_id=task.instance_id,
                step=task.step,
                attempt=attempt,
                status=status,
                output=output,
                error=error,
                server_id=self._server_id,
                started_at=started_at,
                finished_at=datetime.now(UTC),
                cancelled_by=cancel.by if cancel and status is ActivityStatus.CANCELLED else None,
            )
            return key, self._outgoing(report)

    def _attributes(self, task: ActivityTask, attempt: int) -> dict[str, Any]:
        return {
            "paceline.instance_id": str(task.instance_id),
            "paceline.step": task.step,
            "paceline.attempt": attempt,
            "paceline.activity.type": task.activity_type,
            "paceline.restartable": task.restartable,
            "paceline.server": self._server_id,
        }

    async def _claim(
        self, flight: _InFlight, span: trace.Span
    ) -> tuple[AttemptKey, int] | tuple[AttemptKey, Outgoing] | None:
        """The attempt to run (its key and number); a report to send instead (not started:
        cancelled); None when there is nothing to do here."""
        task = flight.task
        attempt = task.attempt
        if (cancel := self.cancellations.get(task.instance_id)) is not None:
            span.add_event("not started: its instance was cancelled", {"paceline.by": cancel.by})
            return (task.instance_id, task.step, attempt), self._dropped(task, cancel)
        if not task.restartable or flight.redelivered or task.isolated:
            # Only the scheduler knows what happened to this attempt since this copy was
            # sent (restarted elsewhere? flagged?): ask, and run what it grants.
            reply = await self._claimer.claim(
                task, redelivered=flight.redelivered, delivery_count=flight.delivery_count
            )
            span.add_event(
                "claim answered",
                {"paceline.granted": reply.granted, "paceline.reason": reply.reason},
            )
            if not reply.granted:
                log.info(
                    "not running %s/%s attempt %d: %s",
                    task.instance_id,
                    task.step,
                    task.attempt,
                    reply.reason,
                )
                if reply.quarantine:
                    for delivery in flight.deliveries:
                        await self._publisher.dead_letter(
                            flight.source,
                            delivery,
                            f"crash budget exhausted: {reply.reason}",
                        )
                else:
                    await self._ack(flight.deliveries)
                return None
            attempt = reply.attempt
            span.set_attribute("paceline.attempt", attempt)
            key = (task.instance_id, task.step, attempt)
            if (running := self._running.get(key)) is not None:
                running.deliveries.extend(flight.deliveries)
                return None
            if (result := self._finished.get(key)) is not None:
                await self._settle(flight.deliveries, result)
                return None
        else:
            key = (task.instance_id, task.step, attempt)
            # Confirmed by the broker before anything runs: if this worker dies, the
            # scheduler learns who held the attempt (but no answer is awaited).
            await self._claimer.notify(task)
            if _channel_closed(flight.deliveries[0]):
                # A delivery read after its connection died (e.g. buffered while this
                # worker was frozen): the broker has handed it to another worker already.
                log.info(
                    "not running %s/%s attempt %d: its delivery's channel closed",
                    task.instance_id,
                    task.step,
                    attempt,
                )
                return None
        if (cancel := self.cancellations.get(task.instance_id)) is not None:
            # Claimed (or noticed) before the cancel reached this worker: not started.
            span.add_event("not started: its instance was cancelled", {"paceline.by": cancel.by})
            return key, self._dropped(task, cancel, attempt)
        return key, attempt

    def _dropped(
        self, task: ActivityTask, cancel: InstanceCancelled, attempt: int | None = None
    ) -> Outgoing:
        """The report of an attempt not started because its instance was cancelled."""
        log.info(
            "not starting %s/%s attempt %d: its instance was cancelled by %s",
            task.instance_id,
            task.step,
            task.attempt,
            cancel.by,
        )
        now = datetime.now(UTC)
        report = ActivityResult(
            instance_id=task.instance_id,
            step=task.step,
            attempt=attempt if attempt is not None else task.attempt,
            status=ActivityStatus.CANCELLED,
            error=ActivityError(
                kind=ErrorKind.CANCELLED, message=f"not started: cancelled by {cancel.by}"
            ),
            server_id=self._server_id,
            started_at=now,
            finished_at=now,
            cancelled_by=cancel.by,
        )
        return self._outgoing(report)

    def _outgoing(self, report: ActivityResult) -> Outgoing:
        message_id = uuid.uuid4().hex
        return Outgoing(
            Queue.RESULTS,
            report.model_dump_json().encode(),
            report.type,
            message_id,
            telemetry.produced(Queue.RESULTS.value, message_id),
        )

    async def _adapter(self, task: ActivityTask) -> Any:
        if task.isolated:
            return await run_isolated(task)
        return await run_activity(task.activity_type, task.params, http=self._http)

    async def _execute(self, flight: _InFlight) -> Ending:
        task = flight.task
        # Its own task, so that a cancel or a drain can stop the adapter and nothing else.
        flight.adapter = asyncio.create_task(self._adapter(task))
        try:
            async with asyncio.timeout(task.timeout_s):
                output = await flight.adapter
        except TimeoutError:
            message = f"ran longer than its timeout of {task.timeout_s:g}s; stopped"
            return (
                ActivityStatus.TIMED_OUT,
                None,
                ActivityError(kind=ErrorKind.TIMEOUT, message=message, outcome_unknown=True),
            )
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if flight.stop is None or (current is not None and current.cancelling()):
                raise  # this worker itself is being stopped, not only the adapter
            return _stopped(flight.stop, self._server_id)
        except RunnerCrashed as crash:
            error = ActivityError(
                kind=ErrorKind.RUNNER_CRASHED, message=str(crash), outcome_unknown=True
            )
            return ActivityStatus.INTERRUPTED, None, error
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
        await self._ack(deliveries)

    async def _ack(self, deliveries: list[AbstractIncomingMessage]) -> None:
        for delivery in deliveries:
            try:
                await delivery.ack()
            except Exception:
                # and the finished-attempt cache (or the claim) answers that redelivery.
                log.info("ack failed for a delivery of a closed channel")

    async def drain(self, grace_s: float) -> int:
        """Friendly shutdown: hand back what has not started at once; give what has started
        up to `grace_s` to finish; stop the rest and report them as cut by the drain (their
        effect may have happened: the scheduler runs a restartable one again and flags the
        others). Returns how many were stopped while running."""
        waiting = [f for f in self._flights if not f.started]
        for flight in waiting:
            if flight.runner is not None:
                flight.runner.cancel()
        await asyncio.gather(*(f.runner for f in waiting if f.runner), return_exceptions=True)
        for flight in waiting:
            for delivery in flight.deliveries:
                try:
                    await delivery.nack(requeue=True)
                except Exception:
                    log.debug("nack failed", exc_info=True)
        running = {f.runner: f for f in self._flights if f.runner and f.started}
        if not running:
            return 0
        _, pending = await asyncio.wait(running, timeout=grace_s)
        for runner in pending:
            flight = running[runner]
            if flight.adapter is not None and not flight.adapter.done() and flight.stop is None:
                flight.stop = ActivityStatus.INTERRUPTED
                flight.adapter.cancel()
        if pending:
            # Each stopped adapter reports; one that cannot (the broker is away) stays unacked,
            # and the broker hands it to a survivor under the failover rule.
            _, stuck = await asyncio.wait(pending, timeout=_STOP_WAIT_S)
            for runner in stuck:
                runner.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        return len(pending)


def _channel_closed(message: AbstractIncomingMessage) -> bool:
    try:
        return message.channel.is_closed
    except ChannelInvalidStateError:  # aio-pika's way of saying so
        return True


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """Earlier deliveries of this message that were not acked (quorum queues count them)."""
    count = (message.headers or {}).get("x-delivery-count")
    return count if isinstance(count, int) else 0


def _stopped(why: ActivityStatus, server_id: str) -> Ending:
    """The report of an adapter this worker stopped while it ran: its effect may have happened."""
    if why is ActivityStatus.CANCELLED:
        error = ActivityError(
            kind=ErrorKind.CANCELLED,
            message=f"stopped while running on {server_id}: its instance was cancelled",
            outcome_unknown=True,
        )
    else:
        error = ActivityError(
            kind=ErrorKind.DRAIN_DEADLINE,
            message=f"still running on {server_id} when its drain reached the grace deadline",
            outcome_unknown=True,
        )
    return why, None, error
