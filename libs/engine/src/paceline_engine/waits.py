"""`wait` steps: durable timers and signals, handled by the scheduler alone (no worker).

A wait's due time is fixed when it starts, on the database's clock (the scheduler applies every
event at the database's `clock_timestamp()`), and stored with its activity; the timer is a
held-back outbox message (`SetTimer`), so a failover never restarts a wait and exactly one
scheduler fires it. A signal and a timer (or a timeout) that race are applied one after the
other to the same instance, in one transaction each: the first ends the wait, the second finds
it ended and is recorded as such.

A signal goes to the first wait step for its name (in definition order) that is WAITING and
whose `when` accepts it. One that no wait takes yet is buffered while a wait for its name may
still come (one not yet started), and taken by the first such wait when it starts; otherwise it
is kept as late. Every fate is recorded on the signal (`RecordSignal`) and in the history.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus
from paceline_engine import approvals
from paceline_engine.definitions import until_problem
from paceline_engine.events import (
    HistoryKind,
    RecordSignal,
    SetTimer,
    SignalArrived,
    SignalFate,
    WaitDue,
)
from paceline_engine.expressions import EvaluationError
from paceline_engine.state import (
    MAX_BUFFERED_SIGNALS,
    ActivityState,
    BufferedSignal,
    Waiting,
)

if TYPE_CHECKING:
    from paceline_engine.definitions import WaitStep
    from paceline_engine.run import Run

WAIT_TYPE = "wait"
"""The activity type of a wait step's activity."""


def enter(run: Run, step: WaitStep) -> None:
    """Start the wait: WAITING, with its due time. It may end at once: a buffered signal
    takes it, or its `until` cannot be evaluated (failed)."""
    due_at: datetime | None
    if step.signal is not None:
        kind = "signal"
        due_at = None if step.timeout_s is None else run.now + timedelta(seconds=step.timeout_s)
    elif step.for_s is not None:
        kind, due_at = "timer", run.now + timedelta(seconds=step.for_s)
    else:
        kind = "timer"
        try:
            due_at = _until(run, step)
        except (EvaluationError, ValueError) as exc:
            run.fail_wait(step.id, ActivityError(kind="expression", message=f"until: {exc}"))
            return
    activity = ActivityState(
        type=WAIT_TYPE,
        status=ActivityStatus.WAITING,
        attempt=1,
        restartable=True,
        started_at=run.now,
        waiting=Waiting(kind=kind, due_at=due_at, signal=step.signal),
    )
    run.state.activities[step.id] = activity
    run.changed.add(step.id)
    what = f"signal {step.signal!r}" if step.signal is not None else "a timer"
    until = f", due at {due_at.isoformat(timespec='milliseconds')}" if due_at else ""
    run.note(HistoryKind.WAITING, f"waiting for {what}{until}", step.id, 1)
    if step.signal is not None and _take_buffered(run, step, activity):
        return
    if due_at is not None:
        run.decisions.append(SetTimer(step.id, 1, due_at))


def _until(run: Run, step: WaitStep) -> datetime:
    assert step.until is not None
    value = step.until.render(run.context(step.until.references()))["until"]
    if not isinstance(value, str):
        raise ValueError(f"an ISO-8601 time with an offset is needed, not {value!r}")
    if problem := until_problem(value):
        raise ValueError(problem)
    return datetime.fromisoformat(value).astimezone(UTC)


def due(run: Run, event: WaitDue) -> None:
    """The timer came due: a timer wait ends; a signal wait times out."""
    activity = run.activity(event.step)
    if activity is None or activity.status is not ActivityStatus.WAITING:
        run.note(
            HistoryKind.IGNORED,
            "timer fired after the wait had ended"
            + (f" ({activity.status})" if activity is not None else ""),
            event.step,
            event.attempt,
            due_at=event.due_at.isoformat(),
        )
        return
    if activity.waiting is not None and activity.waiting.kind == "approval":
        approvals.due(run, event)
        return
    # Late by how long after it was due (or after it started, for an `until` in the past).
    due_at = max(event.due_at, activity.started_at or event.due_at)
    lateness_s = max(0.0, (run.now - due_at).total_seconds())
    step = run.layout.wait(event.step)
    if step.signal is None:
        reason = f"the timer fired ({lateness_s:.3f}s late)"
        _end(run, event.step, activity, "timer", reason, lateness_s=lateness_s)
        run.advance()
        return
    if step.on_timeout == "continue":
        reason = f"no signal {step.signal!r} in time: continued"
        _end(run, event.step, activity, "timeout", reason, lateness_s=lateness_s)
        run.advance()
        return
    activity.status = ActivityStatus.FAILED
    activity.finished_at = run.now
    activity.error = ActivityError(
        kind="timeout", message=f"no signal {step.signal!r} within the wait's timeout"
    )
    activity.reason = "the wait timed out"
    run.changed.add(event.step)
    run.note(
        HistoryKind.WAIT_ENDED,
        f"no signal {step.signal!r} in time: the wait failed",
        event.step,
        1,
        lateness_s=lateness_s,
    )
    run.advance()


