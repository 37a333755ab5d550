"""The durable state of one process instance, as the engine reads and writes it.

The scheduler stores it as one JSON document per instance, so one row update commits a whole
transition; the admin API reads the same document to show activities.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus


class FlagKind(StrEnum):
    """Why an activity waits for an operator."""

    REDELIVERED = "redelivered"
    """The broker handed the attempt to another worker after its holder claimed it: the holder
    died (or lost its connection) and may have started it."""
    TIMEOUT = "timeout"
    """The step's timeout ended an attempt that may have had its effect."""
    OUTCOME_UNKNOWN = "outcome_unknown"
    """The adapter ended without proof that the effect did not happen (a request sent with no
    complete answer, a program killed by a signal or its own timeout)."""
    DRAIN_DEADLINE = "drain_deadline"
    """The worker's drain reached its grace deadline while the attempt still ran."""
    CRASH_BUDGET = "crash_budget"
    """The attempt crashed its runner while running alone, `PACELINE_CRASH_BUDGET` times."""


class Flag(BaseModel):
    """Why an activity waits for an operator: its outcome is unknown."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    """A `FlagKind`."""
    reason: str
    attempt: int
    server_id: str | None = None
    """The server that held the attempt."""
    held_since: datetime | None = None
    flagged_at: datetime


class Crash(BaseModel):
    """An attempt of this activity was running when its runner died."""

    model_config = ConfigDict(extra="forbid")

    attempt: int
    server_id: str | None
    """The server that held the attempt (the worker, or the worker whose isolated runner it
    was)."""
    since: datetime | None = None
    """When that server claimed the attempt."""
    detected_at: datetime
    alone: bool
    """It ran alone (in an isolated runner): the crash is charged to it. Otherwise it was one
    of the suspects of a worker's death, and nothing is charged."""


class CancelRequest(BaseModel):
    """A cancel the engine recorded."""

    model_config = ConfigDict(extra="forbid")

    by: str
    reason: str
    requested_at: datetime


class ActivityState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    status: ActivityStatus
    attempt: int
    """The current attempt: the only one whose result advances the process."""
    message_attempt: int = 0
    """The attempt in the activity message going round; a redelivery restarts under a new
    attempt without a new message, so a later claim of that message names this one."""
    restartable: bool
    """Effective restartability: the type's default or the author's override."""
    server_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    output: Any = None
    error: ActivityError | None = None
    reason: str | None = None
    """Why the activity is where it is, when that is not obvious (a retry, a flag)."""
    claimed_by: str | None = None
    """The server that claimed the current attempt: it may have started it."""
    claimed_at: datetime | None = None
    claim_delivery: int = 0
    """The broker's delivery count of the holder's copy: an older delivery's claim is stale."""
    interruptions: int = 0
    """Attempts charged to the activity itself: crashes of its runner while it ran alone, and
    time-outs. Bounded by the crash budget."""
    failures: int = 0
    """Attempts that reported a failure; bounded by the step's retry policy."""
    flag: Flag | None = None
    """Set while the activity is INTERRUPTED, waiting for an operator."""
    isolated: bool = False
    """The current attempt runs alone, in an isolated runner: it is a suspect."""
    crashes: list[Crash] = Field(default_factory=list)
    """The most recent crashes it was part of (at most `MAX_CRASHES_KEPT`), oldest first."""


MAX_CRASHES_KEPT = 10


class InstanceState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: InstanceStatus = InstanceStatus.PENDING
    inputs: dict[str, Any] = Field(default_factory=dict)
    activities: dict[str, ActivityState] = Field(default_factory=dict)
    """Every activity dispatched so far, by step id (unordered: jsonb does not keep key
    order; show them in definition order)."""
    branches: dict[str, bool] = Field(default_factory=dict)
    """Condition step id -> True when `then` was taken; decided once, never re-evaluated."""
    outputs: dict[str, Any] | None = None
    error: ActivityError | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    seq: int = 0
    """Transactions applied so far; orders the events reporting receives."""
    cancel: CancelRequest | None = None
    """Set once a cancel is recorded (the instance is CANCELLING or CANCELLED)."""

    def expression_context(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "steps": {
                step: {"output": a.output}
                for step, a in self.activities.items()
                if a.status in (ActivityStatus.COMPLETED, ActivityStatus.SKIPPED)
            },
        }
