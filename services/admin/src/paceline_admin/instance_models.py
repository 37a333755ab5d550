"""Request and response shapes of the instance routes (they are the OpenAPI schemas)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from paceline_admin.params import Text, Version
from paceline_admin.schemas import refer
from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus, ServerStatus
from paceline_starts.instances import StartedHow

CancelReason = StringConstraints(min_length=1, max_length=1000, pattern=r"^[^\x00]+$")
"""A cancel's reason: storable text (no NUL, no lone surrogate), at most 1000 characters."""


class StartInstanceRequest(BaseModel):
    """What to start. Unknown fields are refused, and so is a value of another JSON type (a
    version of `"1"`, `1.5` or `true`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    definition: Annotated[str, Text] = Field(description="The definition's name.")
    version: Version | None = Field(
        default=None, description="The version to run; the latest when omitted (or null)."
    )
    inputs: Annotated[
        dict[str, Any],
        refer("Inputs"),
    ] = Field(default_factory=dict)


class StartedInstance(BaseModel):
    """An instance that was recorded and whose start command was sent."""

    id: UUID
    status: InstanceStatus = Field(
        description="PENDING when new; the current one on a replay of an Idempotency-Key."
    )
    definition: str
    version: int = Field(description="The version that runs (resolved when not given).")
    trace_id: str | None = Field(description="The W3C trace id of every span of the instance.")


STATUS_DESCRIPTION = (
    "`PENDING` (recorded, not started yet), `RUNNING`, `WAITING`, `FLAGGED` (an activity waits "
    "for an operator), `CANCELLING` (a cancel was recorded: nothing more starts, and it waits "
    "for the activities that were running to stop; `cancel.waiting_for` lists them), and the "
    "final `COMPLETED`, `FAILED` and `CANCELLED`."
)


class InstanceSummary(BaseModel):
    """An instance without its activities."""

    id: UUID
    definition: str
    version: int
    status: InstanceStatus = Field(description=STATUS_DESCRIPTION)
    trace_id: str | None
    started_by: str = Field(
        description="Who asked: the principal whose token the start carried (`api`), "
        "`schedule:<schedule id>` (`schedule`), `event:<event id>` (`event`)."
    )
    started_how: StartedHow = Field(
        description="Through what: `api` (`POST /v1/instances`), `schedule` (a schedule's fire), "
        "`event` (an event a trigger of the definition subscribes to)."
    )
    created_at: datetime = Field(description="When the start was accepted.")
    started_at: datetime | None = Field(description="When the scheduler started running it.")
    finished_at: datetime | None


class HolderView(BaseModel):
    """The server that held the flagged attempt, as the server registry shows it now."""

    server_id: str
    status: ServerStatus | None = Field(
        description="ACTIVE, DRAINING, DRAINED or LOST (as `GET /v1/servers` shows it); null "
        "when the server is not in the registry (removed)."
    )
    last_heartbeat: datetime | None = Field(
        description="When its last heartbeat was received (the database's clock); null when "
        "it is not in the registry."
    )
    alive_since_flag: bool = Field(
        description="Its last heartbeat was received more than 1 s after `flagged_at`, and it is "
        "neither LOST nor DRAINED: it did not crash (a `redelivered` flag then comes from a "
        "broker connection blip)."
    )
    lists_attempt_in_flight: bool = Field(
        description="Its last heartbeat lists the flagged attempt among what it runs or holds."
    )
    may_still_finish: bool = Field(
        description="It is alive since the flag and has not reported the end of the flagged "
        "attempt itself: the original attempt may still finish (its late result resolves the "
        'flag). A `retry` is then refused unless it says `"force": true`.'
    )
    note: str = Field(description="What this means, for a person.")


class FlagView(BaseModel):
    """Why an activity waits for an operator: its outcome is unknown."""

    kind: str = Field(
        description="`redelivered` (the broker gave the attempt to another worker after its "
        "holder claimed it: the holder died, or lost its broker connection), `timeout` (the "
        "step's timeout ended an attempt that may have had its effect), `outcome_unknown` (it "
        "ended without proof that its effect did not happen: a request sent with no complete "
        "answer, a program killed, an isolated runner that died), `drain_deadline` (its "
        "worker's drain reached the grace deadline while it ran) or `crash_budget` (it took "
        "its worker or runner down too often, and was quarantined)."
    )
    reason: str = Field(
        description="Which server held which attempt since when, and what ended it."
    )
    attempt: int = Field(description="The attempt whose outcome is unknown.")
    server: str | None = Field(description="The server id that held the attempt.")
    held_since: datetime | None = Field(description="When that server claimed the attempt.")
    flagged_at: datetime
    holder: HolderView | None = Field(
        default=None,
        description="That server as the registry shows it now, and whether it has been alive "
        "since the flag; null when the flag names no server.",
    )


class CrashView(BaseModel):
    """An attempt of the activity was running when its worker (or its isolated runner) died."""

    attempt: int
    server_id: str | None = Field(default=None, description="The server that held the attempt.")
    since: datetime | None = Field(
        default=None, description="When that server claimed the attempt."
    )
    detected_at: datetime
    alone: bool = Field(
        description="It ran alone, in an isolated runner: the crash was charged to it (the "
        "crash budget). Otherwise it was one of the suspects of a worker's death, and nothing "
        "was charged."
    )


class ActivityView(BaseModel):
    """One dispatched activity and its current attempt."""

    step: str = Field(description="The step id in the definition.")
    type: str = Field(description="The activity type, e.g. `http.request`.")
    status: ActivityStatus
    restartable: bool = Field(description="Whether it may run again after a failover.")
    attempts: int = Field(description="The current attempt number (1 for the first).")
    server: str | None = Field(description="The server id that ran (or runs) the attempt.")
    started_at: datetime | None
    finished_at: datetime | None
    output: Any = None
    error: ActivityError | None = None
    reason: str | None = Field(
        default=None,
        description="Why it is where it is, when that is not obvious (a retry, a flag).",
    )
    claimed_by: str | None = Field(
        default=None,
        description="The server that claimed the current attempt: it may have started it.",
    )
    interruptions: int = Field(
        default=0, description="Attempts lost to a crash or a time-out (the crash budget)."
    )
    isolated: bool = Field(
        default=False,
        description="The current attempt runs alone, in an isolated runner: a worker died "
        "while it ran before, so it is a suspect.",
    )
    crashes: list[CrashView] = Field(
        default_factory=list,
        description="The most recent crashes it was part of, oldest first.",
    )
    flag: FlagView | None = Field(
        default=None,
        description="Set while the activity is INTERRUPTED, waiting for an operator "
        "(`POST .../activities/{step}/resolve`).",
    )


class WaitingActivity(BaseModel):
    """A running activity a cancel waits for: its server was told to stop it."""

    step: str
    attempt: int
    server: str | None = Field(description="The server that runs it (that claimed the attempt).")


class WaitView(BaseModel):
    """A `wait` step the instance is waiting in."""

    kind: str = Field(
        description="`timer` (a `for` or an `until`), `signal`, or `approval` (an `approval` "
        "activity waiting for its decision)."
    )
    step: str
    since: datetime | None = Field(
        default=None, description="When the wait began (the step's start; the database's time)."
    )
    due_at: datetime | None = Field(
        description="When the timer fires, or the signal's or approval's timeout (null: none); "
        "the database's time, fixed when the wait started."
    )
    signal: str | None = Field(description="The signal's name, for a signal.")
    approval_id: UUID | None = Field(
        default=None,
        description="For an approval: its id, to decide it (`POST /v1/approvals/{id}/decision`).",
    )


class CancelInfo(BaseModel):
    """A cancel request: the first one (a repeat answers with these)."""

    by: str = Field(description="Who asked: the principal whose token the request carried.")
    reason: str
    requested_at: datetime = Field(description="When it was recorded (the database's clock).")


class CancelView(CancelInfo):
    """A cancel of the instance, and what it still waits for."""

    recorded: bool = Field(
        description="The scheduler has recorded it (the instance is CANCELLING or CANCELLED): "
        "from then on nothing of the instance starts."
    )
    waiting_for: list[WaitingActivity] = Field(
        description="While CANCELLING: the activities that were running when the cancel was "
        "recorded and have not stopped yet. Empty once CANCELLED."
    )


class InstanceDetail(InstanceSummary):
    """An instance with its inputs, outputs and activities."""

    inputs: dict[str, Any]
    outputs: dict[str, Any] | None
    error: ActivityError | None
    activities: list[ActivityView] = Field(
        description="In definition order; at most the first 1,000 (see `activities_truncated`)."
    )
    activity_count: int = Field(description="How many activities were dispatched in all.")
    outputs_truncated: bool = Field(
        default=False,
        description="True when `outputs` holds only the first 1,000 finished steps' outputs "
        "(in definition order): read the rest from `GET /v1/instances/{id}/activities`.",
    )
    waiting_for: list[WaitView] = Field(
        default_factory=list,
        description="The `wait` steps in progress (the instance is WAITING when nothing else "
        "runs), the soonest due first.",
    )
    activities_truncated: bool = Field(
        description="True when `activities` holds only the first 1,000: page through all of "
        "them with `GET /v1/instances/{id}/activities`."
    )
    cancel: CancelView | None = Field(
        default=None, description="The cancel, once one was asked for; otherwise null."
    )
    trigger: dict[str, Any] | None = Field(
        default=None,
        description="What started it, as its expressions see `trigger`: `{kind: schedule, "
        "schedule, nominal_at}` or `{kind: event, id, event: {type, id, source, data}}`; null "
        "when started through the API.",
    )


class ActivityPage(BaseModel):
    items: list[ActivityView] = Field(description="In definition order.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last one."
    )


class InstancePage(BaseModel):
    items: list[InstanceSummary] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last one."
    )


class CancelRequestBody(BaseModel):
    """Why the instance is cancelled (optional). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    reason: Annotated[str, CancelReason] | None = Field(
        default=None,
        description="Recorded in the history; `cancelled by an operator` when omitted.",
    )