def signal(run: Run, event: SignalArrived) -> None:
    """Deliver the signal to a wait, buffer it, or keep it as late."""
    buffered = BufferedSignal(
        signal_id=event.signal_id,
        name=event.name,
        payload=event.payload,
        by=event.by,
        received_at=event.received_at,
    )
    if run.state.status.is_final or run.cancelling:
        _record(run, buffered, SignalFate.LATE, None, f"the instance is {run.state.status}")
        return
    steps = run.layout.waits_for(event.name)
    not_started = False
    refused: list[str] = []
    for step in steps:
        activity = run.activity(step.id)
        if activity is None:
            not_started = True
            continue
        if activity.status is not ActivityStatus.WAITING:
            continue
        try:
            accepted = _accepts(run, step, buffered)
        except EvaluationError as exc:
            refused.append(f"{step.id}: when: {exc}")
            continue
        if accepted:
            _deliver(run, step, activity, buffered)
            run.advance()
            return
        refused.append(f"{step.id}: its `when` did not accept it")
    if not_started and len(run.state.signals) < MAX_BUFFERED_SIGNALS:
        run.state.signals.append(buffered)
        _record(run, buffered, SignalFate.BUFFERED, None, "no wait takes it yet")
        return
    if not steps:
        why = f"no wait step of the definition waits for {event.name!r}"
    elif not_started:
        why = f"{MAX_BUFFERED_SIGNALS} signals are buffered already"
    elif refused:
        why = "; ".join(refused)
    else:
        why = f"every wait for {event.name!r} has ended"
    _record(run, buffered, SignalFate.LATE, None, why)


def drop_buffered(run: Run, why: str) -> None:
    """The instance ended: no wait will take the signals it buffered; they are late."""
    for buffered in run.state.signals:
        _record(run, buffered, SignalFate.LATE, None, why)
    run.state.signals = []


def _take_buffered(run: Run, step: WaitStep, activity: ActivityState) -> bool:
    for buffered in run.state.signals:
        if buffered.name != step.signal:
            continue
        try:
            accepted = _accepts(run, step, buffered)
        except EvaluationError:
            accepted = False
        if accepted:
            run.state.signals.remove(buffered)
            _deliver(run, step, activity, buffered)
            return True
    return False


def _accepts(run: Run, step: WaitStep, buffered: BufferedSignal) -> bool:
    if step.when is None:
        return True
    context = run.context(step.when.references())
    context["signal"] = _signal_view(buffered)
    return bool(step.when.evaluate(context))


def _signal_view(buffered: BufferedSignal) -> dict[str, Any]:
    return {
        "id": buffered.signal_id,
        "name": buffered.name,
        "payload": buffered.payload,
        "by": buffered.by,
        "received_at": buffered.received_at.isoformat(),
    }


def _deliver(run: Run, step: WaitStep, activity: ActivityState, buffered: BufferedSignal) -> None:
    _end(
        run,
        step.id,
        activity,
        "signal",
        f"signal {buffered.name!r} from {buffered.by} ended the wait",
        _signal_view(buffered),
    )
    _record(run, buffered, SignalFate.DELIVERED, step.id, f"ended the wait {step.id!r}")


def _end(
    run: Run,
    step_id: str,
    activity: ActivityState,
    resolved_by: str,
    reason: str,
    signal_view: dict[str, Any] | None = None,
    **data: Any,
) -> None:
    started = activity.started_at or run.now
    output: dict[str, Any] = {
        "resolved_by": resolved_by,
        "waited_s": round((run.now - started).total_seconds(), 3),
    }
    if signal_view is not None:
        output["signal"] = signal_view
    activity.status = ActivityStatus.COMPLETED
    activity.output = output
    activity.finished_at = run.now
    activity.reason = reason
    run.changed.add(step_id)
    run.note(
        HistoryKind.WAIT_ENDED, reason, step_id, activity.attempt, resolved_by=resolved_by, **data
    )


def _record(
    run: Run, buffered: BufferedSignal, fate: SignalFate, step: str | None, reason: str
) -> None:
    run.decisions.append(RecordSignal(buffered.signal_id, fate, step, reason))
    run.note(
        HistoryKind.SIGNAL,
        f"signal {buffered.name!r} from {buffered.by}: {fate.value.lower()}: {reason}",
        step,
        signal_id=buffered.signal_id,
        fate=fate.value,
    )
