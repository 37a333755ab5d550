"""Who holds an attempt: the failover rule (DESIGN.md, "The rule, precisely").

A worker claims an attempt before running it (a non-restartable one waits for the answer; a
restartable first delivery only sends a notice). An attempt another server claimed and the
broker then redelivered was lost with that server: restartable work runs again, work that is
not restartable is flagged for an operator.

Crashes are charged to their cause (DESIGN.md): when a worker dies, what it ran become
suspects and nothing is charged. A suspect with an earlier crash on its record runs next alone,
in an isolated runner (`Dispatch.isolated`); only a crash of that runner is charged
(results.py), so a poison activity is quarantined and its healthy neighbours complete.
"""

from __future__ import annotations

from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.events import Claim, HistoryKind, Quarantined
from paceline_engine.run import Run, at
from paceline_engine.state import ActivityState, FlagKind


def claim(run: Run, event: Claim) -> None:
    activity = run.activity(event.step)
    if run.cancelling and activity is not None and _lost_by_holder(event, activity):
        _lost_while_cancelling(run, event, activity)
        return
    refusal = _refusal(run, event, activity)
    if refusal is not None:
        if not event.wants_reply:
            return  # a start notice that arrived after the result: nothing to say
        run.answer(event, False, event.attempt, refusal)
        run.note(
            HistoryKind.CLAIM_REFUSED, f"{event.server_id}: {refusal}", event.step, event.attempt
        )
        return
    assert activity is not None
    holder, since = activity.claimed_by, activity.claimed_at
    if holder is None or holder == event.server_id:
        if holder is None:
            if _delivered_too_often(run, event):
                _refresh(run, event, activity)
                return
            run.hold(activity, event.step, event.server_id, event.at, event.delivery_count)
            how = " (redelivered, but never started before)" if event.redelivered else ""
            alone = " alone, in an isolated runner" if activity.isolated else ""
            run.note(
                HistoryKind.CLAIMED,
                f"attempt {event.attempt} claimed by {event.server_id}{alone}{how}",
                event.step,
                event.attempt,
                server=event.server_id,
            )
        run.answer(event, True, activity.attempt, "granted")
        return
    if not _lost_by_holder(event, activity):
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
        run.answer(event, False, event.attempt, reason)
        run.note(
            HistoryKind.CLAIM_REFUSED,
            f"{event.server_id}: {reason} ({what})",
            event.step,
            event.attempt,
        )
        return
    lost = _note_lost(run, event, activity)
    run.record_crash(activity, holder, since, alone=False)
    if not activity.restartable:
        run.flag(
            activity,
            event.step,
            FlagKind.REDELIVERED,
            f"{lost}: it may have started, and it is not restartable",
            holder,
            since,
        )
        run.answer(event, False, activity.attempt, "flagged: it may have started elsewhere")
        return
    if activity.isolated or len(activity.crashes) > 1:
        _isolate(run, event, activity)
        return
    if _delivered_too_often(run, event):
        _refresh(run, event, activity)
        return
    activity.attempt += 1
    run.hold(activity, event.step, event.server_id, event.at, event.delivery_count)
    run.note(
        HistoryKind.RESTARTED,
        f"restartable: running again as attempt {activity.attempt} on {event.server_id} "
        "(a suspect of its worker's death: nothing charged)",
        event.step,
        activity.attempt,
    )
    run.answer(event, True, activity.attempt, f"restarted as attempt {activity.attempt}")


def _lost_by_holder(event: Claim, activity: ActivityState) -> bool:
    """The claimer got a newer delivery of the message the holder had: the broker took it
    back from the holder (its connection died)."""
    return (
        activity.status is ActivityStatus.RUNNING
        and activity.claimed_by is not None
        and activity.claimed_by != event.server_id
        and event.redelivered
        and event.delivery_count > activity.claim_delivery
        and event.attempt in (activity.attempt, activity.message_attempt)
    )