class CancelAccepted(BaseModel):
    """The cancel is recorded, with its command and its broadcast to every worker."""

    id: UUID
    status: InstanceStatus = Field(
        description="The current status: CANCELLING or CANCELLED once the scheduler has "
        "recorded the cancel (nothing of the instance starts from then on); the status before "
        "it when the scheduler did not record it within a few seconds (the command is durable: "
        "it is applied when the scheduler takes it)."
    )
    cancel: CancelInfo | None = Field(
        description="The first cancel request (a repeat answers with the same); null only for "
        "an instance cancelled without one (by an older version)."
    )
    waiting_for: list[WaitingActivity] = Field(
        default_factory=list,
        description="While CANCELLING: the attempts that had been granted to a worker before "
        "the cancel was recorded, being stopped now. Only these may still have an effect; "
        "nothing else of the instance starts.",
    )
    cancel_requested: bool = True


class HistoryEvent(BaseModel):
    """One recorded event of an instance."""

    id: int = Field(description="Increases in the order events were recorded.")
    at: datetime
    kind: str
    step: str | None
    attempt: int | None
    reason: str = Field(description="Why it happened (which server died, which attempt...).")
    data: Any


class InstanceHistory(BaseModel):
    items: list[HistoryEvent] = Field(description="Events, oldest first: a page.")
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null on the last one."
    )


