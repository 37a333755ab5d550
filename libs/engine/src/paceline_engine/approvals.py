"""`approval` activities: a person decides, the scheduler runs it (no worker).

Checkpointed (the approval of CONTRACT.md): entering the step moves its activity to WAITING and
decides `CreateApproval` in the same transition, which the scheduler commits as one row under a
unique key (instance, step, attempt), with its `approval.requested` announcement in the outbox.
A failover at any moment either committed both or neither; a replayed transition finds the row
and creates nothing: there is never a second approval for one attempt.

Deciding: the admin API records each decider's choice (it checks who may decide and refuses a
decision once one is reached); the first choice (`approve`) needs `required` distinct deciders,
any other choice decides at once. The timeout decides by `on_timeout` (`reject`: the last
choice, `approve`: the first, `fail`: the step fails); each escalation level adds approvers at
its time. The output: `{"decision", "decided_by", "decided_at", "comment", "via",
"escalation_level"}`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus
from paceline_engine.activity_types import ApprovalParams
from paceline_engine.events import (
    ApprovalDecided,
    CloseApproval,
    CreateApproval,
    EscalateApproval,
    HistoryKind,
    SetTimer,
    WaitDue,
)
from paceline_engine.expressions import EvaluationError
from paceline_engine.state import ActivityState, ApprovalState, Vote, Waiting

if TYPE_CHECKING:
    from paceline_engine.definitions import ActivityStep
    from paceline_engine.run import Run

TIMEOUT = "timeout"
ESCALATE = "escalate:"


def enter(run: Run, step: ActivityStep) -> None:
    """Ask for the approval (the step fails at once when its parameters do not render to
    one)."""
    try:
        rendered = step.params.render(run.context(step.params.references()))
        params = ApprovalParams.model_validate(rendered)
    except ValidationError as exc:
        problems = "; ".join(
            f"with.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        run.fail_step(step, 1, ActivityError(kind="bad_params", message=problems))
        return
    except EvaluationError as exc:
        run.fail_step(step, 1, ActivityError(kind="expression", message=str(exc)))
        return
    due_at = None if params.timeout is None else run.now + timedelta(seconds=params.timeout)
    run.state.activities[step.id] = ActivityState(
        type=step.type,
        status=ActivityStatus.WAITING,
        attempt=1,
        restartable=True,
        started_at=run.now,
        waiting=Waiting(kind="approval", due_at=due_at),
        approval=ApprovalState(
            approvers=list(params.approvers),
            required=params.required,
            choices=list(params.choices),
            on_timeout=params.on_timeout,
            escalations=[(e.after, list(e.to)) for e in params.escalate],
        ),
    )
    run.changed.add(step.id)
    run.decisions.append(
        CreateApproval(
            step.id,
            1,
            params.title,
            params.details,
            list(params.approvers),
            params.required,
            params.forbid_requester,
            list(params.choices),
            due_at,
        )
    )
    if due_at is not None:
        run.decisions.append(SetTimer(step.id, 1, due_at, TIMEOUT))
    for level, escalation in enumerate(params.escalate, start=1):
        at = run.now + timedelta(seconds=escalation.after)
        run.decisions.append(SetTimer(step.id, 1, at, f"{ESCALATE}{level}"))
    run.note(
        HistoryKind.APPROVAL_REQUESTED,
        f"approval {params.title!r} asked of {', '.join(params.approvers)}"
        + (f" ({params.required} needed)" if params.required > 1 else ""),
        step.id,
        1,
    )


def _open(run: Run, step: str, attempt: int, what: str) -> ActivityState | None:
    activity = run.activity(step)
    if (
        activity is None
        or activity.approval is None
        or activity.status is not ActivityStatus.WAITING
        or activity.attempt != attempt
        or not run.active
    ):
        run.note(HistoryKind.IGNORED, f"{what} after the approval ended", step, attempt)
        return None
    return activity


def decided(run: Run, event: ApprovalDecided) -> None:
    activity = _open(run, event.step, event.attempt, f"{event.by}'s {event.decision!r}")
    if activity is None:
        return
    approval = activity.approval
    assert approval is not None
    if any(v.by == event.by for v in approval.votes):
        # Commands arrive at least once: the same decider's choice again is not a second vote.
        run.note(
            HistoryKind.IGNORED,
            f"{event.by}'s {event.decision!r} again: counted once",
            event.step,
            event.attempt,
        )
        return
    approval.votes.append(
        Vote(by=event.by, decision=event.decision, comment=event.comment, at=event.decided_at)
    )
    run.changed.add(event.step)
    approving = approval.choices[0]
    voters = [v.by for v in approval.votes if v.decision == approving]
    if event.decision == approving and len(voters) < approval.required:
        run.note(
            HistoryKind.APPROVAL_VOTE,
            f"{event.by} chose {event.decision!r}: {len(voters)} of {approval.required}",
            event.step,
            event.attempt,
        )
        return
    deciders = voters if event.decision == approving else [event.by]
    _decide(
        run, event.step, activity, event.decision, deciders, event.comment, "api", event.decided_at
    )


def due(run: Run, event: WaitDue) -> None:
    activity = _open(run, event.step, event.attempt, f"the {event.purpose} timer")
    if activity is None:
        return
    approval = activity.approval
    assert approval is not None
    if event.purpose.startswith(ESCALATE):
        level = int(event.purpose[len(ESCALATE) :])
        if level <= approval.level or level > len(approval.escalations):
            return  # a repeated timer
        added = approval.escalations[level - 1][1]
        approval.level = level
        approval.approvers = list(dict.fromkeys([*approval.approvers, *added]))
        run.changed.add(event.step)
        run.decisions.append(
            EscalateApproval(event.step, event.attempt, level, list(approval.approvers))
        )
        run.note(
            HistoryKind.APPROVAL_ESCALATED,
            f"escalated to level {level}: {', '.join(added)} may decide too",
            event.step,
            event.attempt,
        )
        return
    if approval.on_timeout == "fail":
        activity.status = ActivityStatus.FAILED
        activity.finished_at = run.now
        activity.error = ActivityError(kind="timeout", message="no decision within the timeout")
        activity.reason = "the approval timed out"
        run.changed.add(event.step)
        run.decisions.append(CloseApproval(event.step, event.attempt, "EXPIRED", None, []))
        run.note(
            HistoryKind.APPROVAL_DECIDED,
            "no decision within the timeout: the step failed",
            event.step,
            event.attempt,
        )
        run.advance()
        return
    choice = approval.choices[0] if approval.on_timeout == "approve" else approval.choices[-1]
    _decide(run, event.step, activity, choice, [], None, "timeout", run.now)


def _decide(
    run: Run,
    step: str,
    activity: ActivityState,
    decision: str,
    deciders: list[str],
    comment: str | None,
    via: str,
    decided_at: datetime,
) -> None:
    """`decided_at`: when the deciding choice was recorded (the admin API's commit, which
    may be long before a scheduler applies it), or the timeout's time."""
    approval = activity.approval
    assert approval is not None
    output: dict[str, Any] = {
        "decision": decision,
        "decided_by": deciders,
        "decided_at": decided_at.isoformat(),
        "comment": comment,
        "via": via,
        "escalation_level": approval.level,
    }
    activity.status = ActivityStatus.COMPLETED
    activity.output = output
    activity.finished_at = run.now
    activity.reason = f"{decision} ({via})"
    run.changed.add(step)
    status = "DECIDED" if via == "api" else "EXPIRED"
    run.decisions.append(CloseApproval(step, activity.attempt, status, decision, deciders))
    who = ", ".join(deciders) if deciders else "the timeout"
    run.note(HistoryKind.APPROVAL_DECIDED, f"{decision!r} by {who}", step, activity.attempt)
    run.advance()


def closed(run: Run, step: str, activity: ActivityState) -> None:
    """The approval's activity was cancelled (a cancel, or the instance ended)."""
    run.decisions.append(CloseApproval(step, activity.attempt, "CANCELLED", None, []))
