"""The process engine: a pure state machine.

`apply(definition, state, event, now)` returns the next state, the decisions the scheduler must
carry out (dispatch an activity, end the instance) and the history entries that explain them. It
does no I/O and reads no clock, so every interleaving of events can be replayed and tested.

Progress is computed by walking the definition against the state: a sequence runs its first
unfinished step; a condition takes the branch it chose once; a parallel step advances every
branch and joins when all are done. Walking again after any event is idempotent: an activity
already dispatched is never dispatched again unless a new attempt is decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum, StrEnum
from typing import Any

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.activity_types import ACTIVITY_TYPES
from paceline_engine.definitions import (
    ActivityStep,
    ConditionStep,
    Definition,
    Step,
)
from paceline_engine.expressions import EvaluationError
from paceline_engine.state import ActivityState, InstanceState

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
    step: str
    attempt: int
    error: ActivityError
    server_id: str
    started_at: datetime
    finished_at: datetime
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class Cancel:
    reason: str


Event = Start | ActivityCompleted | ActivityFailed | Cancel

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


@dataclass(frozen=True, slots=True)
class Finish:
    """The instance reached a final status."""

    status: InstanceStatus


Decision = Dispatch | Finish


class HistoryKind(StrEnum):
    STARTED = "started"
    DISPATCHED = "dispatched"
    COMPLETED = "activity_completed"
    FAILED = "activity_failed"
    RETRY = "retry_scheduled"
    BRANCH = "branch_taken"
    LATE_RESULT = "late_result"
    IGNORED = "ignored"
    INSTANCE_COMPLETED = "instance_completed"
    INSTANCE_FAILED = "instance_failed"
    INSTANCE_CANCELLED = "instance_cancelled"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    kind: HistoryKind
    reason: str
    step: str | None = None
    attempt: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Transition:
    state: InstanceState
    decisions: list[Decision]
    history: list[HistoryEntry]
    changed_steps: frozenset[str]
    """Activities whose state this transition changed."""

    @property
    def changed(self) -> bool:
        return bool(self.decisions or self.changed_steps or self.history)


# --- the machine -------------------------------------------------------------------------------


class _Walk(Enum):
    DONE = "done"
    BLOCKED = "blocked"
    FAILED = "failed"


class _Apply:
    def __init__(self, definition: Definition, state: InstanceState, now: datetime) -> None:
        self.definition = definition
        self.state = state.model_copy(deep=True)
        self.now = now
        self.decisions: list[Decision] = []
        self.history: list[HistoryEntry] = []
        self.changed: set[str] = set()
        self.failure: ActivityError | None = None

    def note(
        self,
        kind: HistoryKind,
        reason: str,
        step: str | None = None,
        attempt: int | None = None,
        **data: Any,
    ) -> None:
        self.history.append(HistoryEntry(kind, reason, step, attempt, data))

    def result(self) -> Transition:
        return Transition(self.state, self.decisions, self.history, frozenset(self.changed))

    # events

    def start(self) -> None:
        if self.state.status is not InstanceStatus.PENDING:
            self.note(HistoryKind.IGNORED, f"start ignored: instance is {self.state.status}")
            return
        self.state.status = InstanceStatus.RUNNING
        self.state.started_at = self.now
        self.note(HistoryKind.STARTED, "instance started")
        self.advance()

    def completed(self, event: ActivityCompleted) -> None:
        activity = self.current(event.step, event.attempt, "completed")
        if activity is None:
            return
        activity.status = ActivityStatus.COMPLETED
        activity.output = event.output
        activity.error = None
        self.ran(activity, event.server_id, event.started_at, event.finished_at)
        self.changed.add(event.step)
        self.note(
            HistoryKind.COMPLETED,
            f"attempt {event.attempt} completed on {event.server_id}",
            event.step,
            event.attempt,
        )
        self.advance()

    def failed(self, event: ActivityFailed) -> None:
        activity = self.current(event.step, event.attempt, "failed")
        if activity is None:
            return
        self.ran(activity, event.server_id, event.started_at, event.finished_at)
        activity.error = event.error
        self.changed.add(event.step)
        what = "timed out" if event.timed_out else "failed"
        self.note(
            HistoryKind.FAILED,
            f"attempt {event.attempt} {what} on {event.server_id}: "
            f"{event.error.kind}: {event.error.message}",
            event.step,
            event.attempt,
        )
        step = self.definition.activity(event.step)
        if event.attempt < step.retry.max_attempts:
            not_before = self.now + timedelta(seconds=step.retry.backoff_s)
            reason = (
                f"attempt {event.attempt} of {step.retry.max_attempts} {what}; "
                f"retrying after {step.retry.backoff_s:g}s"
            )
            self.dispatch(step, event.attempt + 1, not_before, reason, HistoryKind.RETRY)
        else:
            activity.status = ActivityStatus.TIMED_OUT if event.timed_out else ActivityStatus.FAILED
            activity.reason = f"{what} after {event.attempt} attempt(s)"
        self.advance()

    def cancel(self, event: Cancel) -> None:
        if self.state.status.is_final:
            self.note(HistoryKind.IGNORED, f"cancel ignored: instance is {self.state.status}")
            return
        self.finish(InstanceStatus.CANCELLED, None, HistoryKind.INSTANCE_CANCELLED, event.reason)

    # helpers

    def current(self, step: str, attempt: int, outcome: str) -> ActivityState | None:
        """The activity, when a result of `attempt` may still advance it."""
        activity = self.state.activities.get(step)
        if activity is None:
            self.note(
                HistoryKind.IGNORED,
                f"result for a step never dispatched ({outcome})",
                step,
                attempt,
            )
            return None
        if attempt != activity.attempt or activity.status.is_final or self.state.status.is_final:
            self.note(
                HistoryKind.LATE_RESULT,
                f"attempt {attempt} {outcome} late: the activity is {activity.status} "
                f"at attempt {activity.attempt}",
                step,
                attempt,
            )
            return None
        return activity

    def ran(
        self, activity: ActivityState, server: str, started: datetime, finished: datetime
    ) -> None:
        activity.server_id = server
        activity.started_at = started
        activity.finished_at = finished

    def dispatch(
        self,
        step: ActivityStep,
        attempt: int,
        not_before: datetime | None,
        reason: str,
        kind: HistoryKind = HistoryKind.DISPATCHED,
    ) -> None:
        activity_type = ACTIVITY_TYPES[step.type]
        try:
            params = step.params.render(self.state.expression_context())
        except EvaluationError as exc:
            self.fail_step(step, ActivityError(kind="expression", message=str(exc)))
            return
        if not isinstance(params, dict):
            self.fail_step(
                step, ActivityError(kind="expression", message="'with' is not an object")
            )
            return
        restartable = activity_type.restartable(params, step.restartable_override)
        self.state.activities[step.id] = ActivityState(
            type=step.type,
            status=ActivityStatus.SCHEDULED,
            attempt=attempt,
            restartable=restartable,
            reason=reason,
        )
        self.changed.add(step.id)
        self.decisions.append(
            Dispatch(step.id, step.type, params, attempt, restartable, step.timeout_s, not_before)
        )
        self.note(kind, reason, step.id, attempt, restartable=restartable)

    def fail_step(self, step: ActivityStep, error: ActivityError) -> None:
        previous = self.state.activities.get(step.id)
        self.state.activities[step.id] = ActivityState(
            type=step.type,
            status=ActivityStatus.FAILED,
            attempt=previous.attempt if previous else 0,
            restartable=previous.restartable if previous else False,
            error=error,
            reason="its parameters could not be evaluated",
        )
        self.changed.add(step.id)
        self.note(HistoryKind.FAILED, f"{error.kind}: {error.message}", step.id)

    def advance(self) -> None:
        if self.state.status is not InstanceStatus.RUNNING:
            return
        walk = self.walk(self.definition.steps)
        if walk is _Walk.DONE:
            self.state.outputs = {
                step: a.output
                for step, a in self.state.activities.items()
                if a.status in (ActivityStatus.COMPLETED, ActivityStatus.SKIPPED)
            }
            self.finish(
                InstanceStatus.COMPLETED,
                None,
                HistoryKind.INSTANCE_COMPLETED,
                "every step finished",
            )
        elif walk is _Walk.FAILED:
            error = self.failure or ActivityError(kind="failed", message="a step failed")
            self.finish(
                InstanceStatus.FAILED,
                error,
                HistoryKind.INSTANCE_FAILED,
                f"{error.kind}: {error.message}",
            )

    def finish(
        self, status: InstanceStatus, error: ActivityError | None, kind: HistoryKind, reason: str
    ) -> None:
        self.state.status = status
        self.state.error = error
        self.state.finished_at = self.now
        # Activities dispatched in this same transition were never sent: take them back.
        unsent = {d.step for d in self.decisions if isinstance(d, Dispatch)}
        self.decisions = [d for d in self.decisions if not isinstance(d, Dispatch)]
        self.history = [
            h
            for h in self.history
            if not (h.kind in (HistoryKind.DISPATCHED, HistoryKind.RETRY) and h.step in unsent)
        ]
        for step, activity in self.state.activities.items():
            if not activity.status.is_final:
                # A worker may still be running it; its result will arrive late and be ignored.
                activity.status = ActivityStatus.CANCELLED
                activity.reason = f"instance {status.value.lower()}"
                self.changed.add(step)
        self.decisions.append(Finish(status))
        self.note(kind, reason)

    def walk(self, steps: tuple[Step, ...]) -> _Walk:
        for step in steps:
            outcome = self.walk_step(step)
            if outcome is not _Walk.DONE:
                return outcome
        return _Walk.DONE

    def walk_step(self, step: Step) -> _Walk:
        if isinstance(step, ActivityStep):
            activity = self.state.activities.get(step.id)
            if activity is None:
                self.dispatch(step, 1, None, "its turn came")
                activity = self.state.activities[step.id]
            if activity.status in (ActivityStatus.COMPLETED, ActivityStatus.SKIPPED):
                return _Walk.DONE
            if activity.status.is_final:
                self.failure = self.failure or activity.error
                return _Walk.FAILED
            return _Walk.BLOCKED
        if isinstance(step, ConditionStep):
            taken = self.state.branches.get(step.id)
            if taken is None:
                try:
                    taken = bool(step.condition.evaluate(self.state.expression_context()))
                except EvaluationError as exc:
                    self.failure = ActivityError(kind="expression", message=f"{step.id}.if: {exc}")
                    return _Walk.FAILED
                self.state.branches[step.id] = taken
                self.note(
                    HistoryKind.BRANCH,
                    f"'{step.condition.source}' is {taken}: took {'then' if taken else 'else'}",
                    step.id,
                )
            return self.walk(step.then if taken else step.otherwise)
        outcomes = [self.walk(branch) for branch in step.branches]
        if _Walk.FAILED in outcomes:
            return _Walk.FAILED
        if _Walk.BLOCKED in outcomes:
            return _Walk.BLOCKED
        return _Walk.DONE


def new_instance(inputs: dict[str, Any]) -> InstanceState:
    return InstanceState(inputs=inputs)


def apply(definition: Definition, state: InstanceState, event: Event, now: datetime) -> Transition:
    """The pure transition function: never mutates `state`."""
    run = _Apply(definition, state, now)
    if isinstance(event, Start):
        run.start()
    elif isinstance(event, ActivityCompleted):
        run.completed(event)
    elif isinstance(event, ActivityFailed):
        run.failed(event)
    else:
        run.cancel(event)
    return run.result()
