"""What the engine takes in (events) and gives out (decisions, history)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import InstanceStatus

# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """The instance was accepted; its inputs are already resolved."""


@dataclass(frozen=True, slots=True)
class ActivityCompleted:
    step: str
    attempt: int
    output: Any
    server_id: str
    started_at: datetime
    finished_at: datetime


@dataclass(frozen=True, slots=True)
class ActivityFailed:
    """The adapter ended the attempt without success; `error.outcome_unknown` says whether the
    effect may have happened anyway."""

    step: str
    attempt: int
    error: ActivityError
    server_id: str
    started_at: datetime
    finished_at: datetime
    timed_out: bool = False


class StopCause(StrEnum):
    """Why a worker stopped an attempt that its adapter had not ended."""

    CANCELLED = "cancelled"
    """Its instance was cancelled: dropped before it started, or stopped while it ran."""
    DRAIN_DEADLINE = "drain_deadline"
    """Its worker's drain reached the grace deadline while it ran."""
    RUNNER_CRASHED = "runner_crashed"
    """It ran alone in an isolated runner process, and that process died."""


@dataclass(frozen=True, slots=True)
class ActivityStopped:
    """A worker stopped an attempt; `error.outcome_unknown` is True when it had started."""

    step: str
    attempt: int
    cause: StopCause
    error: ActivityError
    server_id: str
    started_at: datetime
    finished_at: datetime
    cancelled_by: str | None = None
    """For a cancel: who asked, as the worker heard it."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker is about to run an attempt (see DESIGN.md, "The rule, precisely")."""

    step: str
    attempt: int
    server_id: str
    at: datetime
    redelivered: bool
    delivery_count: int = 0
    wants_reply: bool = True


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A worker refused a delivery that had taken its workers down too often."""

    step: str
    attempt: int
    deliveries: int
    server_id: str


@dataclass(frozen=True, slots=True)
class DeadlineExpired:
    """The scheduler's own timer: the attempt should have ended by now."""

    step: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Resolve:
    """An operator's decision on a flagged activity."""

    step: str
    action: Literal["retry", "skip", "fail"]
    output: Any = None
    by: str = "operator"
    attempt: int | None = None
    """The flagged attempt decided on; None: whatever is flagged now."""
    forced: bool = False
    """A retry forced although the attempt's holder may still finish it (a broker blip)."""


@dataclass(frozen=True, slots=True)
class Cancel:
    reason: str
    by: str = "operator"


@dataclass(frozen=True, slots=True)
class Abandon:
    """A message of the instance could not be applied (it was dead-lettered): the instance
    fails rather than wait for ever for what it would have done."""

    reason: str


@dataclass(frozen=True, slots=True)
class WaitDue:
    """A `wait` step's timer came due (its `for` or `until`, or a signal's `timeout`), or an
    approval's (its `timeout`, or an escalation: `purpose` `escalate:<level>`)."""

    step: str
    attempt: int
    due_at: datetime
    purpose: str = "due"


@dataclass(frozen=True, slots=True)
class ApprovalDecided:
    """A decider's choice, recorded by the admin API (it checked who may decide)."""

    step: str
    attempt: int
    by: str
    decision: str
    comment: str | None
    decided_at: datetime


@dataclass(frozen=True, slots=True)
class SignalArrived:
    """A signal the admin API recorded for the instance (`POST .../signals/{name}`)."""

    signal_id: str
    name: str
    payload: dict[str, Any]
    by: str
    received_at: datetime


Event = (
    Start
    | ActivityCompleted
    | ActivityFailed
    | ActivityStopped
    | Claim
    | Quarantined
    | DeadlineExpired
    | Resolve
    | Cancel
    | WaitDue
    | SignalArrived
    | ApprovalDecided
    | Abandon
)

# --- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send one attempt of an activity to the workers, not before `not_before`."""

    step: str
    activity_type: str
    params: dict[str, Any]
    attempt: int
    restartable: bool
    timeout_s: float | None
    not_before: datetime | None = None
    isolated: bool = False
    """Run it alone, in a runner process of its own (it is a suspect of a worker's death)."""


@dataclass(frozen=True, slots=True)
class AnswerClaim:
    """Reply to the worker that claimed: run under `attempt`, or do not run at all."""

    granted: bool
    attempt: int
    reason: str
    quarantine: bool = False
    """Refused as a poison: the worker moves the message to the dead-letter queue."""


