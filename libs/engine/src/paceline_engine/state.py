"""The durable state of one process instance, as the engine reads and writes it.

The scheduler stores it in parts, so that a transition reads and writes only what it touches:
a small instance document (status, inputs, counters, joins in progress) and one row per
activity. The engine works on an `InstanceState` that holds the instance document and the
activities loaded so far; when it needs one that is not loaded it raises `NotLoaded`, and the
scheduler loads it and applies the event again (the engine never mutates its input).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

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


class Waiting(BaseModel):
    """What a `wait` step waits for (its activity is WAITING)."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    """`timer` (a `for` or an `until`) or `signal`."""
    due_at: datetime | None
    """When the timer fires, the database's time, fixed when the wait started; for a signal,
    its timeout (None: none)."""
    signal: str | None = None
    """The signal's name."""


class Vote(BaseModel):
    """One decider's choice on an approval."""

    model_config = ConfigDict(extra="forbid")

    by: str
    decision: str
    comment: str | None = None
    at: datetime


class ApprovalState(BaseModel):
    """An `approval` in progress (its record is the `approvals` row of this attempt)."""

    model_config = ConfigDict(extra="forbid")

    approvers: list[str]
    """Who may decide now: the step's, and those every escalation so far added."""
    required: int
    choices: list[str]
    on_timeout: str
    escalations: list[tuple[float, list[str]]] = Field(default_factory=list)
    """Each level: seconds after the start, and the approvers it adds."""
    level: int = 0
    """Escalation levels reached."""
    votes: list[Vote] = Field(default_factory=list)


class BufferedSignal(BaseModel):
    """A signal that arrived before the process reached a wait that takes it."""

    model_config = ConfigDict(extra="forbid")

    signal_id: str
    name: str
    payload: dict[str, Any]
    by: str
    received_at: datetime


MAX_BUFFERED_SIGNALS = 20
"""Signals an instance holds for waits it has not reached; more are kept as late (refused).
With the admin API's 16 KiB payload limit, they add at most about 330 KiB to the instance's
document (the signals table keeps every signal in full)."""


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
    waiting: Waiting | None = None
    """For a `wait` step or an `approval`: what it waits for (kept once it ended)."""
    approval: ApprovalState | None = None
    """For an `approval`: its approvers, escalations and votes."""


MAX_CRASHES_KEPT = 10


class NotLoaded(Exception):
    """The transition needs activities the partial state does not hold: load them (every
    activity named in `steps`; every open one when `open`; every one when `every`) and apply
    the event again."""

    def __init__(
        self, steps: frozenset[str] = frozenset(), *, open: bool = False, every: bool = False
    ) -> None:
        super().__init__(f"needs {sorted(steps)} open={open} every={every}")
        self.steps = steps
        self.open = open
        self.every = every


class InstanceState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: InstanceStatus = InstanceStatus.PENDING
    inputs: dict[str, Any] = Field(default_factory=dict)
    activities: dict[str, ActivityState] = Field(default_factory=dict)
    """The activities held in memory, by step id: every one dispatched so far in a complete
    state (a new instance, the engine's tests), those loaded so far in a partial one (the
    scheduler's). Stored as rows of their own, never in the instance document."""
    counts: dict[str, int] = Field(default_factory=dict)
    """How many activities are in each `ActivityStatus` (loaded or not); absent means 0."""
    branches: dict[str, bool] = Field(default_factory=dict)
    """Condition step id -> True when `then` was taken, for conditions entered and not yet
    finished (the history keeps every choice); decided once, never re-evaluated."""
    joins: dict[str, int] = Field(default_factory=dict)
    """Parallel step id -> branches not finished yet, for parallel steps in progress."""
    signals: list[BufferedSignal] = Field(default_factory=list)
    """Signals waiting for a wait that takes them, oldest first (at most
    `MAX_BUFFERED_SIGNALS`)."""
    error: ActivityError | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    seq: int = 0
    """Transactions applied so far; orders the events reporting receives."""
    cancel: CancelRequest | None = None
    """Set once a cancel is recorded (the instance is CANCELLING or CANCELLED)."""

    _partial: bool = PrivateAttr(default=False)
    _absent: set[str] = PrivateAttr(default_factory=set)
    _open_loaded: bool = PrivateAttr(default=False)

    @classmethod
    def partial(cls, document: dict[str, Any]) -> InstanceState:
        """The instance document as stored, without its activities: load them as needed."""
        state = cls.model_validate(document)
        state._partial = True
        return state

    @property
    def is_partial(self) -> bool:
        return self._partial

    def add_loaded(
        self,
        rows: dict[str, ActivityState],
        looked_up: set[str] | frozenset[str] = frozenset(),
        *,
        open: bool = False,
        every: bool = False,
    ) -> None:
        """Activities read from the store: `rows` found; `looked_up` steps asked for (those
        not in `rows` do not exist); `open`: every open activity is now loaded; `every`: every
        activity is. Activities already held are kept: they may have changed in memory."""
        for step, activity in rows.items():
            self.activities.setdefault(step, activity)
        self._absent |= set(looked_up) - set(rows) - set(self.activities)
        self._open_loaded = self._open_loaded or open or every
        if every:
            self._partial = False

    def lookup(self, step: str) -> ActivityState | None:
        """The activity of `step`, None when it was never dispatched; raises NotLoaded when a
        partial state does not know."""
        activity = self.activities.get(step)
        if activity is not None or not self._partial or step in self._absent:
            return activity
        raise NotLoaded(frozenset({step}))

    def open_activities(self) -> list[tuple[str, ActivityState]]:
        """Every activity not in a final status; raises NotLoaded when they are not all held."""
        if self._partial and not self._open_loaded and self.count_open() > 0:
            raise NotLoaded(open=True)
        return [(s, a) for s, a in self.activities.items() if not a.status.is_final]

    def count_open(self) -> int:
        return sum(n for status, n in self.counts.items() if not ActivityStatus(status).is_final)

    def copy_for_transition(self) -> InstanceState:
        """A deep copy that keeps what is known about the activities not held."""
        copy = self.model_copy(deep=True)
        copy._partial = self._partial
        copy._absent = set(self._absent)
        copy._open_loaded = self._open_loaded
        return copy

    def document(self) -> dict[str, Any]:
        """The instance document as stored (JSON types), without the activities."""
        return self.model_dump(mode="json", exclude={"activities"})


def outputs_of(activities: dict[str, ActivityState]) -> dict[str, Any]:
    """An instance's outputs: each finished (completed or skipped) activity's output, by step."""
    done = (ActivityStatus.COMPLETED, ActivityStatus.SKIPPED)
    return {step: a.output for step, a in activities.items() if a.status in done}
