"""What the admin API asks of an instance: start it, cancel it, resolve a flag."""

from __future__ import annotations

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.events import Abandon, Cancel, HistoryKind, Resolve
from paceline_engine.run import Run, at


def start(run: Run) -> None:
    if run.state.status is not InstanceStatus.PENDING:
        run.note(HistoryKind.IGNORED, f"start ignored: instance is {run.state.status}")
        return
    run.state.status = InstanceStatus.RUNNING
    run.state.started_at = run.now
    run.note(HistoryKind.STARTED, "instance started")
    run.begin()


def cancel(run: Run, event: Cancel) -> None:
    if run.state.status.is_final:
        run.note(
            HistoryKind.IGNORED, f"cancel by {event.by} ignored: instance is {run.state.status}"
        )
        return
    if run.state.cancel is not None:
        first = run.state.cancel
        run.note(
            HistoryKind.IGNORED,
            f"cancel by {event.by} ignored: {first.by} asked first, at {at(first.requested_at)}",
        )
        return
    run.start_cancel(event.by, event.reason)


def abandon(run: Run, event: Abandon) -> None:
    if run.state.status.is_final:
        run.note(HistoryKind.IGNORED, f"{event.reason}; the instance had ended already")
        return
    error = ActivityError(kind="internal", message=event.reason)
    run.finish(
        InstanceStatus.FAILED, error, HistoryKind.INSTANCE_FAILED, f"internal: {event.reason}"
    )


def resolve(run: Run, event: Resolve) -> None:
    activity = run.activity(event.step)
    if (
        activity is None
        or activity.status is not ActivityStatus.INTERRUPTED
        or run.state.status.is_final
        or event.attempt not in (None, activity.attempt)
    ):
        why = "is not flagged"
        if activity is not None and activity.status is ActivityStatus.INTERRUPTED:
            why = f"is flagged at attempt {activity.attempt}, not {event.attempt}"
        run.note(
            HistoryKind.IGNORED,
            f"{event.by}'s {event.action} ignored: the activity {why}",
            event.step,
            event.attempt,
        )
        return
    forced = (
        " (forced: the server that held the attempt may still finish it)" if event.forced else ""
    )
    run.note(
        HistoryKind.RESOLVED,
        f"{event.by} chose {event.action}{forced}",
        event.step,
        activity.attempt,
        action=event.action,
    )
    activity.flag = None
    step = run.definition.activity(event.step)
    if event.action == "retry":
        # A restartable activity with crashes on its record runs alone: if it is a poison, it
        # takes down only its own runner.
        isolated = activity.restartable and bool(activity.crashes)
        run.dispatch(step, activity.attempt + 1, None, f"{event.by} chose retry", isolated=isolated)
        # The operator took responsibility for running it again: a fresh crash budget.
        run.state.activities[event.step].interruptions = 0
    elif event.action == "skip":
        activity.status = ActivityStatus.SKIPPED
        activity.output = {} if event.output is None else event.output
        activity.reason = f"skipped by {event.by}"
        run.changed.add(event.step)
    else:
        activity.status = ActivityStatus.FAILED
        activity.error = ActivityError(kind="operator", message=f"failed by {event.by}")
        activity.reason = f"failed by {event.by}"
        run.changed.add(event.step)
    run.refresh_status()
    run.advance()
