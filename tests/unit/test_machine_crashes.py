"""Crashes are charged to their cause (DESIGN.md), example by example; with the re-sending of a
message delivered too often and the drain's deadline.

When a worker dies, what it ran are suspects: each gets a `Crash(alone=False)` on its record and
nothing is charged. A suspect's first crash restarts it at once; a suspect with an earlier crash
on its record (or lost while running alone) runs next alone, in an isolated runner. Only a crash
of that runner (`ActivityStopped(RUNNER_CRASHED)`) is charged (`interruptions`), up to the crash
budget, where it is flagged with every crash listed. Time-outs are charged too. An operator's
retry of a restartable activity with crashes on record runs it alone, with a fresh budget.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from unit.test_machine_failover import (
    GRACE,
    Run,
    S,
    Spec,
    assert_flag,
    entry,
    interleave,
    kinds,
    noop,
    parse,
    property_settings,
    running,
    same_decisions,
    shell,
)

from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.definitions import Definition, parse_definition
from paceline_engine.events import (
    AnswerClaim,
    Dispatch,
    Finish,
    HistoryKind,
    Policy,
    SetDeadline,
    StopCause,
)
from paceline_engine.state import Crash


def suspect(*more: dict[str, Any], policy: Policy | None = None, **extra: Any) -> Run:
    """`x` (restartable) lost twice with its workers: now SCHEDULED as attempt 3, alone."""
    run = Run(parse(noop("x", **extra), *more), policy)
    run.start()
    run.claim("x", "w1", wants_reply=False)
    run.crash("x", "w2", deliveries=1)
    run.crash("x", "w3", attempt=1, deliveries=2)
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.isolated) == (ActivityStatus.SCHEDULED, 3, True)
    return run


def isolated_running(*more: dict[str, Any], policy: Policy | None = None, **extra: Any) -> Run:
    run = suspect(*more, policy=policy, **extra)
    run.claim("x", "w4")
    return run


def stopped_non_restartable(cause: StopCause, **stop: Any) -> tuple[Run, datetime]:
    """`x` (not restartable, with retries left) stopped by w1, which ran it, for `cause`:
    flagged, nothing run again. The run, and since when w1 held the attempt."""
    run = running(shell("x", retry={"max_attempts": 3}))
    since = run.now
    t = run.stop("x", cause, server="w1", **stop)
    assert t.decisions == []
    assert kinds(t) == [HistoryKind.INTERRUPTED, HistoryKind.FLAGGED]
    return run, since


# --- a worker's death ---------------------------------------------------------------------------


def test_a_workers_death_charges_nothing_to_what_it_ran() -> None:
    run = Run(parse({"id": "p", "parallel": [[noop("x")], [noop("y")]]}))
    run.start()
    since = {}
    for step in ("x", "y"):
        run.claim(step, "w1", wants_reply=False)
        since[step] = run.now
    for step, to in (("x", "w2"), ("y", "w3")):
        run.crash(step, to)
        a = run.state.activities[step]
        assert a.interruptions == 0
        assert a.crashes == [
            Crash(attempt=1, server_id="w1", since=since[step], detected_at=run.now, alone=False)
        ]
    assert run.instance() is InstanceStatus.RUNNING


def test_the_first_crash_of_a_suspect_restarts_it_at_once() -> None:
    run = Run(parse(noop("x", timeout="30s")))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    t = run.crash("x", "w2")
    same_decisions(
        t,
        AnswerClaim(True, 2, "restarted as attempt 2"),
        SetDeadline("x", 2, run.now + 30 * S + GRACE),
    )
    assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.RESTARTED]
    assert "nothing charged" in entry(t, HistoryKind.RESTARTED).reason
    x = run.state.activities["x"]
    assert (x.attempt, x.status, x.claimed_by, x.isolated, x.interruptions) == (
        2,
        ActivityStatus.RUNNING,
        "w2",
        False,
        0,
    )


def test_a_suspect_with_an_earlier_crash_on_its_record_runs_next_alone() -> None:
    run = Run(parse(noop("x", timeout="30s")))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    run.crash("x", "w2")
    t = run.crash("x", "w3", attempt=1, deliveries=2)
    reason = (
        "a suspect: 2 workers died while it ran; running alone, in an isolated runner, as attempt 3"
    )
    assert t.decisions == [
        AnswerClaim(False, 1, f"moved to isolation: {reason}"),
        Dispatch("x", "noop", {"v": "x"}, 3, True, 30.0, None, isolated=True),
    ]
    assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.ISOLATED]
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.isolated, x.interruptions, x.claimed_by) == (
        ActivityStatus.SCHEDULED,
        3,
        True,
        0,
        None,
    )
    assert [(c.attempt, c.server_id, c.alone) for c in x.crashes] == [
        (1, "w1", False),
        (2, "w2", False),
    ]


def test_an_isolated_attempt_lost_with_its_worker_runs_alone_again_charged_nothing() -> None:
    run = isolated_running()
    t = run.crash("x", "w5", attempt=3, deliveries=1)
    assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.ISOLATED]
    (dispatch,) = [d for d in t.decisions if isinstance(d, Dispatch)]
    assert (dispatch.attempt, dispatch.isolated) == (4, True)
    x = run.state.activities["x"]
    assert (x.interruptions, x.crashes[-1].attempt, x.crashes[-1].alone) == (0, 3, False)


def test_a_non_restartable_attempt_lost_with_its_worker_is_flagged_and_charged_nothing() -> None:
    run = running(shell("x"))
    since = run.now
    run.crash("x", "w2")
    x = run.state.activities["x"]
    assert x.flag is not None
    assert x.flag.kind == "redelivered"
    assert x.interruptions == 0
    assert x.crashes == [
        Crash(attempt=1, server_id="w1", since=since, detected_at=run.now, alone=False)
    ]


def test_a_non_restartable_attempt_lost_twice_is_flagged_never_isolated() -> None:
    run = running(shell("x"))
    run.crash("x", "w2")
    t = run.resolve("x", "retry")
    (dispatch,) = [d for d in t.decisions if isinstance(d, Dispatch)]
    assert dispatch.isolated is False
    run.claim("x", "w3")
    t = run.crash("x", "w4")
    assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.FLAGGED]
    assert [d for d in t.decisions if isinstance(d, Dispatch)] == []


# --- a crash of an isolated runner --------------------------------------------------------------


def test_a_crash_of_an_isolated_runner_is_charged_and_it_runs_alone_again() -> None:
    run = isolated_running()
    since = run.now
    t = run.stop("x", StopCause.RUNNER_CRASHED, server="w4", message="killed by signal 11")
    assert t.decisions == [Dispatch("x", "noop", {"v": "x"}, 4, True, None, None, isolated=True)]
    assert kinds(t) == [HistoryKind.INTERRUPTED, HistoryKind.RETRY]
    assert entry(t, HistoryKind.INTERRUPTED).reason == (
        "attempt 3 crashed its isolated runner on w4 (killed by signal 11)"
    )
    assert entry(t, HistoryKind.RETRY).reason == (
        "charged 1 of 3 crashes; running alone again as attempt 4"
    )
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.isolated, x.interruptions) == (
        ActivityStatus.SCHEDULED,
        4,
        True,
        1,
    )
    assert x.crashes[-1] == Crash(
        attempt=3, server_id="w4", since=since, detected_at=run.now, alone=True
    )


def test_runner_crashes_up_to_the_crash_budget_flag_it_listing_every_crash() -> None:
    run = isolated_running(policy=Policy(crash_budget=2))
    run.stop("x", StopCause.RUNNER_CRASHED, server="w4")
    run.claim("x", "w5")
    since = run.now
    t = run.stop("x", StopCause.RUNNER_CRASHED, server="w5")
    assert t.decisions == []
    assert kinds(t) == [HistoryKind.INTERRUPTED, HistoryKind.FLAGGED]
    x = run.state.activities["x"]
    assert x.status is ActivityStatus.INTERRUPTED
    flag = assert_flag(run, "crash_budget", 4, "w5", since)
    assert flag.reason.startswith("crash budget exhausted: 2 of 2 charged")
    # Every crash on its record: which attempt, which server, when, alone or not.
    for c in x.crashes:
        held = c.since.isoformat(timespec="milliseconds") if c.since else "an unknown time"
        lost = c.detected_at.isoformat(timespec="milliseconds")
        how = "alone, in an isolated runner" if c.alone else "among others"
        said = f"attempt {c.attempt} on {c.server_id} (held since {held}, lost at {lost}, {how})"
        assert said in flag.reason
    assert [(c.attempt, c.server_id, c.alone) for c in x.crashes] == [
        (1, "w1", False),
        (2, "w2", False),
        (3, "w4", True),
        (4, "w5", True),
    ]
    assert entry(t, HistoryKind.FLAGGED).reason == flag.reason
    assert (x.interruptions, run.instance()) == (2, InstanceStatus.FLAGGED)


def test_a_crash_budget_flag_counts_time_outs_as_charged_not_as_crashes() -> None:
    """Found by review: the flag said "it crashed its runner 2 times" after one crash and one
    time-out."""
    run = suspect(policy=Policy(crash_budget=2), timeout="30s")
    run.claim("x", "w4")
    run.deadline("x")  # a time-out: charged 1, runs alone again as attempt 4
    assert (run.attempt("x"), run.state.activities["x"].isolated) == (4, True)
    run.claim("x", "w5")
    run.stop("x", StopCause.RUNNER_CRASHED, server="w5")
    flag = run.state.activities["x"].flag
    assert flag is not None
    assert flag.kind == "crash_budget"
    assert "crashed its runner 2 times" not in flag.reason
    assert flag.reason.startswith(
        "crash budget exhausted: 2 of 2 charged (crashes of its runner while it ran alone, "
        "and time-outs)"
    )


def test_a_runner_crash_of_a_non_restartable_attempt_flags_it_and_runs_nothing_again() -> None:
    """Only restartable suspects run alone; should a non-restartable attempt's runner die all
    the same, it may have had its effect: flagged, like any unknown outcome."""
    run, since = stopped_non_restartable(StopCause.RUNNER_CRASHED, message="killed by signal 9")
    flag = assert_flag(run, "outcome_unknown", 1, "w1", since)
    assert flag.reason == (
        "attempt 1 crashed its isolated runner on w1 (killed by signal 9); it may have had its "
        "effect, and it is not restartable"
    )
    x = run.state.activities["x"]
    assert (x.failures, x.interruptions, x.crashes[-1].alone) == (0, 1, True)
    assert run.instance() is InstanceStatus.FLAGGED


def test_a_healthy_neighbour_of_a_poison_activity_completes() -> None:
    """p takes its worker down each time; h ran beside it both times. Both run alone next:
    p crashes its runner to the budget and is flagged, h completes, charged nothing."""
    run = Run(parse({"id": "par", "parallel": [[noop("p")], [noop("h")]]}, noop("after")))
    run.start()
    for server, to, deliveries in (("w1", "w2", 1), ("w2", "w3", 2)):
        for step in ("p", "h"):
            if deliveries == 1:
                run.claim(step, server, wants_reply=False)
            run.crash(step, to, attempt=1, deliveries=deliveries)
    for step in ("p", "h"):
        a = run.state.activities[step]
        assert (a.attempt, a.isolated, a.interruptions) == (3, True, 0)
    run.claim("h", "w4")
    run.complete("h", {"ok": True}, server="w4")
    for _ in range(3):
        run.claim("p", "w4")
        run.stop("p", StopCause.RUNNER_CRASHED, server="w4")
    p, h = run.state.activities["p"], run.state.activities["h"]
    assert p.flag is not None
    assert (p.flag.kind, p.interruptions) == ("crash_budget", 3)
    assert (h.status, h.interruptions, h.flag) == (ActivityStatus.COMPLETED, 0, None)
    assert run.instance() is InstanceStatus.FLAGGED
    t = run.resolve("p", "skip", {"skipped": True})
    assert [d.step for d in t.decisions if isinstance(d, Dispatch)] == ["after"]


def test_a_time_out_of_an_isolated_attempt_runs_it_alone_again() -> None:
    run = isolated_running(timeout="30s")
    t = run.deadline("x")
    assert t.decisions == [Dispatch("x", "noop", {"v": "x"}, 4, True, 30.0, None, isolated=True)]
    assert run.state.activities["x"].interruptions == 1


def test_an_isolated_attempt_that_completes_lets_the_instance_go_on() -> None:
    run = isolated_running(noop("after"))
    t = run.complete("x", {"ok": True}, server="w4")
    assert [d.step for d in t.decisions if isinstance(d, Dispatch)] == ["after"]
    x = run.state.activities["x"]
    assert (x.status, x.interruptions, x.flag) == (ActivityStatus.COMPLETED, 0, None)


# --- an operator's retry ------------------------------------------------------------------------


def test_an_operators_retry_of_a_crashed_restartable_activity_runs_it_alone_afresh() -> None:
    run = isolated_running(policy=Policy(crash_budget=1))
    run.stop("x", StopCause.RUNNER_CRASHED, server="w4")
    assert run.state.activities["x"].interruptions == 1
    t = run.resolve("x", "retry")
    assert t.decisions == [Dispatch("x", "noop", {"v": "x"}, 4, True, None, None, isolated=True)]
    x = run.state.activities["x"]
    assert (x.status, x.isolated, x.interruptions) == (ActivityStatus.SCHEDULED, True, 0)
    assert len(x.crashes) == 3, "the record keeps every crash"


def test_an_operators_retry_of_an_activity_without_crashes_is_not_isolated() -> None:
    run = Run(parse(noop("x")))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    run.quarantine("x")  # flagged by a worker's backstop: no crash on the engine's record
    t = run.resolve("x", "retry")
    assert t.decisions == [Dispatch("x", "noop", {"v": "x"}, 2, True, None, None)]


# --- a message delivered too often --------------------------------------------------------------


def test_a_claim_delivered_too_often_is_re_sent_as_a_fresh_message() -> None:
    run = Run(parse(noop("x")))
    run.start()
    t = run.claim("x", "w2", redelivered=True, delivery_count=4)  # delivery 5 of 5
    reason = (
        "delivered 5 times without running to completion: re-sent as a fresh message, attempt 2"
    )
    assert t.decisions == [
        AnswerClaim(False, 1, reason),
        Dispatch("x", "noop", {"v": "x"}, 2, True, None, None),
    ]
    assert kinds(t) == [HistoryKind.RETRY]
    assert t.history[0].reason == reason
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.claimed_by, x.interruptions, x.failures) == (
        ActivityStatus.SCHEDULED,
        2,
        None,
        0,
        0,
    )


def test_a_claim_below_the_refresh_threshold_is_granted() -> None:
    run = Run(parse(noop("x")))
    run.start()
    t = run.claim("x", "w2", redelivered=True, delivery_count=3)  # delivery 4 of 5
    assert t.decisions == [AnswerClaim(True, 1, "granted")]


def test_the_refresh_threshold_comes_from_the_policy() -> None:
    run = Run(parse(noop("x")), Policy(refresh_after_deliveries=2))
    run.start()
    t = run.claim("x", "w2", redelivered=True, delivery_count=1)
    assert kinds(t) == [HistoryKind.RETRY]
    assert run.attempt("x") == 2


def test_a_non_restartable_message_never_claimed_is_re_sent_when_delivered_too_often() -> None:
    """It provably never began (nobody claimed it): a fresh message is safe."""
    run = Run(parse(shell("x")))
    run.start()
    t = run.claim("x", "w2", redelivered=True, delivery_count=4)
    (dispatch,) = [d for d in t.decisions if isinstance(d, Dispatch)]
    assert (dispatch.attempt, dispatch.restartable) == (2, False)
    assert run.state.activities["x"].flag is None


def test_a_restart_delivered_too_often_is_re_sent_instead() -> None:
    run = Run(parse(noop("x")))
    run.start()
    run.claim("x", "w1", redelivered=True, delivery_count=2)
    t = run.crash("x", "w2", deliveries=4)
    assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.RETRY]
    assert t.decisions == [
        AnswerClaim(
            False,
            1,
            "delivered 5 times without running to completion: re-sent as a fresh message, "
            "attempt 2",
        ),
        Dispatch("x", "noop", {"v": "x"}, 2, True, None, None),
    ]
    x = run.state.activities["x"]
    assert (x.attempt, x.status, x.interruptions, len(x.crashes)) == (
        2,
        ActivityStatus.SCHEDULED,
        0,
        1,
    )


def test_a_re_sent_message_keeps_its_isolation() -> None:
    run = suspect()
    t = run.claim("x", "w4", redelivered=True, delivery_count=4)
    (dispatch,) = [d for d in t.decisions if isinstance(d, Dispatch)]
    assert (dispatch.attempt, dispatch.isolated) == (4, True)
    assert "re-sent as a fresh message" in t.history[0].reason


def test_a_holder_asking_again_is_never_re_sent() -> None:
    run = Run(parse(noop("x")))
    run.start()
    run.claim("x", "w1", redelivered=True, delivery_count=3)
    t = run.claim("x", "w1", redelivered=True, delivery_count=4)
    assert t.decisions == [AnswerClaim(True, 1, "granted")]
    assert t.history == []


# --- a drain's deadline -------------------------------------------------------------------------


def test_a_drain_deadline_runs_a_restartable_attempt_again_charging_nothing() -> None:
    run = Run(parse(noop("x", retry={"max_attempts": 1})))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    t = run.stop("x", StopCause.DRAIN_DEADLINE, server="w1")
    assert t.decisions == [Dispatch("x", "noop", {"v": "x"}, 2, True, None, None)]
    assert kinds(t) == [HistoryKind.INTERRUPTED, HistoryKind.RETRY]
    assert "the drain cut it" in entry(t, HistoryKind.INTERRUPTED).reason
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.interruptions, x.failures, x.crashes) == (
        ActivityStatus.SCHEDULED,
        2,
        0,
        0,
        [],
    )
    assert run.instance() is InstanceStatus.RUNNING


def test_a_drain_deadline_keeps_the_isolation() -> None:
    run = isolated_running()
    t = run.stop("x", StopCause.DRAIN_DEADLINE, server="w4")
    assert t.decisions == [Dispatch("x", "noop", {"v": "x"}, 4, True, None, None, isolated=True)]
    assert run.state.activities["x"].interruptions == 0


def test_a_drain_deadline_flags_a_non_restartable_attempt() -> None:
    run, since = stopped_non_restartable(StopCause.DRAIN_DEADLINE)
    flag = assert_flag(run, "drain_deadline", 1, "w1", since)
    assert flag.reason == (
        "attempt 1 on w1 was still running when the drain of w1 reached its grace deadline: "
        "the drain cut it; it may have had its effect, and it is not restartable"
    )
    x = run.state.activities["x"]
    assert (x.failures, x.interruptions) == (0, 0)
    assert run.instance() is InstanceStatus.FLAGGED


@pytest.mark.parametrize("cause", list(StopCause))
def test_a_stop_of_a_stale_attempt_is_only_recorded(cause: StopCause) -> None:
    run = Run(parse(noop("x", retry={"max_attempts": 2})))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    run.fail("x")
    before = run.state
    t = run.stop("x", cause, attempt=1)
    assert t.decisions == []
    assert t.state.model_dump() == before.model_dump()
    assert kinds(t) == [HistoryKind.LATE_RESULT]


def test_a_failure_after_crashes_still_fails_by_the_retry_policy() -> None:
    run = isolated_running(retry={"max_attempts": 1})
    t = run.fail("x", "exit 1", server="w4")
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert run.state.activities["x"].interruptions == 0


# --- the property: poison and its neighbours under any interleaving ------------------------------


@st.composite
def poison_and_neighbours(draw: st.DrawFn) -> tuple[Definition, dict[str, Spec]]:
    """A parallel step of 2-4 restartable activities, at least one of them a poison (it takes
    down whatever runs it) and one healthy, then one more step."""
    n = draw(st.integers(2, 4))
    poison = [True, False, *(draw(st.booleans()) for _ in range(n - 2))]
    branches, specs = [], {}
    for i in range(n):
        step: dict[str, Any] = {"id": f"a{i}", "type": "noop", "with": {"v": i}}
        timeout = draw(st.sampled_from([None, 30.0]))
        if timeout is not None:
            step["timeout"] = timeout
        branches.append([step])
        specs[f"a{i}"] = Spec(True, timeout, 1, frozenset(), poison[i])
    after = {"id": "after", "type": "noop", "with": {"v": "after"}}
    specs["after"] = Spec(True, None, 1, frozenset(specs), False)
    steps = [{"id": "par", "parallel": branches}, after]
    return parse_definition({"name": "poison", "steps": steps}), specs


@property_settings(100)
@given(generated=poison_and_neighbours(), data=st.data())
def test_crashes_are_charged_to_the_poison_never_to_its_neighbours(
    generated: tuple[Definition, dict[str, Spec]], data: st.DataObject
) -> None:
    """Workers die running a poison beside healthy activities, its isolated runners die, other
    workers crash, freeze and drain. At every transition (test_machine_failover.Cluster): a
    worker's death charges nobody; a crash_budget flag comes only from the poison's own runner
    crashes; time-outs and runner crashes are charged one at a time. At the end every healthy
    activity that ran to its end did so without a charge it did not earn."""
    _, specs = generated
    c = interleave(generated, data, focus="crashes", may_cancel=False)
    for step, a in c.state.activities.items():
        if not specs[step].poison:
            # Charged only its own time-outs: never a crash of its runner, nor a neighbour's.
            assert not any(crash.alone for crash in a.crashes), (step, a.crashes)
    c.statistics("isolated", "outcome runner crashed", "restarted", "flagged", "crashed")