class FlaggedActivity(BaseModel):
    """An INTERRUPTED activity of a FLAGGED instance: it waits for an operator."""

    instance_id: UUID
    definition: str
    version: int
    step: str
    type: str = Field(description="The activity type, e.g. `shell.command`.")
    attempt: int = Field(description="The activity's current attempt.")
    restartable: bool
    flag: FlagView | None = Field(
        description="Why it waits; null only for an activity flagged by an older engine."
    )
    instance_url: str = Field(description="The instance, with all its activities.")


class FlagPage(BaseModel):
    items: list[FlaggedActivity] = Field(description="Oldest flag first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last one."
    )


TAKES = {"retry": ("force",), "skip": ("output",), "fail": ()}
"""What each action of a resolve takes besides `action`."""


def _one_shape_per_action(schema: dict[str, Any]) -> None:
    """The schema of a resolve is one object shape per action, each with only its fields."""
    fields = schema.pop("properties")
    for key in ("type", "required", "additionalProperties"):
        schema.pop(key, None)
    schema["oneOf"] = [
        {
            "type": "object",
            "title": action,
            "properties": {
                "action": {"const": action, "description": fields["action"]["description"]},
                **{name: fields[name] for name in takes},
            },
            "required": ["action"],
            "additionalProperties": False,
        }
        for action, takes in TAKES.items()
    ]


class ResolveRequest(BaseModel):
    """An operator's decision on a flagged activity: `output` only with `skip`, `force` only
    with `retry`. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_one_shape_per_action)

    action: Literal["retry", "skip", "fail"] = Field(
        description="`retry`: run it again as a new attempt; `skip`: mark it SKIPPED (done) with "
        "`output`; `fail`: fail the activity, and with it the instance."
    )
    output: Annotated[
        dict[str, Any],
        refer("JsonObject", "The output later steps see (`{}` when omitted)."),
    ] = Field(default_factory=dict)
    force: bool = Field(
        default=False,
        description="Retry even though the server that held the attempt has been alive since "
        "the flag (`flag.holder.may_still_finish`), so the original attempt may still finish "
        "and the activity may run twice.",
    )

    @field_validator("output", "force")
    @classmethod
    def _taken_by_the_action(cls, value: Any, info: ValidationInfo) -> Any:
        action = info.data.get("action")
        if action is not None and info.field_name not in TAKES[action]:
            taker = next(a for a, takes in TAKES.items() if info.field_name in takes)
            raise PydanticCustomError(
                "not_with_action",
                "only `{taker}` takes `{field}`, not `{action}`",
                {"taker": taker, "field": info.field_name, "action": action},
            )
        return value


class ResolveAccepted(BaseModel):
    """The decision was sent to the scheduler, which applies it and records it in the history."""

    id: UUID
    step: str
    action: Literal["retry", "skip", "fail"]
    status: Literal["RESOLVE_REQUESTED"] = "RESOLVE_REQUESTED"
