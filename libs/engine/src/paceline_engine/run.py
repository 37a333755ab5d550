"""One transition in progress: the state being changed, and what it decides and records.

`Run` holds what every event handler shares: dispatching an attempt, flagging, moving on from
the steps that finished to what comes next, finishing the instance. The handlers live in
results.py (what workers report), claims.py (who holds an attempt) and commands.py (start,
cancel, resolve); machine.py routes each event to its handler.

Moving on looks only at where a finished step sits (layout.py): the next step of its
sequence, or, at a sequence's end, the condition or parallel step that owns it (a parallel
step counts the branches it still waits for). Nothing walks the whole definition or reads
every activity, so a transition costs the same at step 5 and at step 5,000, and it reads only
the activities it names (state.py, `NotLoaded`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, ErrorKind, InstanceStatus
from paceline_engine import approvals, progress, waits
from paceline_engine.activity_types import ACTIVITY_TYPES
from paceline_engine.definitions import (
    ActivityStep,
    Definition,
)
from paceline_engine.events import (
    AnswerClaim,
    Claim,
    Decision,
    Dispatch,
    Finish,
    HistoryEntry,
    HistoryKind,
    Policy,
    SetDeadline,
    StopInstance,
)
from paceline_engine.expressions import EvaluationError
from paceline_engine.layout import layout_of
from paceline_engine.progress import ACTIVE, DONE
from paceline_engine.state import (
    MAX_CRASHES_KEPT,
    ActivityState,
    CancelRequest,
    Crash,
    Flag,
    FlagKind,
    InstanceState,
    NotLoaded,
)


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


def at(moment: datetime | None) -> str:
    return moment.isoformat(timespec="milliseconds") if moment else "an unknown time"


class Run:
    def __init__(
        self,
        definition: Definition,
        state: InstanceState,
        now: datetime,
        policy: Policy,
        trigger: Mapping[str, Any] | None = None,
    ) -> None:
        self.definition = definition
        self.trigger = trigger
        """How the instance was started, as its expressions see it (`trigger`); None when
        started through the API (definitions.py: `trigger_for_event`, `trigger_for_schedule`)."""
        self.layout = layout_of(definition)
        self.state = state.copy_for_transition()
        self.before = {step: a.status for step, a in self.state.activities.items()}
        """The status of each activity held when the transition began, for `count`."""
        self.now = now
        self.policy = policy
        self.decisions: list[Decision] = []
        self.history: list[HistoryEntry] = []
        self.changed: set[str] = set()
        self.failure: ActivityError | None = None
        self.moved_on: set[str] = set()
        """Finished activities this transition has already moved on from."""

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
        self.refresh_status()
        self.state.counts = {
            status.value: n for status in ActivityStatus if (n := self.count(status)) > 0
        }
        return Transition(self.state, self.decisions, self.history, frozenset(self.changed))

    def activity(self, step: str) -> ActivityState | None:
        """The activity of `step`, None if never dispatched (may raise NotLoaded)."""
        return self.state.lookup(step)

    def count(self, status: ActivityStatus) -> int:
        """How many activities are in `status` now, held or not: the stored count, corrected
        by what this transition changed in the activities it holds."""
        before = sum(1 for s in self.before.values() if s is status)
        now = sum(1 for a in self.state.activities.values() if a.status is status)
        return self.state.counts.get(status.value, 0) - before + now

    def context(self, references: frozenset[tuple[str, ...]]) -> dict[str, Any]:
        """What an expression with these `references` sees: `inputs`, the output of each
        finished step it names (loaded first: may raise NotLoaded), and `trigger` when the
        instance was started by an event or a schedule (absent, so null, otherwise)."""
        steps: dict[str, Any] = {}
        named = {r[1] for r in references if r[0] == "steps" and len(r) > 1}
        if any(r == ("steps",) for r in references):
            # A step chosen at run time (`steps[x]`): every activity may be read.
            if self.state.is_partial:
                raise NotLoaded(every=True)
            named = set(self.state.activities)
        missing = frozenset(s for s in named if s in self.layout_steps and not self._known(s))
        if missing:
            raise NotLoaded(missing)
        for step in named:
            activity = self.state.activities.get(step)
            if activity is not None and activity.status in DONE:
                steps[step] = {"output": activity.output}
        context: dict[str, Any] = {"inputs": self.state.inputs, "steps": steps}
        if self.trigger is not None:
            context["trigger"] = self.trigger
        return context

    @property
    def layout_steps(self) -> Any:
        return self.definition.step_index()

    def _known(self, step: str) -> bool:
        try:
            self.state.lookup(step)
        except NotLoaded:
            return False
        return True

    @property
    def active(self) -> bool:
        """Started and not final nor cancelling: steps still move on."""
        return self.state.status in ACTIVE

    @property
    def cancelling(self) -> bool:
        return self.state.status is InstanceStatus.CANCELLING

    # --- one activity --------------------------------------------------------------------------

    def current(self, step: str, attempt: int, outcome: str, server: str) -> ActivityState | None:
        """The activity, when a result of `attempt` may still change it."""
        activity = self.activity(step)
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
        """A result of the flagged attempt arrived after all: the flag resolves itself."""
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
        # The flag's text no longer describes the activity; the history keeps it.
        activity.reason = None
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

    def ran(
        self, activity: ActivityState, server: str, started: datetime, finished: datetime
    ) -> None:
        activity.server_id = server
        activity.started_at = started
        activity.finished_at = finished

    def flag(
        self,
        activity: ActivityState,
        step: str,
        kind: FlagKind,
        reason: str,
        server: str | None,
        since: datetime | None,
    ) -> None:
        activity.status = ActivityStatus.INTERRUPTED
        activity.reason = reason
        activity.flag = Flag(
            kind=kind.value,
            reason=reason,
            attempt=activity.attempt,
            server_id=server,
            held_since=since,
            flagged_at=self.now,
        )
        self.changed.add(step)
        self.note(HistoryKind.FLAGGED, reason, step, activity.attempt, flag=kind.value)
        self.refresh_status()

    def record_crash(
        self, activity: ActivityState, server: str | None, since: datetime | None, *, alone: bool
    ) -> None:
        crash = Crash(
            attempt=activity.attempt,
            server_id=server,
            since=since,
            detected_at=self.now,
            alone=alone,
        )
        activity.crashes = [*activity.crashes, crash][-MAX_CRASHES_KEPT:]

    def stop_waiting(self, activity: ActivityState, step: str, reason: str) -> None:
        """A cancel waited for this activity: it has stopped, one way or another."""
        activity.status = ActivityStatus.CANCELLED
        activity.reason = reason
        activity.flag = None
        self.changed.add(step)
        self.note(HistoryKind.CANCELLED, reason, step, activity.attempt)
        self.settle_cancel()

    def dispatch(
        self,
        step: ActivityStep,
        attempt: int,
        not_before: datetime | None,
        reason: str,
        kind: HistoryKind = HistoryKind.DISPATCHED,
        *,
        isolated: bool = False,
    ) -> None:
        previous = self.state.activities.get(step.id)  # a retry's: the event's own step
        try:
            params = step.params.render(self.context(step.params.references()))
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
            crashes=list(previous.crashes) if previous else [],
            isolated=isolated,
        )
        self.changed.add(step.id)
        self.decisions.append(
            Dispatch(
                step.id,
                step.type,
                params,
                attempt,
                restartable,
                step.timeout_s,
                not_before,
                isolated,
            )
        )
        self.note(kind, reason, step.id, attempt, restartable=restartable, isolated=isolated)

    def fail_wait(self, step_id: str, error: ActivityError) -> None:
        """A `wait` step that could not start (its `until` could not be evaluated)."""
        self.state.activities[step_id] = ActivityState(
            type=waits.WAIT_TYPE,
            status=ActivityStatus.FAILED,
            attempt=1,
            restartable=True,
            error=error,
            reason="its time could not be evaluated",
        )
        self.changed.add(step_id)
        self.note(HistoryKind.FAILED, f"{error.kind}: {error.message}", step_id, 1)

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

    # --- the instance --------------------------------------------------------------------------

    def refresh_status(self) -> None:
        """FLAGGED while an activity waits for an operator; WAITING while only `wait` steps
        are in progress; RUNNING otherwise."""
        if self.state.status not in ACTIVE:
            return
        if self.count(ActivityStatus.INTERRUPTED) > 0:
            self.state.status = InstanceStatus.FLAGGED
        elif self.count(ActivityStatus.WAITING) > 0 and not (
            self.count(ActivityStatus.RUNNING) or self.count(ActivityStatus.SCHEDULED)
        ):
            self.state.status = InstanceStatus.WAITING
        else:
            self.state.status = InstanceStatus.RUNNING

    def after_ending(self) -> None:
        """An activity reached a final status: move on, or finish a cancel that waited."""
        if self.cancelling:
            self.settle_cancel()
        else:
            self.advance()

    def start_cancel(self, by: str, reason: str) -> None:
        """Record a cancel: nothing more starts; what runs is told to stop (DESIGN.md, "Cancel
        stops work"). The instance is CANCELLING until every running activity has stopped."""
        open_activities = self.state.open_activities()
        self.state.cancel = CancelRequest(by=by, reason=reason, requested_at=self.now)
        outstanding = False
        running: list[tuple[str, ActivityState]] = []
        for step, activity in open_activities:
            if activity.status is ActivityStatus.RUNNING:
                running.append((step, activity))
            elif activity.status is ActivityStatus.SCHEDULED:
                outstanding = True
                activity.status = ActivityStatus.CANCELLED
                activity.reason = f"cancelled by {by} before it started"
                self.changed.add(step)
            elif activity.status is ActivityStatus.WAITING:
                activity.status = ActivityStatus.CANCELLED
                activity.reason = f"cancelled by {by} while it waited"
                activity.error = ActivityError(kind=ErrorKind.CANCELLED, message=activity.reason)
                activity.finished_at = self.now
                self.changed.add(step)
                self.note(HistoryKind.CANCELLED, activity.reason, step, activity.attempt)
                if activity.approval is not None:
                    approvals.closed(self, step, activity)
            elif activity.status is ActivityStatus.INTERRUPTED:
                activity.status = ActivityStatus.CANCELLED
                activity.reason = f"cancelled by {by} while flagged"
                activity.flag = None
                self.changed.add(step)
        if running or outstanding:
            # Workers may hold its messages (prefetched, or running): tell every one of them.
            self.decisions.append(StopInstance(by))
        if not running:
            self.finish(
                InstanceStatus.CANCELLED,
                None,
                HistoryKind.INSTANCE_CANCELLED,
                f"cancelled by {by}: {reason}",
            )
            return
        self.state.status = InstanceStatus.CANCELLING
        grace = timedelta(seconds=self.policy.cancel_grace_s)
        running.sort(key=lambda item: self.layout.position(item[0]))
        for step, activity in running:
            activity.reason = f"cancel requested by {by}: {activity.claimed_by} is told to stop it"
            self.changed.add(step)
            self.decisions.append(SetDeadline(step, activity.attempt, self.now + grace))
        waits = ", ".join(f"{step} on {a.claimed_by}" for step, a in running)
        self.note(
            HistoryKind.INSTANCE_CANCELLING,
            f"cancel requested by {by} ({reason}): waiting for {len(running)} running "
            f"activit{'y' if len(running) == 1 else 'ies'} to stop: {waits}",
            by=by,
        )

    def settle_cancel(self) -> None:
        if not self.cancelling:
            return
        if self.count(ActivityStatus.RUNNING) > 0:
            return
        by = self.state.cancel.by if self.state.cancel else "operator"
        self.finish(
            InstanceStatus.CANCELLED,
            None,
            HistoryKind.INSTANCE_CANCELLED,
            f"cancelled by {by}: every activity that was running has stopped",
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
        if self.count_open() > 0:
            for step, activity in self.state.open_activities():
                if activity.approval is not None and activity.status is ActivityStatus.WAITING:
                    approvals.closed(self, step, activity)
                # A worker may still be running it; its result will arrive late and be ignored.
                activity.status = ActivityStatus.CANCELLED
                activity.reason = f"instance {status.value.lower()}"
                activity.flag = None
                self.changed.add(step)
        self.state.branches.clear()
        self.state.joins.clear()
        waits.drop_buffered(self, f"the instance ended {status.value}")
        self.decisions.append(Finish(status))
        self.note(kind, reason)

    def count_open(self) -> int:
        return sum(self.count(s) for s in ActivityStatus if not s.is_final)

    # --- moving on (progress.py) --------------------------------------------------------------

    def advance(self) -> None:
        """Move on from every activity this transition finished (progress.py)."""
        progress.advance(self)

    def begin(self) -> None:
        """Enter the first step of the definition (progress.py)."""
        progress.begin(self)

    def fail(self) -> None:
        """The instance fails, with the failure found (or a generic one)."""
        error = self.failure or ActivityError(kind="failed", message="a step failed")
        self.finish(
            InstanceStatus.FAILED,
            error,
            HistoryKind.INSTANCE_FAILED,
            f"{error.kind}: {error.message}",
        )


def describe_crashes(crashes: list[Crash]) -> str:
    """`crashes` for a person: which attempt, on which server, since when, alone or not."""
    parts = []
    for c in crashes:
        how = "alone, in an isolated runner" if c.alone else "among others"
        parts.append(
            f"attempt {c.attempt} on {c.server_id or 'an unknown server'} "
            f"(held since {at(c.since)}, lost at {at(c.detected_at)}, {how})"
        )
    return "; ".join(parts)
