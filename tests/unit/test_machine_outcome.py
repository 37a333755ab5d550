"""The outcome rule in the engine (DESIGN.md, "Outcome unknown"), example by example.

For a non-restartable activity only an ending that proves the effect did not happen is a
failure the step's `retry` may repeat; an ending with `error.outcome_unknown` flags it for an
operator, like a crash, and leaves the retry policy untouched. Restartable activities are
retried by their policy whatever the outcome. The step's own time-out keeps its rule (flag kind
`timeout` when not restartable, the crash budget when restartable). A flag that resolves
itself (a late result of the flagged attempt) leaves no flag text behind.
"""

from __future__ import annotations

from unit.test_machine_failover import (
    S,
    entry,
    flag_now,
    flagged_shell,
    kinds,
    noop,
    running,
    shell,
)

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.events import AnswerClaim, Dispatch, Finish, HistoryKind, Resolve

RETRIED_SHELL = shell("x", retry={"max_attempts": 3, "backoff": "5s"})
ARGV = {"argv": ["deploy", "x"]}


def test_an_outcome_unknown_failure_of_a_non_restartable_activity_flags_it() -> None:
    run = running(RETRIED_SHELL, noop("after"))
    since = run.now
    t = run.fail(
        "x", "connection reset after the request was sent", outcome_unknown=True, kind="http"
    )
    assert t.decisions == []
    assert kinds(t) == [HistoryKind.FLAGGED]
    reason = (
        "attempt 1 on w1 failed: http: connection reset after the request was sent; it may "
        "have had its effect, and it is not restartable"
    )
    x = run.state.activities["x"]
    assert x.status is ActivityStatus.INTERRUPTED
    assert x.flag == flag_now(run, "outcome_unknown", reason, since)
    assert x.reason == reason
    flagged = entry(t, HistoryKind.FLAGGED)
    assert (flagged.step, flagged.attempt, flagged.reason) == ("x", 1, reason)
    assert flagged.data == {"flag": "outcome_unknown"}
    assert x.error == ActivityError(
        kind="http", message="connection reset after the request was sent", outcome_unknown=True
    )
    assert run.instance() is InstanceStatus.FLAGGED
    assert "after" not in run.state.activities


def test_an_outcome_unknown_failure_never_uses_up_the_retry_policy() -> None:
    run = running(RETRIED_SHELL)
    run.fail("x", "killed by signal 9", outcome_unknown=True)
    assert (run.attempt("x"), run.state.activities["x"].failures) == (1, 0)
    # The operator retries it: the policy still allows all of its 3 attempts on failure.
    t = run.resolve("x", "retry")
    assert t.decisions == [Dispatch("x", "shell.command", ARGV, 2, False, None, None)]
    run.claim("x", "w2")
    t = run.fail("x", "exit 1", server="w2")
    assert t.decisions == [Dispatch("x", "shell.command", ARGV, 3, False, None, run.now + 5 * S)]
    assert entry(t, HistoryKind.RETRY).reason.startswith("failure 1 of 3 allowed")
    assert run.state.activities["x"].failures == 1


def test_an_outcome_unknown_failure_of_a_restartable_activity_is_retried() -> None:
    run = running(noop("x", retry={"max_attempts": 2, "backoff": "3s"}))
    t = run.fail("x", "no answer", outcome_unknown=True)
    assert t.decisions == [Dispatch("x", "noop", {"v": "x"}, 2, True, None, run.now + 3 * S)]
    assert kinds(t) == [HistoryKind.FAILED, HistoryKind.RETRY]
    x = run.state.activities["x"]
    assert (x.status, x.failures, x.interruptions, x.flag) == (
        ActivityStatus.SCHEDULED,
        1,
        0,
        None,
    )
    assert run.instance() is InstanceStatus.RUNNING


def test_an_outcome_unknown_failure_of_a_restartable_activity_ends_its_retry_policy() -> None:
    run = running(noop("x"))
    t = run.fail("x", "no answer", outcome_unknown=True)
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert run.status("x") is ActivityStatus.FAILED


def test_a_known_failure_of_a_non_restartable_activity_is_retried() -> None:
    """The program could not start, or answered with an error: nothing happened, or the
    outcome is known. The step's retry policy applies."""
    run = running(RETRIED_SHELL)
    t = run.fail("x", "exit code 2", outcome_unknown=False, kind="exit_code")
    assert t.decisions == [Dispatch("x", "shell.command", ARGV, 2, False, None, run.now + 5 * S)]
    assert kinds(t) == [HistoryKind.FAILED, HistoryKind.RETRY]
    assert entry(t, HistoryKind.FAILED).reason == "attempt 1 on w1 failed: exit_code: exit code 2"
    x = run.state.activities["x"]
    assert (x.status, x.failures, x.flag) == (ActivityStatus.SCHEDULED, 1, None)


