"""Request and response shapes of the instance routes (they are the OpenAPI schemas)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from paceline_admin.params import MAX_VERSION, Text
from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus


class StartInstanceRequest(BaseModel):
    """What to start. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    definition: Annotated[str, Text] = Field(description="The definition's name.")
    version: int | None = Field(
        default=None,
        ge=1,
        le=MAX_VERSION,
        description="The version to run; the latest when omitted.",
    )
    inputs: dict[str, Any] = Field(
        default_factory=dict, description="Input values; defaults fill the rest."
    )


class StartedInstance(BaseModel):
    """An instance that was recorded and whose start command was sent."""

    id: UUID
    status: InstanceStatus = Field(
        description="PENDING when new; the current one on a replay of an Idempotency-Key."
    )
    definition: str
    version: int = Field(description="The version that runs (resolved when not given).")
    trace_id: str | None = Field(description="The W3C trace id of every span of the instance.")


class InstanceSummary(BaseModel):
    """An instance without its activities."""

    id: UUID
    definition: str
    version: int
    status: InstanceStatus
    trace_id: str | None
    started_by: str = Field(description="Who asked: `X-Paceline-Started-By`, else `admin-token`.")
    started_how: str = Field(description="Through what: `api` for this API.")
    created_at: datetime = Field(description="When the start was accepted.")
    started_at: datetime | None = Field(description="When the scheduler started running it.")
    finished_at: datetime | None


class FlagView(BaseModel):
    """Why an activity waits for an operator: its outcome is unknown."""

    kind: str = Field(
        description="`redelivered` (the server that claimed it died), `timeout` or `crash_budget`."
    )
    reason: str = Field(
        description="Which server held which attempt since when, and what ended it."
    )
    attempt: int = Field(description="The attempt whose outcome is unknown.")
    server: str | None = Field(description="The server id that held the attempt.")
    held_since: datetime | None = Field(description="When that server claimed the attempt.")
    flagged_at: datetime


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
    flag: FlagView | None = Field(
        default=None,
        description="Set while the activity is INTERRUPTED, waiting for an operator "
        "(`POST .../activities/{step}/resolve`).",
    )


class InstanceDetail(InstanceSummary):
    """An instance with its inputs, outputs and activities."""

    inputs: dict[str, Any]
    outputs: dict[str, Any] | None
    error: ActivityError | None
    activities: list[ActivityView] = Field(description="In definition order.")


class InstancePage(BaseModel):
    items: list[InstanceSummary] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last one."
    )


class CancelAccepted(BaseModel):
    """A cancel command was sent; the scheduler ends the instance."""

    id: UUID
    status: InstanceStatus = Field(description="The status when the command was sent.")
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
    items: list[HistoryEvent] = Field(description="Every event, oldest first.")


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


class ResolveRequest(BaseModel):
    """An operator's decision on a flagged activity. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["retry", "skip", "fail"] = Field(
        description="`retry`: run it again as a new attempt; `skip`: mark it SKIPPED (done) with "
        "`output`; `fail`: fail the activity, and with it the instance."
    )
    output: dict[str, Any] | None = Field(
        default=None,
        description="Only with `skip`: the output later steps see (`{}` when omitted).",
    )


class ResolveAccepted(BaseModel):
    """The decision was sent to the scheduler, which applies it and records it in the history."""

    id: UUID
    step: str
    action: Literal["retry", "skip", "fail"]
    status: Literal["RESOLVE_REQUESTED"] = "RESOLVE_REQUESTED"
