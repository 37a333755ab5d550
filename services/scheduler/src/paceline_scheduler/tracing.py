"""The scheduler's spans: one CONSUMER span per instance per batch, its decisions as events
(flags and losses also as log lines), and a span for each attempt lost with its worker.

A SIGKILLed worker never ends (so never exports) the span of the attempt it ran. The scheduler
is the one that notices the loss (a redelivered claim, an expired deadline), so it draws the
lost attempt itself: from the claim to the moment of the loss, status ERROR.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from paceline_contracts.states import InstanceStatus
from paceline_engine.events import DeadlineExpired, HistoryEntry, HistoryKind
from paceline_engine.state import ActivityState, InstanceState
from paceline_infra import telemetry
from paceline_scheduler.store import InstanceRow

_ERROR_STATUSES = {InstanceStatus.FAILED, InstanceStatus.FLAGGED}
_TIMED_OUT = {HistoryKind.FLAGGED, HistoryKind.TIMED_OUT}
_LOGGED = {HistoryKind.FLAGGED, HistoryKind.REDELIVERED, HistoryKind.RESTARTED}
"""Decisions an operator watching only the logs must see."""
log = logging.getLogger(__name__)


def instance_attributes(row: InstanceRow) -> dict[str, Any]:
    return {
        "paceline.instance_id": str(row.id),
        "paceline.definition": row.definition,
        "paceline.version": row.version,
    }


@contextmanager
def consuming(
    row: InstanceRow, queue: str, messages: Sequence[AbstractIncomingMessage]
) -> Iterator[trace.Span]:
    """`process <queue>`: the messages of one batch for one instance. Its parent is the first
    message's producer (so the trace and Tempo's service graph follow the message); every
    message of a larger batch is linked."""
    first = messages[0]
    attributes = {
        **telemetry.messaging("process", queue, first.message_id),
        **instance_attributes(row),
        "messaging.batch.message_count": len(messages),
    }
    if first.correlation_id:
        attributes["messaging.message.conversation_id"] = first.correlation_id
    delivery_count = (first.headers or {}).get("x-delivery-count")
    if isinstance(delivery_count, int):
        attributes["paceline.delivery_count"] = delivery_count
    links = telemetry.batch_links([m.headers for m in messages]) if len(messages) > 1 else []
    with telemetry.tracer().start_as_current_span(
        f"process {queue}",
        context=telemetry.extract(first.headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
    ) as span:
        yield span


_NOT_TRACED = "(error message not traced)"


def _error_messages(state: InstanceState, event: object) -> list[str]:
    """Error messages a history reason may quote: they come from adapters (a command's
    stderr, a URL) and stay out of spans; the history and the API keep them."""
    errors = [state.error, getattr(event, "error", None)]
    errors += [a.error for a in state.activities.values()]
    messages = {e.message for e in errors if e is not None and e.message}
    return sorted(messages, key=len, reverse=True)


def _scrubbed(reason: str, messages: Sequence[str]) -> str:
    for message in messages:
        reason = reason.replace(message, _NOT_TRACED)
    return reason


def _event_attributes(
    entry: HistoryEntry, state: InstanceState, messages: Sequence[str]
) -> dict[str, Any]:
    attributes: dict[str, Any] = {"paceline.reason": _scrubbed(entry.reason, messages)}
    if entry.step is not None:
        attributes["paceline.step"] = entry.step
    if entry.attempt is not None:
        attributes["paceline.attempt"] = entry.attempt
    data = entry.data
    for key, name in (
        ("server", "paceline.holder"),
        ("since", "paceline.since"),
        ("to", "paceline.redelivered_to"),
        ("delivery", "paceline.delivery_count"),
        ("by", "paceline.by"),
        ("flag", "paceline.flag.kind"),
    ):
        if data.get(key) is not None:
            attributes[name] = data[key]
    if entry.kind is HistoryKind.FLAGGED and entry.step is not None:
        activity = state.activities.get(entry.step)
        if activity is not None and activity.flag is not None:
            flag = activity.flag
            if flag.server_id:
                attributes["paceline.flag.holder"] = flag.server_id
            if flag.held_since:
                attributes["paceline.flag.since"] = flag.held_since.isoformat()
    return attributes


def record(
    span: trace.Span,
    row: InstanceRow,
    before: InstanceState,
    after: InstanceState,
    history: Sequence[HistoryEntry],
    now: datetime,
    event: object,
) -> None:
    """The transition's history as span events; lost attempts as spans of their own; status
    ERROR when the instance became FAILED or FLAGGED."""
    # A deadline passed with no report from the attempt's holder: the attempt was lost.
    deadline = isinstance(event, DeadlineExpired)
    messages = _error_messages(after, event)
    lost: set[tuple[str, int]] = set()
    for entry in history:
        attributes = _event_attributes(entry, after, messages)
        span.add_event(entry.kind.value, attributes)
        if entry.kind in _LOGGED:
            # Inside the span: the line names the instance's trace (Loki finds it from there).
            log.warning(
                "%s %s/%s attempt %s: %s",
                entry.kind.value,
                row.id,
                entry.step,
                entry.attempt,
                attributes["paceline.reason"],
            )
        if entry.kind is HistoryKind.REDELIVERED and entry.step and entry.attempt:
            previous = before.activities.get(entry.step)
            _lost_attempt(row, entry.step, entry.attempt, previous, entry.data.get("to"), now)
            lost.add((entry.step, entry.attempt))
        elif (
            deadline
            and entry.kind in _TIMED_OUT
            and entry.step
            and entry.attempt
            and (entry.step, entry.attempt) not in lost
        ):
            # Nothing came from the holder: the attempt's own span (if any) was lost with it.
            previous = before.activities.get(entry.step)
            _lost_attempt(row, entry.step, entry.attempt, previous, None, now)
            lost.add((entry.step, entry.attempt))
    status = after.status
    if status is not before.status:
        span.set_attribute("paceline.instance.status", status.value)
        if status in _ERROR_STATUSES:
            telemetry.fail(span, status.value, f"the instance is {status.value}")


def _lost_attempt(
    row: InstanceRow,
    step: str,
    attempt: int,
    previous: ActivityState | None,
    to: str | None,
    now: datetime,
) -> None:
    holder = previous.claimed_by if previous is not None else None
    since = previous.claimed_at or previous.started_at if previous is not None else None
    start = since or now
    attributes = {
        **instance_attributes(row),
        "paceline.step": step,
        "paceline.attempt": attempt,
        "paceline.holder": holder or "unknown",
        "paceline.since": start.isoformat(),
        "paceline.restartable": previous.restartable if previous is not None else False,
    }
    if to:
        attributes["paceline.redelivered_to"] = to
    with telemetry.span_at(
        f"attempt {attempt} on {holder or 'an unknown server'}: outcome unknown",
        start_time_ns=int(start.timestamp() * 1e9),
        end_time_ns=int(now.timestamp() * 1e9),
        attributes=attributes,
    ) as span:
        telemetry.fail(span, "outcome_unknown", "the server holding the attempt was lost")
