"""One versioned pydantic model per message type.

Each body is JSON with a `type` and a schema version `v`. A consumer parses with the union for
its queue; anything that does not parse is dead-lettered with the parse error as its reason.
Adding a field with a default keeps `v`; changing the meaning of one bumps it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from paceline_contracts.states import ActivityStatus, InstanceStatus, ServerKind, ServerStatus


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ActivityError(Message):
    """Why an activity failed."""

    kind: str
    """A short machine-readable category: `timeout`, `http_status`, `http_transport`,
    `exit_code`, `exec`, `bad_params`, `expression`, `adapter`, and the kinds the engine acts
    on (`ErrorKind`: `cancelled`, `drain_deadline`, `runner_crashed`)."""
    message: str
    """What happened, for a person."""
    outcome_unknown: bool = False
    """The attempt ended without proof that its effect did not happen: a request was sent but
    no complete answer came, a program was killed by a signal or a time-out, the attempt was
    stopped while it ran. For a non-restartable activity the engine flags it (DESIGN.md,
    "Outcome unknown") instead of applying the step's retry policy."""


# --- commands: admin -> scheduler -------------------------------------------------------------


class StartInstance(Message):
    """Start an instance the admin API has recorded as PENDING."""

    type: Literal["instance.start"] = "instance.start"
    v: Literal[1] = 1
    instance_id: UUID


class CancelInstance(Message):
    """Cancel an instance that has not ended."""

    type: Literal["instance.cancel"] = "instance.cancel"
    v: Literal[1] = 1
    instance_id: UUID
    reason: str = "cancelled by an operator"
    by: str = "operator"
    """The principal who asked, for the history."""


class ResolveActivity(Message):
    """An operator's decision on a flagged activity."""

    type: Literal["activity.resolve"] = "activity.resolve"
    v: Literal[1] = 1
    instance_id: UUID
    step: str
    action: Literal["retry", "skip", "fail"]
    """retry: a new attempt; skip: completed with `output`; fail: the instance fails."""
    output: Any = None
    """The output a skipped activity is recorded with."""
    by: str = "operator"
    """Who decided, for the history."""
    attempt: int | None = None
    """The flagged attempt the operator saw: a decision about another one is ignored."""
    forced: bool = False
    """A retry the operator forced although the attempt's holder may still finish it."""


class CheckDeadline(Message):
    """A timer the scheduler set for itself: the attempt must have ended by now."""

    type: Literal["activity.deadline"] = "activity.deadline"
    v: Literal[1] = 1
    instance_id: UUID
    step: str
    attempt: int


class FireTimer(Message):
    """A `wait` step's timer the scheduler set for itself: it is due (a held-back message)."""

    type: Literal["wait.due"] = "wait.due"
    v: Literal[1] = 1
    instance_id: UUID
    step: str
    attempt: int
    due_at: datetime
    """When it was due, the database's time."""
    purpose: str = "due"
    """`due` (a wait), `timeout` or `escalate:<level>` (an approval)."""


class DecideApproval(Message):
    """A decider's choice on an approval, recorded by the admin API (which checked that the
    caller may decide), for the scheduler to apply."""

    type: Literal["approval.decide"] = "approval.decide"
    v: Literal[1] = 1
    instance_id: UUID
    approval_id: UUID
    step: str
    attempt: int
    by: str
    decision: str
    comment: str | None = None
    decided_at: datetime


class DeliverSignal(Message):
    """A signal the admin API recorded (a `signals` row, status BUFFERED), for the scheduler
    to deliver to a wait, keep buffered, or keep as late."""

    type: Literal["signal.deliver"] = "signal.deliver"
    v: Literal[1] = 1
    instance_id: UUID
    signal_id: UUID
    name: str
    payload: dict[str, Any]
    by: str
    """The principal who sent it."""
    received_at: datetime


Command = Annotated[
    StartInstance
    | CancelInstance
    | ResolveActivity
    | CheckDeadline
    | FireTimer
    | DeliverSignal
    | DecideApproval,
    Field(discriminator="type"),
]
COMMAND = TypeAdapter[Command](Command)


# --- activities: scheduler -> worker -----------------------------------------------------------


class ActivityTask(Message):
    """One attempt at one activity, to be run by a worker."""

    type: Literal["activity.task"] = "activity.task"
    v: Literal[1] = 1
    instance_id: UUID
    step: str
    """The step id in the definition."""
    activity_type: str
    """The adapter to run: `noop`, `sleep`, `http.request`, `shell.command`, ..."""
    params: dict[str, Any]
    """The step's `with`, expressions already evaluated."""
    attempt: int
    """The fencing token: results of any other attempt are late."""
    restartable: bool
    """The effective restartability: the type's default or the author's override."""
    timeout_s: float | None = None
    """Ends the attempt when it runs longer than this."""
    isolated: bool = False
    """Run it alone, in a runner process of its own: a worker died while it ran before, so it
    is a suspect (DESIGN.md, "Crashes are charged to their cause"). Sent on the `suspects`
    queue; a crash of that runner is charged to this activity alone."""


ACTIVITY_TASK = TypeAdapter[ActivityTask](ActivityTask)


# --- results: worker -> scheduler --------------------------------------------------------------


