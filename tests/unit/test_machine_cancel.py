"""Cancel stops work (DESIGN.md, "Cancel stops work"), example by example.

A cancel of a final instance, or a second cancel, is only recorded. Otherwise what was
dispatched but not started is cancelled, what is flagged is cancelled with its flag cleared,
workers are told to stop (`StopInstance`) when anything of the instance may sit with them, and:
with nothing running the instance is CANCELLED at once; with something running it is
CANCELLING until every running activity has stopped (its worker confirms, its result arrives,
its holder is lost, or the cancel's grace runs out). Nothing is claimed, dispatched or retried
once a cancel is recorded. A worker may hear the cancel before the scheduler does: its stop
records the cancel.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from unit.test_machine_failover import (
    Run,
    Spec,
    assert_only_recorded,
    dump,
    entry,
    failover_definitions,
    flagged_shell,
    interleave,
    kinds,
    noop,
    parse,
    property_settings,
    running,
    shell,
)

from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.definitions import Definition
from paceline_engine.events import (
    AnswerClaim,
    Cancel,
    Dispatch,
    Finish,
    HistoryKind,
    Policy,
    SetDeadline,
    StopCause,
    StopInstance,
)
from paceline_engine.state import CancelRequest

GRACE = timedelta(seconds=Policy().cancel_grace_s)


def statuses(run: Run) -> dict[str, ActivityStatus]:
    return {step: a.status for step, a in run.state.activities.items()}


def cancelling(*steps: dict[str, Any]) -> Run:
    run = running(*steps)
    run.cancel()
    assert run.instance() is InstanceStatus.CANCELLING
    return run


# --- what a cancel meets ------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["complete", "fail", "cancel"])
def test_a_cancel_of_a_final_instance_is_only_recorded(end: str) -> None:
    run = running(shell("x"))
    if end == "complete":
        run.complete("x")
    elif end == "fail":
        run.fail("x")
    else:
        run.cancel(by="carol")
        run.stop("x", StopCause.CANCELLED)
    assert run.instance().is_final
    before = run.state
    t = run.cancel(by="dave")
    assert_only_recorded(before, t, HistoryKind.IGNORED)
    assert t.decisions == []
    assert t.history[0].reason == f"cancel by dave ignored: instance is {run.instance()}"


def test_a_second_cancel_is_ignored_naming_who_asked_first() -> None:
    run = running(shell("x"))
    run.cancel(by="carol")
    asked = run.now
    before = run.state
    t = run.cancel("me too", by="dave")
    assert_only_recorded(before, t, HistoryKind.IGNORED)
    assert t.decisions == []
    assert t.history[0].reason == (
        f"cancel by dave ignored: carol asked first, at {asked.isoformat(timespec='milliseconds')}"
    )
    assert run.state.cancel == CancelRequest(by="carol", reason="not today", requested_at=asked)


def test_a_cancel_with_nothing_running_cancels_the_instance_at_once() -> None:
    run = Run(parse({"id": "p", "parallel": [[noop("a")], [noop("b"), noop("c")]]}))
    run.start()
    run.complete("b")  # c is dispatched; a's message is still waiting for a worker
    t = run.cancel("wrong inputs", by="carol")
    assert t.decisions == [StopInstance("carol"), Finish(InstanceStatus.CANCELLED)]
    assert kinds(t) == [HistoryKind.INSTANCE_CANCELLED]
    assert t.history[0].reason == "cancelled by carol: wrong inputs"
    assert statuses(run) == {
        "a": ActivityStatus.CANCELLED,
        "b": ActivityStatus.COMPLETED,
        "c": ActivityStatus.CANCELLED,
    }
    assert run.state.activities["a"].reason == "cancelled by carol before it started"
    assert t.changed_steps == {"a", "c"}
    assert run.instance() is InstanceStatus.CANCELLED
    assert run.state.finished_at == run.now
    assert run.state.cancel == CancelRequest(
        by="carol", reason="wrong inputs", requested_at=run.now
    )


def test_a_cancel_of_a_flagged_instance_clears_the_flag_and_tells_no_worker() -> None:
    """Nothing was dispatched or running: no worker holds anything to stop."""
    run = flagged_shell(noop("after"))
    t = run.cancel(by="carol")
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    x = run.state.activities["x"]
    assert (x.status, x.flag, x.reason) == (
        ActivityStatus.CANCELLED,
        None,
        "cancelled by carol while flagged",
    )
    assert run.instance() is InstanceStatus.CANCELLED


def test_a_cancel_waits_for_what_runs_to_stop() -> None:
    run = Run(parse({"id": "p", "parallel": [[shell("x")], [noop("y")], [noop("z")]]}))
    run.start()
    run.claim("x", "w1")
    run.claim("y", "w2", wants_reply=False)
    t = run.cancel("wrong inputs", by="carol")
    at = run.now
    assert t.decisions == [
        StopInstance("carol"),
        SetDeadline("x", 1, at + GRACE),
        SetDeadline("y", 1, at + GRACE),
    ]
    assert kinds(t) == [HistoryKind.INSTANCE_CANCELLING]
    cancelling_entry = t.history[0]
    assert cancelling_entry.reason == (
        "cancel requested by carol (wrong inputs): waiting for 2 running activities to stop: "
        "x on w1, y on w2"
    )
    assert cancelling_entry.data == {"by": "carol"}
    assert run.instance() is InstanceStatus.CANCELLING
    assert statuses(run) == {
        "x": ActivityStatus.RUNNING,
        "y": ActivityStatus.RUNNING,
        "z": ActivityStatus.CANCELLED,
    }
    assert run.state.activities["x"].reason == "cancel requested by carol: w1 is told to stop it"
    assert run.state.finished_at is None
    assert run.state.cancel == CancelRequest(by="carol", reason="wrong inputs", requested_at=at)


def test_the_cancels_grace_comes_from_the_policy() -> None:
    run = running(shell("x"), policy=Policy(cancel_grace_s=2.5))
    t = run.cancel()
    assert SetDeadline("x", 1, run.now + timedelta(seconds=2.5)) in t.decisions


# --- while cancelling ---------------------------------------------------------------------------


@pytest.mark.parametrize("redelivered", [False, True])
def test_claims_are_refused_while_cancelling(redelivered: bool) -> None:
    run = cancelling({"id": "p", "parallel": [[shell("x")], [shell("y")]]})
    before = run.state
    # y's message was prefetched before the cancel; the holder of x asks again too.
    for step, server in (("y", "w2"), ("x", "w1")):
        t = run.claim(step, server, redelivered=redelivered, delivery_count=int(redelivered))
        assert_only_recorded(before, t, HistoryKind.CLAIM_REFUSED)
        assert t.decisions == [AnswerClaim(False, 1, "the instance is being cancelled")]
        assert t.history[0].reason == f"{server}: the instance is being cancelled"


def test_a_completion_while_cancelling_is_recorded_and_dispatches_nothing() -> None:
    run = cancelling(shell("x"), noop("after"))
    t = run.complete("x", {"ok": True}, server="w1")
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    assert kinds(t) == [HistoryKind.COMPLETED, HistoryKind.INSTANCE_CANCELLED]
    assert entry(t, HistoryKind.COMPLETED).reason == (
        "attempt 1 completed on w1; the cancel was still waiting for it"
    )
    assert entry(t, HistoryKind.INSTANCE_CANCELLED).reason == (
        "cancelled by bob: every activity that was running has stopped"
    )
    x = run.state.activities["x"]
    assert (x.status, x.output, x.reason) == (
        ActivityStatus.COMPLETED,
        {"ok": True},
        "it completed before its worker could stop it",
    )
    assert "after" not in run.state.activities
    assert run.instance() is InstanceStatus.CANCELLED


def test_a_failure_while_cancelling_is_final_whatever_the_retry_policy() -> None:
    run = cancelling(noop("x", retry={"max_attempts": 3}))
    t = run.fail("x", "exit 1")
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.failures) == (ActivityStatus.FAILED, 1, 0)
    assert x.reason == "it ended while the cancel waited for it: adapter"
    assert run.instance() is InstanceStatus.CANCELLED
    assert run.state.error is None


def test_an_outcome_unknown_failure_while_cancelling_ends_the_activity_unflagged() -> None:
    run = cancelling(shell("x"))
    t = run.fail("x", "no answer", outcome_unknown=True)
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    x = run.state.activities["x"]
    assert (x.status, x.flag) == (ActivityStatus.FAILED, None)
    assert run.instance() is InstanceStatus.CANCELLED


def test_a_time_out_while_cancelling_is_recorded_as_timed_out_and_not_retried() -> None:
    run = cancelling(noop("x", timeout="30s"))
    t = run.fail("x", "too slow", timed_out=True)
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.interruptions) == (ActivityStatus.TIMED_OUT, 1, 0)
    assert run.instance() is InstanceStatus.CANCELLED


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (noop, "cancelled while running on w1"),
        (
            shell,
            "cancelled while running on w1: outcome unknown (it may have had its effect)",
        ),
    ],
)
def test_a_stop_while_cancelling_cancels_the_activity(make: Any, reason: str) -> None:
    run = cancelling(make("x"), noop("after"))
    t = run.stop("x", StopCause.CANCELLED, started=True, server="w1")
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    assert kinds(t) == [HistoryKind.CANCELLED, HistoryKind.INSTANCE_CANCELLED]
    assert entry(t, HistoryKind.CANCELLED).reason == reason
    x = run.state.activities["x"]
    assert (x.status, x.reason, x.flag) == (ActivityStatus.CANCELLED, reason, None)
    assert x.error is not None
    assert x.error.outcome_unknown
    assert run.instance() is InstanceStatus.CANCELLED


def test_a_stop_before_the_adapter_started_says_so() -> None:
    run = cancelling(shell("x"))
    run.stop("x", StopCause.CANCELLED, started=False, server="w1")
    assert run.state.activities["x"].reason == (
        "stopped by w1 before it started: the instance was cancelled"
    )


@pytest.mark.parametrize("cause", [StopCause.DRAIN_DEADLINE, StopCause.RUNNER_CRASHED])
def test_any_stop_while_cancelling_cancels_the_activity_and_charges_nothing(
    cause: StopCause,
) -> None:
    run = cancelling(noop("x"))
    t = run.stop("x", cause)
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    x = run.state.activities["x"]
    assert (x.status, x.interruptions, x.flag) == (ActivityStatus.CANCELLED, 0, None)


@pytest.mark.parametrize(("make", "unknown"), [(noop, ""), (shell, ": outcome unknown")])
def test_a_deadline_while_cancelling_records_the_activity_as_cancelled(
    make: Any, unknown: str
) -> None:
    run = cancelling(make("x"))
    t = run.deadline("x")
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    reason = f"w1 did not confirm that it stopped attempt 1 in time; recorded as cancelled{unknown}"
    assert entry(t, HistoryKind.CANCELLED).reason == reason
    assert run.state.activities["x"].status is ActivityStatus.CANCELLED
    assert run.instance() is InstanceStatus.CANCELLED


def test_a_deadline_of_another_attempt_while_cancelling_changes_nothing() -> None:
    run = cancelling(noop("x"))
    before = run.state
    t = run.deadline("x", attempt=2)
    assert_only_recorded(before, t)


def test_a_lost_holder_while_cancelling_cancels_the_activity() -> None:
    run = cancelling(shell("x"))
    t = run.crash("x", "w2")
    assert t.decisions == [
        AnswerClaim(False, 1, "the instance is being cancelled"),
        Finish(InstanceStatus.CANCELLED),
    ]
    assert kinds(t) == [
        HistoryKind.REDELIVERED,
        HistoryKind.CANCELLED,
        HistoryKind.INSTANCE_CANCELLED,
    ]
    x = run.state.activities["x"]
    assert x.status is ActivityStatus.CANCELLED
    assert x.reason is not None
    assert x.reason.endswith("while the cancel waited for it; it stopped: outcome unknown")
    assert "held by w1" in x.reason
    assert (x.flag, x.interruptions) == (None, 0)
    assert run.instance() is InstanceStatus.CANCELLED


def test_a_quarantine_while_cancelling_cancels_the_activity() -> None:
    run = cancelling(noop("x"))
    t = run.quarantine("x")
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    x = run.state.activities["x"]
    assert (x.status, x.flag) == (ActivityStatus.CANCELLED, None)


def test_the_instance_is_cancelled_only_once_the_last_running_activity_stopped() -> None:
    run = Run(parse({"id": "p", "parallel": [[shell("x")], [noop("y")]]}))
    run.start()
    run.claim("x", "w1")
    run.claim("y", "w2", wants_reply=False)
    run.cancel()
    t = run.stop("x", StopCause.CANCELLED)
    assert t.decisions == []
    assert run.instance() is InstanceStatus.CANCELLING
    t = run.complete("y", server="w2")
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    assert run.instance() is InstanceStatus.CANCELLED


def test_nothing_is_resolved_while_cancelling() -> None:
    run = cancelling(shell("x"))
    before = run.state
    t = run.resolve("x", "retry")
    assert_only_recorded(before, t, HistoryKind.IGNORED)


def test_a_late_result_after_the_cancel_ended_is_only_recorded() -> None:
    run = cancelling(shell("x"))
    run.deadline("x")
    before = run.state
    assert_only_recorded(before, run.complete("x", attempt=1), HistoryKind.LATE_RESULT)
    assert_only_recorded(
        before, run.stop("x", StopCause.DRAIN_DEADLINE, attempt=1), HistoryKind.LATE_RESULT
    )


# --- a worker heard the cancel first ------------------------------------------------------------


def test_a_stop_heard_before_the_cancel_command_records_the_cancel() -> None:
    run = Run(parse({"id": "p", "parallel": [[shell("x")], [noop("y")]]}, noop("after")))
    run.start()
    run.claim("x", "w1")
    run.claim("y", "w2", wants_reply=False)
    t = run.stop("x", StopCause.CANCELLED, by="carol", server="w1")
    at = run.now
    assert t.decisions == [
        StopInstance("carol"),
        SetDeadline("x", 1, at + GRACE),
        SetDeadline("y", 1, at + GRACE),
    ]
    assert kinds(t) == [HistoryKind.INSTANCE_CANCELLING, HistoryKind.CANCELLED]
    assert run.state.cancel == CancelRequest(
        by="carol", reason="a worker stopped its activity", requested_at=at
    )
    assert run.status("x") is ActivityStatus.CANCELLED
    assert run.status("y") is ActivityStatus.RUNNING
    assert run.instance() is InstanceStatus.CANCELLING
    # The cancel command arrives after all: carol asked first, through her worker's stop.
    before = run.state
    t = run.send(Cancel("wrong inputs", by="carol"))
    assert_only_recorded(before, t, HistoryKind.IGNORED)
    assert "carol asked first" in t.history[0].reason
    run.stop("y", StopCause.CANCELLED, by="carol", server="w2")
    assert run.instance() is InstanceStatus.CANCELLED
    assert "after" not in run.state.activities


def test_a_stop_heard_before_the_cancel_ends_an_instance_with_nothing_else_running() -> None:
    run = running(shell("x"), noop("after"))
    t = run.stop("x", StopCause.CANCELLED, by="carol")
    assert t.decisions == [StopInstance("carol"), Finish(InstanceStatus.CANCELLED)]
    assert kinds(t) == [
        HistoryKind.INSTANCE_CANCELLING,
        HistoryKind.CANCELLED,
        HistoryKind.INSTANCE_CANCELLED,
    ]
    assert entry(t, HistoryKind.INSTANCE_CANCELLED).reason.startswith("cancelled by carol")
    assert run.instance() is InstanceStatus.CANCELLED


def test_a_stop_of_a_message_not_yet_claimed_records_the_cancel() -> None:
    """A worker dropped a prefetched message when it heard of the cancel."""
    run = Run(parse(noop("x"), noop("after")))
    run.start()
    t = run.stop("x", StopCause.CANCELLED, started=False, by="carol", server="w2")
    assert t.decisions == [StopInstance("carol"), Finish(InstanceStatus.CANCELLED)]
    assert kinds(t) == [HistoryKind.INSTANCE_CANCELLED, HistoryKind.CANCELLED]
    assert entry(t, HistoryKind.CANCELLED).reason == "attempt 1 was stopped by w2 before it started"
    assert run.state.cancel is not None
    assert run.state.cancel.by == "carol"


def test_a_stop_of_a_flagged_attempt_heard_before_the_cancel_says_it_may_have_had_its_effect() -> (
    None
):
    """w1 was cut off (its message went to w2: flagged), hears the cancel, and stops the
    attempt it was running after all. Found by review: the history said "before it started"."""
    run = flagged_shell(noop("after"))
    t = run.stop("x", StopCause.CANCELLED, started=True, by="carol", server="w1")
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    assert entry(t, HistoryKind.CANCELLED).reason == (
        "attempt 1 was stopped by w1 after it had started: outcome unknown (it may have had "
        "its effect)"
    )
    x = run.state.activities["x"]
    assert (x.status, x.flag) == (ActivityStatus.CANCELLED, None)
    assert run.instance() is InstanceStatus.CANCELLED


def test_a_stop_of_a_message_whose_start_notice_was_lost_says_it_had_started() -> None:
    run = Run(parse(noop("x")))
    run.start()
    t = run.stop("x", StopCause.CANCELLED, started=True, by="carol")
    assert (
        entry(t, HistoryKind.CANCELLED).reason == "attempt 1 was stopped by w1 after it had started"
    )


@pytest.mark.parametrize(
    ("started", "said"),
    [
        (False, "before it started"),
        (True, "after it had started: outcome unknown (it may have had its effect)"),
    ],
)
def test_a_stop_of_an_attempt_cancelled_before_it_started_is_noted(
    started: bool, said: str
) -> None:
    run = Run(parse({"id": "p", "parallel": [[shell("x")], [shell("y")]]}))
    run.start()
    run.claim("y", "w1")
    run.cancel()  # x was only dispatched: CANCELLED; y runs: CANCELLING
    before = run.state
    t = run.stop("x", StopCause.CANCELLED, started=started, server="w2")
    assert t.decisions == []
    assert kinds(t) == [HistoryKind.CANCELLED]
    assert t.history[0].reason == f"attempt 1 was stopped by w2 {said}"
    assert run.instance() is InstanceStatus.CANCELLING
    if not started:
        assert dump(t.state) == dump(before)
        assert t.changed_steps == frozenset()
        return
    # The worker's word that it had started is better knowledge than "before it started".
    x = t.state.activities["x"]
    assert (x.status, x.reason) == (ActivityStatus.CANCELLED, t.history[0].reason)
    assert x.error is not None and x.error.outcome_unknown
    assert t.changed_steps == frozenset({"x"})


# --- the property: a cancel at any moment ---------------------------------------------------------


@property_settings(100)
@given(generated=failover_definitions(), data=st.data())
def test_a_cancel_at_any_moment_stops_everything_and_ends_cancelled(
    generated: tuple[Definition, dict[str, Spec]], data: st.DataObject
) -> None:
    """Random definitions and workers (test_machine_failover.Cluster), with cancels sent at
    random moments: to the scheduler first, or heard by the workers first. At every transition:
    nothing is dispatched or granted once the cancel is recorded, CANCELLING ends only in
    CANCELLED, StopInstance goes out once, when something may sit with a worker. At the end the
    instance has ended, CANCELLED whenever a cancel was recorded before it ended otherwise."""
    c = interleave(generated, data, focus="cancels", may_cancel=True)
    if c.state.cancel is not None:
        assert c.state.status is InstanceStatus.CANCELLED
        assert c.finished == Finish(InstanceStatus.CANCELLED)
        for step, a in c.state.activities.items():
            assert a.status.is_final, step
            assert a.flag is None
    else:
        assert c.state.status is not InstanceStatus.CANCELLED
    c.statistics(
        "instance_cancelling",
        "cancel heard first",
        "activity_cancelled",
        "outcome stopped",
        "result while cancelling",
    )


ENDINGS = [
    "completed",
    "failed",
    "unknown",
    "timed out",
    "stopped",
    "stopped before it started",
    "drained",
    "runner crashed",
    "deadline",
    "lost",
    "quarantined",
]
"""How an activity that ran when the cancel came may end."""
NOISE = ["cancel again", "holder asks again", "late result", "resolve", "stray deadline"]


@st.composite
def running_activities(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[bool]]:
    """1-4 parallel activities, restartable or not, with retries and time-outs, each claimed
    (running) or only dispatched when the cancel comes."""
    steps, claimed = [], []
    for i in range(draw(st.integers(1, 4))):
        make = draw(st.sampled_from([noop, shell]))
        extra: dict[str, Any] = {"retry": {"max_attempts": draw(st.integers(1, 3))}}
        if draw(st.booleans()):
            extra["timeout"] = "30s"
        steps.append(make(f"a{i}", **extra))
        claimed.append(draw(st.integers(0, 3)) > 0)
    return steps, claimed


def expected_ending(ending: str) -> ActivityStatus:
    return {
        "completed": ActivityStatus.COMPLETED,
        "failed": ActivityStatus.FAILED,
        "unknown": ActivityStatus.FAILED,
        "timed out": ActivityStatus.TIMED_OUT,
    }.get(ending, ActivityStatus.CANCELLED)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generated=running_activities(), data=st.data())
def test_whatever_ends_what_ran_a_cancelling_instance_ends_cancelled(
    generated: tuple[list[dict[str, Any]], list[bool]], data: st.DataObject
) -> None:
    """A cancel (the command, or a worker's stop heard first) meets running and dispatched
    activities; then each running one ends in any way, in any order, among noise. At every
    transition: nothing is dispatched or granted, nothing is charged or flagged, CANCELLING is
    left only for CANCELLED and only once nothing runs; each activity ends as its ending says
    (a stop, a lost holder or an expired grace of a non-restartable one says its outcome is
    unknown). At the end the instance is CANCELLED, by whoever asked first."""
    steps, claimed = generated
    run = Run(parse({"id": "p", "parallel": [[s] for s in steps]}, noop("after")))
    run.start()
    for i, step in enumerate(steps):
        if claimed[i]:
            run.claim(step["id"], f"w{i}", wants_reply=step["type"] == "shell.command")
    ran = {s for s, a in run.state.activities.items() if a.status is ActivityStatus.RUNNING}
    holders = {s: run.state.activities[s].claimed_by for s in ran}
    before = run.state
    heard_first = bool(ran) and data.draw(st.booleans(), label="a worker heard it first")
    if heard_first:
        first = data.draw(st.sampled_from(sorted(ran)), label="stopped first")
        t = run.stop(first, StopCause.CANCELLED, by="carol", server=holders[first] or "w")
        ran.discard(first)
    else:
        t = run.cancel(by="carol")
    assert run.state.cancel is not None
    assert run.state.cancel.by == "carol"
    assert [d for d in t.decisions if isinstance(d, StopInstance)] == [StopInstance("carol")]
    assert not any(isinstance(d, Dispatch) for d in t.decisions)
    finishes = [t] if run.instance() is InstanceStatus.CANCELLED else []
    assert (run.instance() is InstanceStatus.CANCELLING) is bool(ran)
    if ran:
        # Each activity still running gets the cancel's grace to confirm it stopped.
        grace = {(d.step, d.at) for d in t.decisions if isinstance(d, SetDeadline)}
        assert {step for step, _ in grace} >= ran
        assert {at for _, at in grace} == {run.now + GRACE}

    charged = {s: (a.failures, a.interruptions) for s, a in before.activities.items()}
    while ran:
        previous = run.state
        if data.draw(st.integers(0, 3), label="noise?") == 0:
            noise = data.draw(st.sampled_from(NOISE), label="noise")
            step = data.draw(st.sampled_from(sorted(ran)), label="noise step")
            if noise == "cancel again":
                t = run.cancel(by="dave")
            elif noise == "holder asks again":
                t = run.claim(step, holders[step] or "w", redelivered=True, delivery_count=0)
            elif noise == "late result":
                t = run.complete(step, attempt=run.attempt(step) + 1)
            elif noise == "resolve":
                t = run.resolve(step, "retry")
            else:
                t = run.deadline(step, attempt=run.attempt(step) + 1)
            assert dump(t.state) == dump(previous), noise
            assert not any(isinstance(d, AnswerClaim) and d.granted for d in t.decisions)
            assert [d for d in t.decisions if not isinstance(d, AnswerClaim)] == []
            continue
        step = data.draw(st.sampled_from(sorted(ran)), label="step")
        ending = data.draw(st.sampled_from(ENDINGS), label="ending")
        holder = holders[step] or "w"
        restartable = previous.activities[step].restartable
        if ending == "completed":
            t = run.complete(step, {"ok": True}, server=holder)
        elif ending in ("failed", "unknown", "timed out"):
            t = run.fail(
                step,
                server=holder,
                timed_out=ending == "timed out",
                outcome_unknown=ending != "failed",
            )
        elif ending == "stopped":
            t = run.stop(step, StopCause.CANCELLED, by="carol", server=holder)
        elif ending == "stopped before it started":
            t = run.stop(step, StopCause.CANCELLED, started=False, by="carol", server=holder)
        elif ending == "drained":
            t = run.stop(step, StopCause.DRAIN_DEADLINE, server=holder)
        elif ending == "runner crashed":
            t = run.stop(step, StopCause.RUNNER_CRASHED, server=holder)
        elif ending == "deadline":
            t = run.deadline(step)
        elif ending == "lost":
            t = run.crash(step, "w9")
        else:
            t = run.quarantine(step)
        ran.discard(step)
        a = run.state.activities[step]
        assert a.status is expected_ending(ending), (ending, a)
        assert a.attempt == previous.activities[step].attempt
        unknown_said = "outcome unknown" in (a.reason or "")
        may_have_run = ending in ("stopped", "drained", "runner crashed", "deadline", "lost")
        assert unknown_said is (may_have_run and not restartable), (ending, a.reason)
        assert not any(isinstance(d, Dispatch | SetDeadline | StopInstance) for d in t.decisions)
        assert not any(isinstance(d, AnswerClaim) and d.granted for d in t.decisions)
        if ran:
            assert run.instance() is InstanceStatus.CANCELLING
            assert not any(isinstance(d, Finish) for d in t.decisions)
        else:
            assert run.instance() is InstanceStatus.CANCELLED
            assert t.decisions[-1] == Finish(InstanceStatus.CANCELLED)
            assert entry(t, HistoryKind.INSTANCE_CANCELLED).reason.startswith("cancelled by carol")
            finishes.append(t)
        for s, a in run.state.activities.items():
            # Nothing is charged to anything while it is cancelled, and nothing is flagged.
            assert (a.failures, a.interruptions, a.flag) == (*charged[s], None), (s, a)
    assert run.instance() is InstanceStatus.CANCELLED
    assert len(finishes) == 1
    assert all(a.status.is_final for a in run.state.activities.values())
    assert "after" not in run.state.activities
    event(f"heard first: {heard_first}")
    event(f"ran when cancelled: {sum(claimed)}")


def test_a_message_dropped_by_another_worker_after_its_holder_died_may_have_had_its_effect() -> (
    None
):
    """While CANCELLING, the holder of a non-restartable attempt dies; the broker hands the
    message to a worker that knows of the cancel and drops it without starting it. The holder
    may have started it: the history must not say it never started."""
    run = cancelling(shell("x"))
    t = run.stop("x", StopCause.CANCELLED, started=False, server="w2", by="bob")
    x = run.state.activities["x"]
    assert x.status is ActivityStatus.CANCELLED
    assert x.reason is not None
    assert "w1 lost attempt 1" in x.reason and "outcome unknown" in x.reason
    assert "before it started" not in x.reason
    assert t.history[-2].reason == x.reason
    assert run.instance() is InstanceStatus.CANCELLED
