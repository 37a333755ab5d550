"""Messages to engine events, and engine decisions to messages."""

from __future__ import annotations

from paceline_contracts.messages import (
    ActivityError,
    ActivityQuarantined,
    ActivityResult,
    ActivitySnapshot,
    ActivityTask,
    CancelInstance,
    CheckDeadline,
    ClaimAttempt,
    InstanceChanged,
    InstanceSnapshot,
    ResolveActivity,
    StartInstance,
)
from paceline_contracts.queues import Queue
from paceline_contracts.states import ActivityStatus
from paceline_engine import events
from paceline_infra.outbox import OutboxMessage
from paceline_scheduler.store import InstanceRow

Incoming = (
    StartInstance
    | CancelInstance
    | ResolveActivity
    | CheckDeadline
    | ActivityResult
    | ActivityQuarantined
    | ClaimAttempt
)


def to_event(message: Incoming) -> events.Event:
    match message:
        case StartInstance():
            return events.Start()
        case CancelInstance():
            return events.Cancel(message.reason)
        case ResolveActivity():
            return events.Resolve(
                message.step, message.action, message.output, message.by, message.attempt
            )
        case CheckDeadline():
            return events.DeadlineExpired(message.step, message.attempt)
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
    return events.ActivityFailed(
        message.step,
        message.attempt,
        error,
        message.server_id,
        message.started_at,
        message.finished_at,
        timed_out=message.status is ActivityStatus.TIMED_OUT,
    )


def to_outbox(
    row: InstanceRow, decision: events.Decision, headers: dict[str, str]
) -> OutboxMessage | None:
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
        )
        return OutboxMessage.of(Queue.ACTIVITIES, task, headers, not_before=decision.not_before)
    if isinstance(decision, events.SetDeadline):
        # A timer is a held-back message to ourselves: whichever scheduler gets it handles it.
        check = CheckDeadline(instance_id=row.id, step=decision.step, attempt=decision.attempt)
        return OutboxMessage.of(Queue.COMMANDS, check, headers, not_before=decision.at)
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