@dataclass(frozen=True, slots=True)
class SetDeadline:
    """Ask to be told (DeadlineExpired) if the attempt has not ended by `at`."""

    step: str
    attempt: int
    at: datetime


@dataclass(frozen=True, slots=True)
class StopInstance:
    """Tell every worker: start nothing more of this instance, stop what of it runs."""

    by: str


@dataclass(frozen=True, slots=True)
class Finish:
    """The instance reached a final status."""

    status: InstanceStatus


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Ask to be told (WaitDue) at `due_at`, the database's time."""

    step: str
    attempt: int
    due_at: datetime
    purpose: str = "due"


@dataclass(frozen=True, slots=True)
class CreateApproval:
    """Record the approval of this attempt (once: a unique key) and announce it."""

    step: str
    attempt: int
    title: str
    details: Any
    approvers: list[str]
    required: int
    forbid_requester: bool
    choices: list[str]
    due_at: datetime | None


@dataclass(frozen=True, slots=True)
class EscalateApproval:
    step: str
    attempt: int
    level: int
    approvers: list[str]
    """Everyone who may decide from now on."""


@dataclass(frozen=True, slots=True)
class CloseApproval:
    """The approval ended: DECIDED (with `decision`), EXPIRED (its timeout decided or
    failed it) or CANCELLED."""

    step: str
    attempt: int
    status: str
    decision: str | None
    decided_by: list[str]


class SignalFate(StrEnum):
    """What became of a signal (the `signals` row's status)."""

    DELIVERED = "DELIVERED"
    """It ended a wait."""
    BUFFERED = "BUFFERED"
    """No wait takes it yet; the instance may still reach one."""
    LATE = "LATE"
    """No wait will take it: the ones for it ended (or the instance did), or it was refused."""


@dataclass(frozen=True, slots=True)
class RecordSignal:
    """Write what became of a signal."""

    signal_id: str
    fate: SignalFate
    step: str | None
    reason: str


Decision = (
    Dispatch
    | AnswerClaim
    | SetDeadline
    | StopInstance
    | Finish
    | SetTimer
    | RecordSignal
    | CreateApproval
    | EscalateApproval
    | CloseApproval
)


class HistoryKind(StrEnum):
    STARTED = "started"
    DISPATCHED = "dispatched"
    RETRY = "retry_scheduled"
    CLAIMED = "claimed"
    CLAIM_REFUSED = "claim_refused"
    REDELIVERED = "redelivered"
    RESTARTED = "restarted"
    FLAGGED = "flagged"
    RESOLVED = "resolved"
    ISOLATED = "isolated"
    COMPLETED = "activity_completed"
    FAILED = "activity_failed"
    TIMED_OUT = "activity_timed_out"
    INTERRUPTED = "activity_interrupted"
    CANCELLED = "activity_cancelled"
    BRANCH = "branch_taken"
    WAITING = "waiting"
    WAIT_ENDED = "wait_ended"
    SIGNAL = "signal"
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_ESCALATED = "approval_escalated"
    APPROVAL_VOTE = "approval_vote"
    APPROVAL_DECIDED = "approval_decided"
    LATE_RESULT = "late_result"
    IGNORED = "ignored"
    INSTANCE_COMPLETED = "instance_completed"
    INSTANCE_FAILED = "instance_failed"
    INSTANCE_CANCELLING = "instance_cancelling"
    INSTANCE_CANCELLED = "instance_cancelled"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    kind: HistoryKind
    reason: str
    step: str | None = None
    attempt: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Policy:
    """Engine settings that are not part of any definition."""

    crash_budget: int = 3
    """Interruptions charged to a restartable activity (crashes of its runner while it ran
    alone, time-outs) before it is flagged; apart from the retry policy, which counts
    failures. A worker's death is charged to nobody: what it ran become suspects."""
    deadline_grace_s: float = 10.0
    """How long past a step's timeout the scheduler waits for the worker's own report."""
    cancel_grace_s: float = 30.0
    """How long a cancel waits for a running activity's worker to confirm it stopped; past it
    the activity is recorded as cancelled with an unknown outcome."""
    refresh_after_deliveries: int = 5
    """A message the broker delivered this often without it running (requeued by crashes and
    drains while only prefetched) is replaced by a fresh one, before the broker's own
    delivery limit would dead-letter it."""