def _note_lost(run: Run, event: Claim, activity: ActivityState) -> str:
    holder, since = activity.claimed_by, activity.claimed_at
    lost = (
        f"attempt {activity.attempt} held by {holder} since {at(since)} was redelivered "
        f"to {event.server_id} (delivery {event.delivery_count + 1})"
    )
    run.note(
        HistoryKind.REDELIVERED,
        lost,
        event.step,
        activity.attempt,
        server=holder,
        since=at(since),
        to=event.server_id,
        delivery=event.delivery_count + 1,
    )
    return lost


def _lost_while_cancelling(run: Run, event: Claim, activity: ActivityState) -> None:
    lost = _note_lost(run, event, activity)
    unknown = "" if activity.restartable else ": outcome unknown"
    run.answer(event, False, event.attempt, "the instance is being cancelled")
    run.stop_waiting(
        activity, event.step, f"{lost} while the cancel waited for it; it stopped{unknown}"
    )


def _refusal(run: Run, event: Claim, activity: ActivityState | None) -> str | None:
    if activity is None:
        return "no such activity was dispatched"
    if run.state.status.is_final:
        return f"the instance is {run.state.status}"
    if run.state.status is InstanceStatus.CANCELLING:
        return "the instance is being cancelled"
    if activity.status.is_final:
        return f"the activity is {activity.status}"
    if event.attempt not in (activity.attempt, activity.message_attempt):
        return f"attempt {event.attempt} is stale: the activity is at attempt {activity.attempt}"
    if activity.status is ActivityStatus.INTERRUPTED:
        return "the activity is flagged, waiting for an operator"
    return None


def _delivered_too_often(run: Run, event: Claim) -> bool:
    return event.delivery_count + 1 >= run.policy.refresh_after_deliveries


def _refresh(run: Run, event: Claim, activity: ActivityState) -> None:
    """The broker returned this message again and again while it only sat prefetched (each
    crash or drain of a worker requeues what it held): send a fresh message, so the broker's
    delivery limit never dead-letters an activity behind the engine's back."""
    reason = (
        f"delivered {event.delivery_count + 1} times without running to completion: "
        f"re-sent as a fresh message, attempt {activity.attempt + 1}"
    )
    run.answer(event, False, event.attempt, reason)
    run.dispatch(
        run.definition.activity(event.step),
        activity.attempt + 1,
        None,
        reason,
        HistoryKind.RETRY,
        isolated=activity.isolated,
    )


def _isolate(run: Run, event: Claim, activity: ActivityState) -> None:
    """A suspect with an earlier crash on its record: run it alone before charging anything."""
    reason = (
        f"a suspect: {len(activity.crashes)} workers died while it ran; running alone, in an "
        f"isolated runner, as attempt {activity.attempt + 1}"
    )
    run.answer(event, False, event.attempt, f"moved to isolation: {reason}")
    run.dispatch(
        run.definition.activity(event.step),
        activity.attempt + 1,
        None,
        reason,
        HistoryKind.ISOLATED,
        isolated=True,
    )


def quarantined(run: Run, event: Quarantined) -> None:
    """A worker's backstop refused a message delivered too often (normally the engine has
    re-sent it long before: `Policy.refresh_after_deliveries`)."""
    activity = run.activity(event.step)
    if activity is None or activity.status.is_final or run.state.status.is_final:
        run.note(
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
        run.note(
            HistoryKind.IGNORED,
            f"quarantine of attempt {event.attempt} ignored: the activity is at attempt "
            f"{activity.attempt}",
            event.step,
            event.attempt,
        )
        return
    if run.cancelling:
        run.stop_waiting(
            activity, event.step, f"quarantined by {event.server_id} while the cancel waited"
        )
        return
    run.flag(
        activity,
        event.step,
        FlagKind.CRASH_BUDGET,
        f"crash budget exhausted: attempt {activity.attempt} (last held by "
        f"{activity.claimed_by or 'no server'} since {at(activity.claimed_at)}) was "
        f"delivered {event.deliveries} times and a worker went down each time; quarantined "
        f"by {event.server_id}",
        activity.claimed_by,
        activity.claimed_at,
    )
