"""The process engine: a pure state machine.

`apply(definition, state, event, now, policy)` returns the next state, the decisions the
scheduler must carry out and the history entries that explain them. It does no I/O and reads
no clock, so any interleaving of results, claims and crashes can be replayed and tested.

Progress is computed by walking the definition against the state: a sequence runs its first
unfinished step; a condition takes the branch it chose once; a parallel step advances every
branch and joins when all are done. Walking again after any event is idempotent.

The failover rule (DESIGN.md, "The rule, precisely") lives in `claim`: a worker claims an
attempt before running it. An attempt another server claimed and the broker then redelivered
is restarted as a new attempt when restartable, and flagged for an operator when not.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.activity_types import ACTIVITY_TYPES
from paceline_engine.definitions import ActivityStep, ConditionStep, Definition, Step
from paceline_engine.events import (
    ActivityCompleted,
    ActivityFailed,
    AnswerClaim,
    Cancel,
    Claim,
    DeadlineExpired,
    Decision,
    Dispatch,
    Event,
    Finish,
    HistoryEntry,
    HistoryKind,
    Policy,
    Quarantined,
    Resolve,
    SetDeadline,
    Start,
)
from paceline_engine.expressions import EvaluationError
from paceline_engine.state import ActivityState, Flag, InstanceState

_DONE = (ActivityStatus.COMPLETED, ActivityStatus.SKIPPED)
_DEFAULT_POLICY = Policy()


class Transition:
    __slots__ = ("changed_steps", "decisions", "history", "state")

    def __init__(
        self,
        state: InstanceState,
        decisions: list[Decision],
        history: list[HistoryEntry],
        changed_steps: frozenset[str],
    ) -> None:
        self.state = state
        self.decisions = decisions
        self.history = history
        self.changed_steps = changed_steps
        """Activities whose state this transition changed."""

    @property
    def changed(self) -> bool:
        return bool(
            self.changed_steps
            or self.history
            or any(not isinstance(d, AnswerClaim) for d in self.decisions)
        )


class _Walk(Enum):
    DONE = "done"
    BLOCKED = "blocked"
    FAILED = "failed"


class _Apply:
    def __init__(
        self, definition: Definition, state: InstanceState, now: datetime, policy: Policy
    ) -> None:
        self.definition = definition
        self.state = state.model_copy(deep=True)
        self.now = now
        self.policy = policy
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

    # --- events --------------------------------------------------------------------------------

    def start(self) -> None:
        if self.state.status is not InstanceStatus.PENDING:
            self.note(HistoryKind.IGNORED, f"start ignored: instance is {self.state.status}")
            return
        self.state.status = InstanceStatus.RUNNING
        self.state.started_at = self.now
        self.note(HistoryKind.STARTED, "instance started")
        self.advance()

    def completed(self, event: ActivityCompleted) -> None:
        activity = self.current(event.step, event.attempt, "completed", event.server_id)
        if activity is None:
            return
        self.unflag(activity, event.step, event.attempt, event.server_id, "completed")
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
        activity = self.current(event.step, event.attempt, "failed", event.server_id)
        if activity is None:
            return
        self.unflag(activity, event.step, event.attempt, event.server_id, "failed")
        self.ran(activity, event.server_id, event.started_at, event.finished_at)
        activity.error = event.error
        self.changed.add(event.step)
        step = self.definition.activity(event.step)
        if event.timed_out:
            self.timed_out(
                step,
                activity,
                f"attempt {event.attempt} on {event.server_id} timed out: {event.error.message}",
                event.server_id,
            )
            self.advance()
            return
        self.note(
            HistoryKind.FAILED,
            f"attempt {event.attempt} failed on {event.server_id}: "
            f"{event.error.kind}: {event.error.message}",
            event.step,
            event.attempt,
        )
        # Failures are counted apart from attempts: attempts also end in crashes, time-outs and
        # operator retries, which must not use up the author's retry policy.
        activity.failures += 1
        if activity.failures < step.retry.max_attempts:
            reason = (
                f"failure {activity.failures} of {step.retry.max_attempts} allowed; "
                f"retrying after {step.retry.backoff_s:g}s"
            )
            not_before = self.now + timedelta(seconds=step.retry.backoff_s)
            self.dispatch(step, activity.attempt + 1, not_before, reason, HistoryKind.RETRY)
        else:
            activity.status = ActivityStatus.FAILED
            activity.reason = f"failed {activity.failures} time(s)"
        self.advance()

    def claim(self, event: Claim) -> None:
        activity = self.state.activities.get(event.step)
        refusal = self.claim_refusal(event, activity)
        if refusal is not None:
            if not event.wants_reply:
                return  # a start notice that arrived after the result: nothing to say
            self.answer(event, False, event.attempt, refusal)
            self.note(
                HistoryKind.CLAIM_REFUSED,
                f"{event.server_id}: {refusal}",
                event.step,
                event.attempt,
            )
            return
        assert activity is not None
        holder, since = activity.claimed_by, activity.claimed_at
        if holder is None or holder == event.server_id:
            if holder is None:
                self.hold(activity, event.step, event.server_id, event.at, event.delivery_count)
                how = " (redelivered, but never started before)" if event.redelivered else ""
                self.note(
                    HistoryKind.CLAIMED,
                    f"attempt {event.attempt} claimed by {event.server_id}{how}",
                    event.step,
                    event.attempt,
                    server=event.server_id,
                )
            self.answer(event, True, activity.attempt, "granted")
            return
        if not event.redelivered or event.delivery_count <= activity.claim_delivery:
            # A second copy of the message (a publish repeated after a crash), or an older
            # delivery of it whose claim arrived late: the holder has a newer one. Not a crash.
            what = (
                "a duplicate delivery"
                if not event.redelivered
                else (
                    f"delivery {event.delivery_count + 1} is older than the holder's "
                    f"{activity.claim_delivery + 1}"
                )
            )
            reason = f"attempt {event.attempt} is already claimed by {holder}"
            self.answer(event, False, event.attempt, reason)
            self.note(
                HistoryKind.CLAIM_REFUSED,
                f"{event.server_id}: {reason} ({what})",
                event.step,
                event.attempt,
            )
            return
        lost = (
            f"attempt {activity.attempt} held by {holder} since {_at(since)} was redelivered "
            f"to {event.server_id} (delivery {event.delivery_count + 1})"
        )
        self.note(
            HistoryKind.REDELIVERED,
            lost,
            event.step,
            activity.attempt,
            server=holder,
            since=_at(since),
            to=event.server_id,
            delivery=event.delivery_count + 1,
        )
        if not activity.restartable:
            self.flag(
                activity,
                event.step,
                "redelivered",
                f"{lost}: it may have started, and it is not restartable",
                holder,
                since,
            )
            self.answer(event, False, activity.attempt, "flagged: it may have started elsewhere")
            return
        activity.interruptions += 1
        if activity.interruptions >= self.policy.crash_budget:
            self.flag(
                activity,
                event.step,
                "crash_budget",
                f"crash budget exhausted: interrupted {activity.interruptions} times; last: {lost}",
                holder,
                since,
            )
            self.answer(
                event, False, activity.attempt, "flagged: crash budget exhausted", quarantine=True
            )
            return
        activity.attempt += 1
        self.hold(activity, event.step, event.server_id, event.at, event.delivery_count)
        self.note(
            HistoryKind.RESTARTED,
            f"restartable: running again as attempt {activity.attempt} on {event.server_id}",
            event.step,
            activity.attempt,
        )
        self.answer(event, True, activity.attempt, f"restarted as attempt {activity.attempt}")

    def claim_refusal(self, event: Claim, activity: ActivityState | None) -> str | None:
        if activity is None:
            return "no such activity was dispatched"
        if self.state.status.is_final:
            return f"the instance is {self.state.status}"
        if activity.status.is_final:
            return f"the activity is {activity.status}"
        if event.attempt not in (activity.attempt, activity.message_attempt):
            return (
                f"attempt {event.attempt} is stale: the activity is at attempt {activity.attempt}"
            )
        if activity.status is ActivityStatus.INTERRUPTED:
            return "the activity is flagged, waiting for an operator"
        return None

    def quarantined(self, event: Quarantined) -> None:
        activity = self.state.activities.get(event.step)
        if activity is None or activity.status.is_final or self.state.status.is_final:
            self.note(
                HistoryKind.IGNORED,
                "quarantine of an activity that has ended",
                event.step,
                event.attempt,
            )
            return
        if activity.status is ActivityStatus.INTERRUPTED:
            return
        if event.attempt not in (activity.attempt, activity.message_attempt):
            # A copy of an older attempt's message: the attempt running now crashed nothing.
            self.note(
                HistoryKind.IGNORED,
                f"quarantine of attempt {event.attempt} ignored: the activity is at attempt "
                f"{activity.attempt}",
                event.step,
                event.attempt,
            )
            return
        self.flag(
            activity,
            event.step,
            "crash_budget",
            f"crash budget exhausted: attempt {activity.attempt} (last held by "
            f"{activity.claimed_by or 'no server'} since {_at(activity.claimed_at)}) was "
            f"delivered {event.deliveries} times and a worker went down each time; quarantined "
            f"by {event.server_id}",
            activity.claimed_by,
            activity.claimed_at,
        )

    def deadline(self, event: DeadlineExpired) -> None:
        activity = self.state.activities.get(event.step)
        if (
            activity is None
            or activity.attempt != event.attempt
            or self.state.status.is_final
            or activity.status is not ActivityStatus.RUNNING
        ):
            return  # it ended in time, or is already handled: timers leave no trace then
        step = self.definition.activity(event.step)
        if step.timeout_s is None:
            return  # no timer of ours: a stray message (e.g. a definition without timeouts)
        self.timed_out(
            step,
            activity,
            f"attempt {event.attempt} on {activity.claimed_by} sent "
            f"no result within its timeout of {step.timeout_s:g}s",
            activity.claimed_by,
        )
        self.advance()

    def resolve(self, event: Resolve) -> None:
        activity = self.state.activities.get(event.step)
        if (
            activity is None
            or activity.status is not ActivityStatus.INTERRUPTED
            or self.state.status.is_final
            or event.attempt not in (None, activity.attempt)
        ):
            why = "is not flagged"
            if activity is not None and activity.status is ActivityStatus.INTERRUPTED:
                why = f"is flagged at attempt {activity.attempt}, not {event.attempt}"
            self.note(
                HistoryKind.IGNORED,
                f"{event.by}'s {event.action} ignored: the activity {why}",
                event.step,
                event.attempt,
            )
            return
        self.note(
            HistoryKind.RESOLVED,
            f"{event.by} chose {event.action}",
            event.step,
            activity.attempt,
            action=event.action,
        )
        activity.flag = None
        step = self.definition.activity(event.step)
        if event.action == "retry":
            self.dispatch(step, activity.attempt + 1, None, f"{event.by} chose retry")
            # The operator took responsibility for running it again: a fresh crash budget.
            self.state.activities[event.step].interruptions = 0
        elif event.action == "skip":
            activity.status = ActivityStatus.SKIPPED
            activity.output = {} if event.output is None else event.output
            activity.reason = f"skipped by {event.by}"
            self.changed.add(event.step)
        else:
            activity.status = ActivityStatus.FAILED
            activity.error = ActivityError(kind="operator", message=f"failed by {event.by}")
            activity.reason = f"failed by {event.by}"
            self.changed.add(event.step)
        self.refresh_status()
        self.advance()

    def cancel(self, event: Cancel) -> None:
        if self.state.status.is_final:
            self.note(HistoryKind.IGNORED, f"cancel ignored: instance is {self.state.status}")
            return
        self.finish(InstanceStatus.CANCELLED, None, HistoryKind.INSTANCE_CANCELLED, event.reason)

    # --- helpers -------------------------------------------------------------------------------

    def current(self, step: str, attempt: int, outcome: str, server: str) -> ActivityState | None:
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
                f"attempt {attempt} {outcome} on {server}, late: the activity is "
                f"{activity.status} at attempt {activity.attempt}; recorded, not applied",
                step,
                attempt,
                server=server,
            )
            return None
        return activity

    def unflag(
        self, activity: ActivityState, step: str, attempt: int, server: str, outcome: str
    ) -> None:
        if activity.status is not ActivityStatus.INTERRUPTED:
            return
        self.note(
            HistoryKind.RESOLVED,
            f"attempt {attempt} on {server} reported {outcome} "
            "after it was flagged: the flag resolves itself",
            step,
            attempt,
        )
        activity.flag = None
        activity.status = ActivityStatus.RUNNING
        self.refresh_status()

    def hold(
        self, activity: ActivityState, step: str, server: str, at: datetime, delivery: int = 0
    ) -> None:
        activity.status = ActivityStatus.RUNNING
        activity.claimed_by = server
        activity.claimed_at = at
        activity.claim_delivery = delivery
        activity.server_id = server
        activity.started_at = at
        self.changed.add(step)
        timeout = self.definition.activity(step).timeout_s
        if timeout is not None:
            at_latest = at + timedelta(seconds=timeout + self.policy.deadline_grace_s)
            self.decisions.append(SetDeadline(step, activity.attempt, at_latest))

    def answer(
        self, event: Claim, granted: bool, attempt: int, reason: str, *, quarantine: bool = False
    ) -> None:
        if event.wants_reply:
            self.decisions.append(AnswerClaim(granted, attempt, reason, quarantine))

    def timed_out(
        self, step: ActivityStep, activity: ActivityState, what: str, server: str | None
    ) -> None:
        self.changed.add(step.id)
        if not activity.restartable:
            self.flag(
                activity,
                step.id,
                "timeout",
                f"{what}; it may have had its effect, and it is not restartable",
                server,
                activity.claimed_at,
            )
            return
        activity.interruptions += 1
        self.note(HistoryKind.TIMED_OUT, what, step.id, activity.attempt)
        if activity.interruptions < self.policy.crash_budget:
            self.dispatch(
                step,
                activity.attempt + 1,
                None,
                f"restartable: a new attempt after a time-out "
                f"({activity.interruptions} of {self.policy.crash_budget})",
                HistoryKind.RETRY,
            )
            return
        activity.status = ActivityStatus.TIMED_OUT
        activity.error = activity.error or ActivityError(kind="timeout", message=what)
        activity.reason = f"timed out {activity.interruptions} times"

    def flag(
        self,
        activity: ActivityState,
        step: str,
        kind: str,
        reason: str,
        server: str | None,
        since: datetime | None,
    ) -> None:
        activity.status = ActivityStatus.INTERRUPTED
        activity.reason = reason
        activity.flag = Flag(
            kind=kind,
            reason=reason,
            attempt=activity.attempt,
            server_id=server,
            held_since=since,
            flagged_at=self.now,
        )
        self.changed.add(step)
        self.note(HistoryKind.FLAGGED, reason, step, activity.attempt, flag=kind)
        self.refresh_status()

    def refresh_status(self) -> None:
        if self.state.status not in (InstanceStatus.RUNNING, InstanceStatus.FLAGGED):
            return
        flagged = any(
            a.status is ActivityStatus.INTERRUPTED for a in self.state.activities.values()
        )
        self.state.status = InstanceStatus.FLAGGED if flagged else InstanceStatus.RUNNING

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
        previous = self.state.activities.get(step.id)
        try:
            params = step.params.render(self.state.expression_context())
        except EvaluationError as exc:
            self.fail_step(step, attempt, ActivityError(kind="expression", message=str(exc)))
            return
        if not isinstance(params, dict):
            self.fail_step(
                step, attempt, ActivityError(kind="expression", message="'with' is not an object")
            )
            return
        restartable = ACTIVITY_TYPES[step.type].restartable(params, step.restartable_override)
        self.state.activities[step.id] = ActivityState(
            type=step.type,
            status=ActivityStatus.SCHEDULED,
            attempt=attempt,
            message_attempt=attempt,
            restartable=restartable,
            reason=reason,
            interruptions=previous.interruptions if previous else 0,
            failures=previous.failures if previous else 0,
        )
        self.changed.add(step.id)
        self.decisions.append(
            Dispatch(step.id, step.type, params, attempt, restartable, step.timeout_s, not_before)
        )
        self.note(kind, reason, step.id, attempt, restartable=restartable)

    def fail_step(self, step: ActivityStep, attempt: int, error: ActivityError) -> None:
        self.state.activities[step.id] = ActivityState(
            type=step.type,
            status=ActivityStatus.FAILED,
            attempt=attempt,
            restartable=False,
            error=error,
            reason="its parameters could not be evaluated",
        )
        self.changed.add(step.id)
        self.note(HistoryKind.FAILED, f"{error.kind}: {error.message}", step.id, attempt)

    def advance(self) -> None:
        if self.state.status not in (InstanceStatus.RUNNING, InstanceStatus.FLAGGED):
            return
        walk = self.walk(self.definition.steps)
        if walk is _Walk.DONE:
            self.state.outputs = {
                step: a.output for step, a in self.state.activities.items() if a.status in _DONE
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
        unsent = {d.step: d.attempt for d in self.decisions if isinstance(d, Dispatch)}
        self.decisions = [d for d in self.decisions if not isinstance(d, Dispatch | SetDeadline)]
        self.history = [
            h
            for h in self.history
            if not (h.kind in (HistoryKind.DISPATCHED, HistoryKind.RETRY) and h.step in unsent)
        ]
        for step, attempt in unsent.items():
            if attempt == 1:
                del self.state.activities[step]
                self.changed.discard(step)
        for step, activity in self.state.activities.items():
            if not activity.status.is_final:
                # A worker may still be running it; its result will arrive late and be ignored.
                activity.status = ActivityStatus.CANCELLED
                activity.reason = f"instance {status.value.lower()}"
                activity.flag = None
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
            if activity.status in _DONE:
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


def _at(moment: datetime | None) -> str:
    return moment.isoformat(timespec="milliseconds") if moment else "an unknown time"


def new_instance(inputs: dict[str, Any]) -> InstanceState:
    return InstanceState(inputs=inputs)


def apply(
    definition: Definition,
    state: InstanceState,
    event: Event,
    now: datetime,
    policy: Policy | None = None,
) -> Transition:
    """The pure transition function: never mutates `state`."""
    run = _Apply(definition, state, now, policy or _DEFAULT_POLICY)
    match event:
        case Start():
            run.start()
        case ActivityCompleted():
            run.completed(event)
        case ActivityFailed():
            run.failed(event)
        case Claim():
            run.claim(event)
        case Quarantined():
            run.quarantined(event)
        case DeadlineExpired():
            run.deadline(event)
        case Resolve():
            run.resolve(event)
        case Cancel():
            run.cancel(event)
    return run.result()
