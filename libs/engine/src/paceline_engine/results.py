"""What workers report about an attempt, and the scheduler's own deadline for it.

The outcome rule (DESIGN.md, "Outcome unknown"): for a non-restartable activity only an
ending that proves the effect did not happen is a failure the step's `retry` may repeat.
Anything else (`error.outcome_unknown`: a request sent with no complete answer, a program
killed by a signal or a timeout, the step's own timeout, a drain that cut it) flags the
activity for an operator, exactly like a crash. Restartable activities are retried: running
them again is safe by definition.
"""

from __future__ import annotations

from datetime import timedelta

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, ErrorKind
from paceline_engine.definitions import ActivityStep
from paceline_engine.events import (
    ActivityCompleted,
    ActivityFailed,
    ActivityStopped,
    DeadlineExpired,
    HistoryKind,
    StopCause,
)
from paceline_engine.run import Run, describe_crashes
from paceline_engine.state import ActivityState, FlagKind


def completed(run: Run, event: ActivityCompleted) -> None:
    activity = run.current(event.step, event.attempt, "completed", event.server_id)
    if activity is None:
        return
    run.unflag(activity, event.step, event.attempt, event.server_id, "completed")
    activity.status = ActivityStatus.COMPLETED
    activity.output = event.output
    activity.error = None
    run.ran(activity, event.server_id, event.started_at, event.finished_at)
    run.changed.add(event.step)
    while_cancelling = "; the cancel was still waiting for it" if run.cancelling else ""
    if run.cancelling:
        activity.reason = "it completed before its worker could stop it"
    run.note(
        HistoryKind.COMPLETED,
        f"attempt {event.attempt} completed on {event.server_id}{while_cancelling}",
        event.step,
        event.attempt,
    )
    run.after_ending()


def failed(run: Run, event: ActivityFailed) -> None:
    activity = run.current(event.step, event.attempt, "failed", event.server_id)
    if activity is None:
        return
    run.unflag(activity, event.step, event.attempt, event.server_id, "failed")
    run.ran(activity, event.server_id, event.started_at, event.finished_at)
    activity.error = event.error
    run.changed.add(event.step)
    step = run.definition.activity(event.step)
    what = (
        f"attempt {event.attempt} on {event.server_id} "
        f"{'timed out' if event.timed_out else 'failed'}: "
        f"{event.error.kind}: {event.error.message}"
    )
    if run.cancelling:
        # Nothing runs again once a cancel is recorded: this attempt's ending is final.
        activity.status = ActivityStatus.TIMED_OUT if event.timed_out else ActivityStatus.FAILED
        activity.reason = f"it ended while the cancel waited for it: {event.error.kind}"
        run.note(HistoryKind.FAILED, what, event.step, event.attempt)
        run.after_ending()
        return
    if event.timed_out:
        timed_out(run, step, activity, what, event.server_id)
        run.advance()
        return
    if event.error.outcome_unknown and _flag_unless_restartable(
        run, activity, event.step, FlagKind.OUTCOME_UNKNOWN, what, event.server_id
    ):
        return
    run.note(HistoryKind.FAILED, what, event.step, event.attempt)
    # Failures are counted apart from attempts: attempts also end in crashes, time-outs and
    # operator retries, which must not use up the author's retry policy.
    activity.failures += 1
    if activity.failures < step.retry.max_attempts:
        reason = (
            f"failure {activity.failures} of {step.retry.max_attempts} allowed; "
            f"retrying after {step.retry.backoff_s:g}s"
        )
        not_before = run.now + timedelta(seconds=step.retry.backoff_s)
        run.dispatch(step, activity.attempt + 1, not_before, reason, HistoryKind.RETRY)
    else:
        activity.status = ActivityStatus.FAILED
        activity.reason = f"failed {activity.failures} time(s)"
    run.advance()


