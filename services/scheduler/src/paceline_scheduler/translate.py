"""Messages to engine events, and engine decisions to messages."""

from __future__ import annotations

from datetime import datetime

from paceline_contracts.messages import (
    ActivityError,
    ActivityQuarantined,
    ActivityResult,
    ActivitySnapshot,
    ActivityTask,
    CancelInstance,
    CheckDeadline,
    ClaimAttempt,
    DecideApproval,
    DeliverSignal,
    FireTimer,
    InstanceCancelled,
    InstanceChanged,
    InstanceSnapshot,
    ResolveActivity,
    StartInstance,
)
from paceline_contracts.queues import Queue, Stream
from paceline_contracts.states import ActivityStatus, ErrorKind
from paceline_engine import events
from paceline_infra.outbox import OutboxMessage
from paceline_scheduler.store import InstanceRow

Incoming = (
    StartInstance
    | CancelInstance
    | ResolveActivity
    | CheckDeadline
    | FireTimer
    | DeliverSignal
    | DecideApproval
    | ActivityResult
    | ActivityQuarantined
    | ClaimAttempt
)


def to_event(message: Incoming) -> events.Event:
    match message:
        case StartInstance():
            return events.Start()
        case CancelInstance():
            return events.Cancel(message.reason, message.by)
        case ResolveActivity():
            return events.Resolve(
                message.step,
                message.action,
                message.output,
                message.by,
                message.attempt,
                message.forced,
            )
        case CheckDeadline():
            return events.DeadlineExpired(message.step, message.attempt)
        case FireTimer():
            return events.WaitDue(message.step, message.attempt, message.due_at, message.purpose)
        case DecideApproval():
            return events.ApprovalDecided(
                message.step,
                message.attempt,
                message.by,
                message.decision,
                message.comment,
                message.decided_at,
            )
        case DeliverSignal():
            return events.SignalArrived(
                str(message.signal_id),
                message.name,
                message.payload,
                message.by,
                message.received_at,
            )
        case ActivityQuarantined():
            return events.Quarantined(
                message.step, message.attempt, message.deliveries, message.server_id
            )
        case ClaimAttempt():
            return events.Claim(
                message.step,
                message.attempt,
                message.server_id,
                message.at,
                message.redelivered,
                message.delivery_count,
                message.wants_reply,
            )
    if message.status is ActivityStatus.COMPLETED:
        return events.ActivityCompleted(
            message.step,
            message.attempt,
            message.output,
            message.server_id,
            message.started_at,
            message.finished_at,
        )
    error = message.error or ActivityError(kind="failed", message="no error given")
    if message.status in (ActivityStatus.CANCELLED, ActivityStatus.INTERRUPTED):
        return events.ActivityStopped(
            message.step,
            message.attempt,
            _stop_cause(message.status, error),
            error,
            message.server_id,
            message.started_at,
            message.finished_at,
            message.cancelled_by,
        )
    return events.ActivityFailed(
        message.step,
        message.attempt,
        error,
        message.server_id,
        message.started_at,
        message.finished_at,
        timed_out=message.status is ActivityStatus.TIMED_OUT,
    )


def _stop_cause(status: ActivityStatus, error: ActivityError) -> events.StopCause:
    if status is ActivityStatus.CANCELLED:
        return events.StopCause.CANCELLED
    if error.kind == ErrorKind.RUNNER_CRASHED:
        return events.StopCause.RUNNER_CRASHED
    # INTERRUPTED for any other reason: the worker stopped it while it ran, as a drain does.
    return events.StopCause.DRAIN_DEADLINE


def to_outbox(row: InstanceRow, decision: events.Decision, now: datetime) -> OutboxMessage | None:
    """The message a decision sends, if any (claim answers and finishes send none here)."""
    if isinstance(decision, events.Dispatch):
        task = ActivityTask(
            instance_id=row.id,
            step=decision.step,
            activity_type=decision.activity_type,
            params=decision.params,
            attempt=decision.attempt,
            restartable=decision.restartable,
            timeout_s=decision.timeout_s,
            isolated=decision.isolated,
        )
        queue = Queue.SUSPECTS if decision.isolated else Queue.ACTIVITIES
        return OutboxMessage.of(queue, task, not_before=decision.not_before)
    if isinstance(decision, events.StopInstance):
        cancelled = InstanceCancelled(instance_id=row.id, by=decision.by, at=now)
        return OutboxMessage.of(Stream.CANCELLATIONS, cancelled)
    if isinstance(decision, events.SetDeadline):
        # A timer is a held-back message to ourselves: whichever scheduler gets it handles it.
        check = CheckDeadline(instance_id=row.id, step=decision.step, attempt=decision.attempt)
        return OutboxMessage.of(Queue.COMMANDS, check, not_before=decision.at)
    if isinstance(decision, events.SetTimer):
        fire = FireTimer(
            instance_id=row.id,
            step=decision.step,
            attempt=decision.attempt,
            due_at=decision.due_at,
            purpose=decision.purpose,
        )
        return OutboxMessage.of(Queue.COMMANDS, fire, not_before=decision.due_at)
    return None


def instance_changed(row: InstanceRow, changed: set[str]) -> InstanceChanged:
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