def test_a_time_out_with_an_unknown_outcome_is_flagged_as_a_time_out() -> None:
    run = running(RETRIED_SHELL)
    t = run.fail("x", "killed after 60s", timed_out=True, outcome_unknown=True)
    assert t.decisions == []
    x = run.state.activities["x"]
    assert x.flag is not None
    assert (x.flag.kind, x.flag.attempt, x.flag.server_id) == ("timeout", 1, "w1")
    assert (x.failures, x.interruptions) == (0, 0)
    assert run.instance() is InstanceStatus.FLAGGED


def test_a_time_out_of_a_restartable_activity_with_an_unknown_outcome_is_charged() -> None:
    """A time-out is charged to the crash budget (a new attempt at once), never to the retry
    policy, whatever the outcome."""
    run = running(noop("x", retry={"max_attempts": 1, "backoff": "9s"}))
    t = run.fail("x", "killed after 60s", timed_out=True, outcome_unknown=True)
    assert t.decisions == [Dispatch("x", "noop", {"v": "x"}, 2, True, None, None)]
    assert kinds(t) == [HistoryKind.TIMED_OUT, HistoryKind.RETRY]
    x = run.state.activities["x"]
    assert (x.failures, x.interruptions, x.flag) == (0, 1, None)


def test_a_late_success_of_an_outcome_unknown_flag_resolves_it_without_flag_text() -> None:
    """The worker that reported the unknown outcome learns more (a second report of the same
    attempt, say after a reconnect): the flag resolves itself."""
    run = running(shell("x"), noop("after"))
    run.fail("x", "no answer", outcome_unknown=True)
    t = run.complete("x", {"ok": True}, attempt=1)
    assert kinds(t) == [HistoryKind.RESOLVED, HistoryKind.COMPLETED, HistoryKind.DISPATCHED]
    x = run.state.activities["x"]
    assert (x.status, x.flag, x.reason, x.output) == (
        ActivityStatus.COMPLETED,
        None,
        None,
        {"ok": True},
    )
    assert run.instance() is InstanceStatus.RUNNING


def test_a_flag_that_resolves_itself_leaves_no_flag_text() -> None:
    run = flagged_shell(noop("after"))
    assert run.state.activities["x"].reason is not None  # the flag's text, while flagged
    t = run.complete("x", {"ok": True}, attempt=1, server="w1")
    assert "the flag resolves itself" in entry(t, HistoryKind.RESOLVED).reason
    x = run.state.activities["x"]
    assert (x.status, x.flag, x.reason) == (ActivityStatus.COMPLETED, None, None)


def test_an_outcome_unknown_failure_of_a_flagged_attempt_flags_it_again_for_that_reason() -> None:
    """The holder was alive after all and reports that it sent a request without an answer:
    the flag now says why the outcome is unknown."""
    run = running(RETRIED_SHELL)
    run.crash("x", "w2")  # flagged: redelivered
    t = run.fail("x", "no answer", attempt=1, server="w1", outcome_unknown=True)
    assert kinds(t) == [HistoryKind.RESOLVED, HistoryKind.FLAGGED]
    x = run.state.activities["x"]
    assert x.flag is not None
    assert (x.flag.kind, x.flag.attempt, x.failures) == ("outcome_unknown", 1, 0)
    assert x.reason == x.flag.reason
    assert run.instance() is InstanceStatus.FLAGGED
    # Its claim stays refused, like any flagged attempt's.
    t = run.claim("x", "w3", attempt=1, redelivered=True, delivery_count=2)
    assert t.decisions == [
        AnswerClaim(False, 1, "the activity is flagged, waiting for an operator")
    ]


def test_a_forced_retry_says_so_in_the_history() -> None:
    run = running(RETRIED_SHELL, noop("after"))
    run.fail("x", "sent, no answer", outcome_unknown=True, kind="http")
    t = run.send(Resolve("x", "retry", by="jo", attempt=1, forced=True))
    resolved = [h for h in t.history if h.kind is HistoryKind.RESOLVED]
    assert [h.reason for h in resolved] == [
        "jo chose retry (forced: the server that held the attempt may still finish it)"
    ]