def stopped(run: Run, event: ActivityStopped) -> None:
    """A worker stopped the attempt: for a cancel, at its drain's deadline, or its isolated
    runner died."""
    existing = run.activity(event.step)
    if (
        event.cause is StopCause.CANCELLED
        and existing is not None
        and existing.attempt == event.attempt
        and existing.status is ActivityStatus.CANCELLED
    ):
        # Cancelled already (before it started, while flagged, or given up on): the worker's
        # stop is noted, and when it says the attempt had started, the activity says so too.
        noted = _stop_noted(existing, event)
        run.note(HistoryKind.CANCELLED, noted, event.step, event.attempt)
        if event.error.outcome_unknown and not (existing.error and existing.error.outcome_unknown):
            existing.error = event.error
            existing.reason = noted
            run.changed.add(event.step)
        return
    outcome = f"was stopped ({event.cause.value})"
    activity = run.current(event.step, event.attempt, outcome, event.server_id)
    if activity is None:
        return
    if event.cause is StopCause.CANCELLED and not run.cancelling:
        # The worker heard of the cancel before the scheduler did (the broadcast goes out with
        # the cancel command, which is durable): record the cancel now.
        run.start_cancel(event.cancelled_by or "operator", "a worker stopped its activity")
        if activity.status.is_final:  # not running (or flagged): start_cancel settled it
            run.note(HistoryKind.CANCELLED, _stop_noted(activity, event), event.step, event.attempt)
            return
    run.unflag(activity, event.step, event.attempt, event.server_id, outcome)
    run.changed.add(event.step)
    if run.cancelling or event.cause is StopCause.CANCELLED:
        reason = _stopped_for_cancel(activity, event)
        if _lost_by_its_holder(activity, event):
            # What the dropping worker says is true of its copy only; the holder may have run it.
            activity.error = ActivityError(
                kind=ErrorKind.CANCELLED, message=reason, outcome_unknown=not activity.restartable
            )
        else:
            run.ran(activity, event.server_id, event.started_at, event.finished_at)
            activity.error = event.error
        run.stop_waiting(activity, event.step, reason)
        return
    run.ran(activity, event.server_id, event.started_at, event.finished_at)
    activity.error = event.error
    if event.cause is StopCause.DRAIN_DEADLINE:
        _cut_by_drain(run, activity, event)
    else:
        _runner_crashed(run, activity, event)


def _stop_noted(activity: ActivityState, event: ActivityStopped) -> str:
    """A stop for a cancel that settled the activity already: whether it had started is the
    worker's word (`error.outcome_unknown`), not what the scheduler last heard of it."""
    stopped = f"attempt {event.attempt} was stopped by {event.server_id}"
    if not event.error.outcome_unknown:
        return f"{stopped} before it started"
    if activity.restartable:
        return f"{stopped} after it had started"
    return f"{stopped} after it had started: outcome unknown (it may have had its effect)"


def _lost_by_its_holder(activity: ActivityState, event: ActivityStopped) -> bool:
    """Another worker than the holder got the message (the holder died or was cut off) and
    stopped it before it started there."""
    return not event.error.outcome_unknown and activity.claimed_by not in (None, event.server_id)


def _stopped_for_cancel(activity: ActivityState, event: ActivityStopped) -> str:
    holder = activity.claimed_by
    if _lost_by_its_holder(activity, event):
        # The broker took the message from its holder (which died) and gave it to this worker,
        # which heard of the cancel and did not start it: the holder may have.
        unknown = "" if activity.restartable else ": outcome unknown"
        return (
            f"its holder {holder} lost attempt {event.attempt} while the cancel waited; "
            f"{event.server_id} got the message and did not start it{unknown}"
        )
    if not event.error.outcome_unknown:
        return f"stopped by {event.server_id} before it started: the instance was cancelled"
    if activity.restartable:
        return f"cancelled while running on {event.server_id}"
    return (
        f"cancelled while running on {event.server_id}: outcome unknown (it may have had its "
        "effect)"
    )


def _cut_by_drain(run: Run, activity: ActivityState, event: ActivityStopped) -> None:
    step = run.definition.activity(event.step)
    what = (
        f"attempt {event.attempt} on {event.server_id} was still running when the drain of "
        f"{event.server_id} reached its grace deadline: the drain cut it"
    )
    run.note(HistoryKind.INTERRUPTED, what, event.step, event.attempt)
    if _flag_unless_restartable(
        run, activity, event.step, FlagKind.DRAIN_DEADLINE, what, event.server_id
    ):
        return
    # A drain is the operator's doing, not the activity's: nothing is charged.
    run.dispatch(
        step,
        activity.attempt + 1,
        None,
        f"restartable: running again as attempt {activity.attempt + 1} after the drain cut it",
        HistoryKind.RETRY,
        isolated=activity.isolated,
    )
    run.advance()