class ActivityResult(Message):
    """The end of one attempt, as its worker saw it.

    COMPLETED, FAILED and TIMED_OUT are the adapter's own endings. The worker stopped the other
    two: CANCELLED (its instance was cancelled: dropped before it started, or stopped while it
    ran) and INTERRUPTED (a drain's grace deadline cut it, `error.kind` `drain_deadline`; or its
    isolated runner process died, `runner_crashed`). `error.outcome_unknown` says whether the
    effect may have happened."""

    type: Literal["activity.result"] = "activity.result"
    v: Literal[1] = 1
    instance_id: UUID
    step: str
    attempt: int
    status: Literal[
        ActivityStatus.COMPLETED,
        ActivityStatus.FAILED,
        ActivityStatus.TIMED_OUT,
        ActivityStatus.CANCELLED,
        ActivityStatus.INTERRUPTED,
    ]
    output: Any = None
    error: ActivityError | None = None
    server_id: str
    """The worker that ran the attempt."""
    started_at: datetime
    finished_at: datetime
    cancelled_by: str | None = None
    """For CANCELLED: the principal whose cancel the worker acted on."""


class ActivityQuarantined(Message):
    """A worker refused a delivery that had already taken its workers down too often."""

    type: Literal["activity.quarantined"] = "activity.quarantined"
    v: Literal[1] = 1
    instance_id: UUID
    step: str
    attempt: int
    deliveries: int
    """How many times the broker delivered it, this time included."""
    server_id: str


Result = Annotated[ActivityResult | ActivityQuarantined, Field(discriminator="type")]
RESULT = TypeAdapter[Result](Result)


# --- claims: worker -> scheduler, and the reply -----------------------------------------------


class ClaimAttempt(Message):
    """A worker is about to run an attempt. For non-restartable work, and for any redelivery,
    it waits for the reply before doing anything; otherwise it is a notice that the attempt
    started, so the scheduler knows who held it."""

    type: Literal["activity.claim"] = "activity.claim"
    v: Literal[1] = 1
    instance_id: UUID
    step: str
    attempt: int
    """The attempt in the activity message."""
    server_id: str
    at: datetime
    redelivered: bool
    """The broker delivered this message before (to this or another consumer)."""
    delivery_count: int = 0
    """The quorum queue's `x-delivery-count`: earlier deliveries that were not acked."""
    wants_reply: bool = True


class ClaimReply(Message):
    type: Literal["activity.claim_reply"] = "activity.claim_reply"
    v: Literal[1] = 1
    granted: bool
    attempt: int
    """The attempt to run under: a redelivered restartable activity gets a new one."""
    reason: str
    quarantine: bool = False
    """Refused as a poison (crash budget exhausted): dead-letter the message, do not ack it."""


CLAIM = TypeAdapter[ClaimAttempt](ClaimAttempt)
CLAIM_REPLY = TypeAdapter[ClaimReply](ClaimReply)


# --- events: scheduler -> reporting ------------------------------------------------------------


class ActivitySnapshot(Message):
    """An activity as it stands after a transition."""

    step: str
    activity_type: str
    status: ActivityStatus
    restartable: bool
    attempts: int
    server_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ActivityError | None = None


class InstanceSnapshot(Message):
    """An instance as it stands after a transition."""

    instance_id: UUID
    definition: str
    version: int
    status: InstanceStatus
    started_by: str
    started_how: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ActivityError | None = None


class InstanceChanged(Message):
    """What one scheduler transaction changed in one instance. Snapshots make it idempotent:
    reporting keeps the one with the highest `seq`, whatever order they arrive in."""

    type: Literal["instance.changed"] = "instance.changed"
    v: Literal[1] = 1
    seq: int
    """Increases with every transaction on the instance."""
    instance: InstanceSnapshot
    activities: tuple[ActivitySnapshot, ...] = ()
    """Only the activities this transaction changed."""


Event = Annotated[InstanceChanged, Field(discriminator="type")]
EVENT = TypeAdapter[Event](Event)


# --- cancellations: scheduler and admin -> every worker (a stream) ------------------------------


class InstanceCancelled(Message):
    """A cancel was asked for: workers start nothing more of the instance and stop what of it
    they run. Kept in the `cancellations` stream, so a worker that starts later replays it."""

    type: Literal["instance.cancelled"] = "instance.cancelled"
    v: Literal[1] = 1
    instance_id: UUID
    by: str
    """The principal who asked."""
    at: datetime


CANCELLATION = TypeAdapter[InstanceCancelled](InstanceCancelled)


class ApprovalRequested(Message):
    """An approval was asked for (the `approvals` stream): whoever notifies people reads it.
    A failover may announce one approval more than once; it never creates a second."""

    type: Literal["approval.requested"] = "approval.requested"
    v: Literal[1] = 1
    approval_id: UUID
    instance_id: UUID
    definition: str
    step: str
    attempt: int
    title: str
    approvers: list[str]
    required: int
    choices: list[str]
    due_at: datetime | None
    requested_at: datetime


# --- servers: heartbeats (every server -> scheduler) and control (admin -> one server) ---------


class InFlightActivity(Message):
    instance_id: UUID
    step: str
    attempt: int


class ServerHeartbeat(Message):
    """A server says it is alive, what it is doing and what it still runs."""

    type: Literal["server.heartbeat"] = "server.heartbeat"
    v: Literal[1] = 1
    server_id: str
    kind: ServerKind
    host: str
    pid: int
    started_at: datetime
    status: ServerStatus
    """ACTIVE, DRAINING or DRAINED; LOST is what the registry concludes from silence."""
    at: datetime
    in_flight: tuple[InFlightActivity, ...] = ()
    """For a worker: the activities it runs or holds; what a drain waits for."""


HEARTBEAT = TypeAdapter[ServerHeartbeat](ServerHeartbeat)


class DrainServer(Message):
    """Friendly shutdown of one server: stop taking work, finish what is in flight, exit."""

    type: Literal["server.drain"] = "server.drain"
    v: Literal[1] = 1
    server_id: str
    by: str = "operator"


DRAIN = TypeAdapter[DrainServer](DrainServer)