def _runner_crashed(run: Run, activity: ActivityState, event: ActivityStopped) -> None:
    """The activity ran alone and its runner died: the crash is charged to it."""
    step = run.definition.activity(event.step)
    run.record_crash(activity, event.server_id, activity.claimed_at, alone=True)
    activity.interruptions += 1
    what = (
        f"attempt {event.attempt} crashed its isolated runner on {event.server_id} "
        f"({event.error.message})"
    )
    run.note(HistoryKind.INTERRUPTED, what, event.step, event.attempt)
    if _flag_unless_restartable(
        run, activity, event.step, FlagKind.OUTCOME_UNKNOWN, what, event.server_id
    ):
        return
    budget = run.policy.crash_budget
    if activity.interruptions >= budget:
        run.flag(
            activity,
            event.step,
            FlagKind.CRASH_BUDGET,
            # Time-outs are charged too: the count is of both, not of crashes alone.
            f"crash budget exhausted: {activity.interruptions} of {budget} charged (crashes of "
            f"its runner while it ran alone, and time-outs); crashes: "
            f"{describe_crashes(activity.crashes)}",
            event.server_id,
            activity.claimed_at,
        )
        return
    run.dispatch(
        step,
        activity.attempt + 1,
        None,
        f"charged {activity.interruptions} of {budget} crashes; running alone again as "
        f"attempt {activity.attempt + 1}",
        HistoryKind.RETRY,
        isolated=True,
    )
    run.advance()


def deadline(run: Run, event: DeadlineExpired) -> None:
    activity = run.activity(event.step)
    if (
        activity is None
        or activity.attempt != event.attempt
        or run.state.status.is_final
        or activity.status is not ActivityStatus.RUNNING
    ):
        return  # it ended in time, or is already handled: timers leave no trace then
    if run.cancelling:
        unknown = "" if activity.restartable else ": outcome unknown"
        run.stop_waiting(
            activity,
            event.step,
            f"{activity.claimed_by} did not confirm that it stopped attempt {event.attempt} "
            f"in time; recorded as cancelled{unknown}",
        )
        return
    step = run.definition.activity(event.step)
    if step.timeout_s is None:
        return  # no timer of ours: a stray message (e.g. a definition without timeouts)
    timed_out(
        run,
        step,
        activity,
        f"attempt {event.attempt} on {activity.claimed_by} sent "
        f"no result within its timeout of {step.timeout_s:g}s",
        activity.claimed_by,
    )
    run.advance()


def timed_out(
    run: Run, step: ActivityStep, activity: ActivityState, what: str, server: str | None
) -> None:
    run.changed.add(step.id)
    if _flag_unless_restartable(run, activity, step.id, FlagKind.TIMEOUT, what, server):
        return
    activity.interruptions += 1
    run.note(HistoryKind.TIMED_OUT, what, step.id, activity.attempt)
    if activity.interruptions < run.policy.crash_budget:
        run.dispatch(
            step,
            activity.attempt + 1,
            None,
            f"restartable: a new attempt after a time-out "
            f"({activity.interruptions} of {run.policy.crash_budget})",
            HistoryKind.RETRY,
            isolated=activity.isolated,
        )
        return
    activity.status = ActivityStatus.TIMED_OUT
    activity.error = activity.error or ActivityError(kind="timeout", message=what)
    activity.reason = f"timed out {activity.interruptions} times"


def _flag_unless_restartable(
    run: Run,
    activity: ActivityState,
    step: str,
    kind: FlagKind,
    what: str,
    server: str | None,
) -> bool:
    """Flag an attempt that may have had its effect, unless running it again is safe; returns
    whether it was flagged."""
    if activity.restartable:
        return False
    run.flag(
        activity,
        step,
        kind,
        f"{what}; it may have had its effect, and it is not restartable",
        server,
        activity.claimed_at,
    )
    return True
