"""The failover rule in the engine (DESIGN.md, "The rule, precisely"), example by example, and a
property over arbitrary interleavings of claims, results, crashes and operator decisions.

Each example checks the state, the decisions and the history (kinds and reasons) a transition
leaves: a flag or a restart must say which server held the attempt, since when, and which
attempt it was.

The property drives random definitions (sequences, conditions, parallels of restartable and
non-restartable activities, with or without a timeout and a retry policy; some restartable ones
are poison) through a model of a broker and a few workers: each dispatched message is delivered
(prefetched), claimed as a worker claims it, then run to a result (completed, failed with a known
or an unknown outcome, timed out), or stopped by its worker (its drain's deadline; its isolated
runner died, for a poison run alone; a cancel the worker heard of), or its worker crashes or
freezes (the broker redelivers the same message, naming the same attempt, to another worker; a
frozen worker may report later; a poison takes down the worker it runs on beside others);
messages are published twice, timers fire on time or for stale attempts, workers quarantine a
message delivered too often, operators resolve flags at random, and an instance may be
cancelled (the command reaching the scheduler first, or its broadcast reaching the workers
first: they then drop what they hold and stop what runs). At every transition it checks:

(a) a non-restartable attempt runs on one server at most, ever;
(b) a non-restartable activity gets a new attempt only from an operator's retry, after a
    failure with a known outcome it reported itself, or as a fresh message when nobody ever
    claimed it; never after a crash, a time-out, a drain's cut or an unknown outcome;
(c) every INTERRUPTED activity carries a Flag with a reason naming the attempt (and the holder),
    a restartable one only for its crash budget, and the instance is FLAGGED exactly while one
    is (never while CANCELLING);
(d) once the workers answer what they hold, timers fire and flags are resolved, the instance
    has ended: COMPLETED, FAILED or CANCELLED, never stuck CANCELLING;
(e) a result of a stale attempt, or for an ended activity or instance, changes only history;
(f) a step's attempts are dispatched and granted in order, one more each time, and new ones
    stay within the retry policy (failures), the crash budget (time-outs and crashes of its
    runner while it ran alone) and the operators' retries;
(g) `apply` never mutates the state it is given;
(h) once a cancel is recorded nothing is dispatched or granted; workers are told to stop
    (StopInstance) exactly when the cancel is recorded and something may sit with them, and a
    recorded cancel never changes;
(i) `interruptions` rise by one at a time, only for the activity's own time-out or a crash of
    its isolated runner: never for a worker's death (a claim), which records a crash that is not
    alone;
(j) CANCELLING is left only for CANCELLED;
(k) a crash_budget flag comes only from the activity's own runner crashes (a poison) or a
    worker's quarantine: a healthy neighbour is never flagged for a poison's crashes;
and what each event must do given the state it met (claims, deadlines, decisions, cancels,
stops).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from unit.partial_state import check_partial

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.definitions import Definition, parse_definition
from paceline_engine.events import (
    ActivityCompleted,
    ActivityFailed,
    ActivityStopped,
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
    StopCause,
    StopInstance,
)
from paceline_engine.machine import Transition, apply, new_instance
from paceline_engine.state import MAX_CRASHES_KEPT, Crash, Flag, InstanceState, outputs_of

Setup = Callable[["Run"], tuple[str, int]]
"""Brings a run to some situation; returns the step and attempt an event is then about."""

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)
GRACE = timedelta(seconds=Policy().deadline_grace_s)


def noop(step_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "noop", "with": {"v": step_id}, **extra}


def shell(step_id: str, **extra: Any) -> dict[str, Any]:
    """Not restartable: a shell command may have had its effect."""
    return {"id": step_id, "type": "shell.command", "with": {"argv": ["deploy", step_id]}, **extra}


def parse(*steps: dict[str, Any]) -> Definition:
    return parse_definition({"name": "t", "steps": list(steps)})


def dump(state: InstanceState) -> str:
    return json.dumps(state.model_dump(mode="json"), sort_keys=True)


@dataclass
class Run:
    """One instance driven event by event; every `send` checks that `apply` left the state it
    was given as it was."""

    definition: Definition
    policy: Policy | None = None
    state: InstanceState = field(default_factory=lambda: new_instance({}))
    now: datetime = T0
    last: Transition | None = None

    def send(self, event: Event) -> Transition:
        self.now += S
        before = dump(self.state)
        t = apply(self.definition, self.state, event, self.now, self.policy)
        assert dump(self.state) == before, "apply changed the state it was given"
        check_partial(self.definition, self.state, event, self.now, t, self.policy)
        self.state, self.last = t.state, t
        return t

    def start(self) -> Transition:
        return self.send(Start())

    def claim(
        self,
        step: str,
        server: str,
        attempt: int | None = None,
        *,
        redelivered: bool = False,
        delivery_count: int = 0,
        wants_reply: bool = True,
    ) -> Transition:
        attempt = self.attempt(step) if attempt is None else attempt
        at = self.now + S  # the moment `send` applies it
        return self.send(Claim(step, attempt, server, at, redelivered, delivery_count, wants_reply))

    def crash(
        self, step: str, to: str, attempt: int | None = None, deliveries: int = 1
    ) -> Transition:
        """The holder of `step` died: the broker hands its message to `to`."""
        return self.claim(step, to, attempt, redelivered=True, delivery_count=deliveries)

    def complete(
        self, step: str, output: Any = None, attempt: int | None = None, server: str = "w1"
    ) -> Transition:
        attempt = self.attempt(step) if attempt is None else attempt
        return self.send(ActivityCompleted(step, attempt, output, server, self.now, self.now))

    def fail(
        self,
        step: str,
        message: str = "boom",
        attempt: int | None = None,
        server: str = "w1",
        timed_out: bool = False,
        *,
        outcome_unknown: bool = False,
        kind: str | None = None,
    ) -> Transition:
        attempt = self.attempt(step) if attempt is None else attempt
        kind = kind or ("timeout" if timed_out else "adapter")
        error = ActivityError(kind=kind, message=message, outcome_unknown=outcome_unknown)
        return self.send(
            ActivityFailed(step, attempt, error, server, self.now, self.now, timed_out)
        )

    def stop(
        self,
        step: str,
        cause: StopCause,
        *,
        started: bool = True,
        attempt: int | None = None,
        server: str = "w1",
        by: str | None = None,
        message: str = "stopped",
    ) -> Transition:
        """The worker stopped the attempt; `started`: it had started (outcome unknown)."""
        attempt = self.attempt(step) if attempt is None else attempt
        error = ActivityError(kind=cause.value, message=message, outcome_unknown=started)
        return self.send(
            ActivityStopped(step, attempt, cause, error, server, self.now, self.now, by)
        )

    def cancel(self, reason: str = "not today", by: str = "bob") -> Transition:
        return self.send(Cancel(reason, by))

    def deadline(self, step: str, attempt: int | None = None) -> Transition:
        attempt = self.attempt(step) if attempt is None else attempt
        return self.send(DeadlineExpired(step, attempt))

    def resolve(
        self, step: str, action: Literal["retry", "skip", "fail"], output: Any = None
    ) -> Transition:
        return self.send(Resolve(step, action, output, by="alice"))

    def quarantine(self, step: str, deliveries: int = 4, server: str = "w9") -> Transition:
        return self.send(Quarantined(step, self.attempt(step), deliveries, server))

    def attempt(self, step: str) -> int:
        return self.state.activities[step].attempt if step in self.state.activities else 1

    def instance(self) -> InstanceStatus:
        return self.state.status

    def status(self, step: str) -> ActivityStatus:
        return self.state.activities[step].status


def kinds(t: Transition) -> list[HistoryKind]:
    return [h.kind for h in t.history]


def entry(t: Transition, kind: HistoryKind) -> HistoryEntry:
    (found,) = [h for h in t.history if h.kind is kind]
    return found


def dispatches(t: Transition) -> list[Dispatch]:
    return [d for d in t.decisions if isinstance(d, Dispatch)]


def same_decisions(t: Transition, *expected: Decision) -> None:
    """The decisions, in any order."""
    assert len(t.decisions) == len(expected), t.decisions
    for d in expected:
        assert d in t.decisions, (d, t.decisions)


def assert_only_recorded(before: InstanceState, t: Transition, *history: HistoryKind) -> None:
    """The state is as it was, nothing is decided, and the history says only this."""
    assert dump(t.state) == dump(before)
    assert [d for d in t.decisions if not isinstance(d, AnswerClaim)] == []
    assert t.changed_steps == frozenset()
    assert kinds(t) == list(history)


def flagged_shell(*more: dict[str, Any], timeout: str | None = None) -> Run:
    """`x` (a shell command) claimed by w1, whose message w2 then received: flagged."""
    extra = {"timeout": timeout} if timeout else {}
    run = Run(parse(shell("x", **extra), *more))
    run.start()
    run.claim("x", "w1")
    run.crash("x", "w2")
    assert run.status("x") is ActivityStatus.INTERRUPTED
    return run


def running(*steps: dict[str, Any], policy: Policy | None = None) -> Run:
    """`x` (first of `steps`, in a sequence) claimed by w1 and running."""
    run = Run(parse(*steps), policy)
    run.start()
    run.claim("x", "w1", wants_reply=True)
    assert run.status("x") is ActivityStatus.RUNNING
    return run


def assert_flag(
    run: Run, kind: str, attempt: int, server: str | None, since: datetime | None, step: str = "x"
) -> Flag:
    """`step` is flagged `kind` for `attempt`, which `server` held since `since`: its flag."""
    flag = run.state.activities[step].flag
    assert flag is not None
    assert (flag.kind, flag.attempt, flag.server_id, flag.held_since) == (
        kind,
        attempt,
        server,
        since,
    )
    return flag


def flag_now(run: Run, kind: str, reason: str, since: datetime) -> Flag:
    """The flag the last transition raised for attempt 1, which w1 held since `since`."""
    return Flag(
        kind=kind,
        reason=reason,
        attempt=1,
        server_id="w1",
        held_since=since,
        flagged_at=run.now,
    )


def property_settings(max_examples: int) -> settings:
    """The settings of the properties that drive a `Cluster` (`interleave`)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- claims -------------------------------------------------------------------------------------


def test_a_first_claim_is_granted_holds_the_attempt_and_sets_its_deadline() -> None:
    run = Run(parse(shell("x", timeout="1m")))
    run.start()
    t = run.claim("x", "w1")
    at = run.now
    same_decisions(t, AnswerClaim(True, 1, "granted"), SetDeadline("x", 1, at + 60 * S + GRACE))
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.claimed_by, x.claimed_at) == (
        ActivityStatus.RUNNING,
        1,
        "w1",
        at,
    )
    assert (x.server_id, x.started_at, x.flag, x.interruptions) == ("w1", at, None, 0)
    assert kinds(t) == [HistoryKind.CLAIMED]
    claimed = t.history[0]
    assert (claimed.step, claimed.attempt, claimed.data) == ("x", 1, {"server": "w1"})
    assert claimed.reason == "attempt 1 claimed by w1"
    assert t.changed_steps == {"x"}
    assert run.instance() is InstanceStatus.RUNNING


def test_the_deadline_allows_the_policys_grace() -> None:
    run = Run(parse(shell("x", timeout="30s")), Policy(deadline_grace_s=0.5))
    run.start()
    t = run.claim("x", "w1")
    assert SetDeadline("x", 1, run.now + 30.5 * S) in t.decisions


def test_a_start_notice_without_a_reply_holds_the_attempt_silently() -> None:
    """A restartable first delivery only tells the scheduler who runs it."""
    run = Run(parse(noop("x")))
    run.start()
    t = run.claim("x", "w1", wants_reply=False)
    assert t.decisions == []  # no reply wanted, and no timeout: no deadline either
    assert kinds(t) == [HistoryKind.CLAIMED]
    x = run.state.activities["x"]
    assert (x.status, x.claimed_by, x.claimed_at) == (ActivityStatus.RUNNING, "w1", run.now)


def test_a_redelivered_claim_of_an_attempt_never_claimed_is_granted() -> None:
    """It was only prefetched by the worker that died: it provably never began."""
    run = Run(parse(shell("x")))
    run.start()
    t = run.claim("x", "w2", redelivered=True, delivery_count=1)
    assert t.decisions == [AnswerClaim(True, 1, "granted")]
    assert kinds(t) == [HistoryKind.CLAIMED]
    assert "w2" in t.history[0].reason
    assert "never started" in t.history[0].reason
    assert run.state.activities["x"].claimed_by == "w2"
    assert run.state.activities["x"].interruptions == 0
    assert run.instance() is InstanceStatus.RUNNING


@pytest.mark.parametrize("redelivered", [False, True])
def test_a_claim_again_by_the_holder_is_granted_again_and_records_nothing(
    redelivered: bool,
) -> None:
    run = Run(parse(shell("x", timeout="1m")))
    run.start()
    run.claim("x", "w1")
    before = run.state
    t = run.claim("x", "w1", redelivered=redelivered, delivery_count=int(redelivered))
    assert t.decisions == [AnswerClaim(True, 1, "granted")]
    assert t.history == []
    assert dump(t.state) == dump(before)  # still held since the first claim
    assert t.changed_steps == frozenset()


@pytest.mark.parametrize("make", [noop, shell])
def test_a_duplicate_delivery_to_another_server_is_refused_and_flags_nothing(
    make: Callable[..., dict[str, Any]],
) -> None:
    run = Run(parse(make("x")))
    run.start()
    run.claim("x", "w1")
    before = run.state
    t = run.claim("x", "w2")
    assert_only_recorded(before, t, HistoryKind.CLAIM_REFUSED)
    (answer,) = t.decisions
    assert answer == AnswerClaim(False, 1, "attempt 1 is already claimed by w1")
    assert t.history[0].reason == "w2: attempt 1 is already claimed by w1 (a duplicate delivery)"
    assert (t.history[0].step, t.history[0].attempt) == ("x", 1)
    assert run.instance() is InstanceStatus.RUNNING


def test_a_non_restartable_attempt_redelivered_after_its_holder_died_is_flagged() -> None:
    run = Run(parse(shell("x", timeout="1m"), noop("after")))
    run.start()
    run.claim("x", "w1")
    since = run.now
    t = run.crash("x", "w2", deliveries=1)
    # Not run: refused, and nothing dispatched in its place.
    assert t.decisions == [AnswerClaim(False, 1, "flagged: it may have started elsewhere")]
    assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.FLAGGED]
    lost = (
        f"attempt 1 held by w1 since {since.isoformat(timespec='milliseconds')} "
        "was redelivered to w2 (delivery 2)"
    )
    redelivered = entry(t, HistoryKind.REDELIVERED)
    assert (redelivered.step, redelivered.attempt, redelivered.reason) == ("x", 1, lost)
    assert redelivered.data == {
        "server": "w1",
        "since": since.isoformat(timespec="milliseconds"),
        "to": "w2",
        "delivery": 2,
    }
    flagged = entry(t, HistoryKind.FLAGGED)
    reason = f"{lost}: it may have started, and it is not restartable"
    assert (flagged.step, flagged.attempt, flagged.reason) == ("x", 1, reason)
    assert flagged.data == {"flag": "redelivered"}
    x = run.state.activities["x"]
    assert x.status is ActivityStatus.INTERRUPTED
    assert x.flag == flag_now(run, "redelivered", reason, since)
    assert x.reason == reason
    assert (x.attempt, x.claimed_by, x.interruptions) == (1, "w1", 0)
    assert run.instance() is InstanceStatus.FLAGGED
    assert "after" not in run.state.activities
    assert t.changed_steps == {"x"}


def test_an_author_can_make_a_restartable_type_non_restartable() -> None:
    run = Run(parse(noop("x", restartable=False)))
    run.start()
    run.claim("x", "w1", wants_reply=True)
    t = run.crash("x", "w2")
    assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.FLAGGED]
    assert run.status("x") is ActivityStatus.INTERRUPTED


def test_a_restartable_attempt_redelivered_after_its_holder_died_runs_again() -> None:
    run = Run(parse(noop("x", timeout="30s"), noop("after")))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    since = run.now
    t = run.crash("x", "w2", deliveries=1)
    at = run.now
    # A new attempt held at once by w2, which runs it: no new message is dispatched.
    same_decisions(
        t,
        AnswerClaim(True, 2, "restarted as attempt 2"),
        SetDeadline("x", 2, at + 30 * S + GRACE),
    )
    assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.RESTARTED]
    redelivered = entry(t, HistoryKind.REDELIVERED)
    assert redelivered.reason == (
        f"attempt 1 held by w1 since {since.isoformat(timespec='milliseconds')} "
        "was redelivered to w2 (delivery 2)"
    )
    restarted = entry(t, HistoryKind.RESTARTED)
    assert (restarted.step, restarted.attempt) == ("x", 2)
    assert restarted.reason == (
        "restartable: running again as attempt 2 on w2 "
        "(a suspect of its worker's death: nothing charged)"
    )
    x = run.state.activities["x"]
    # A worker's death is charged to nobody: its first crash is only on the record.
    assert (x.status, x.attempt, x.interruptions, x.isolated) == (
        ActivityStatus.RUNNING,
        2,
        0,
        False,
    )
    assert x.crashes == [Crash(attempt=1, server_id="w1", since=since, detected_at=at, alone=False)]
    assert (x.claimed_by, x.claimed_at, x.server_id, x.started_at) == ("w2", at, "w2", at)
    assert x.flag is None
    assert run.instance() is InstanceStatus.RUNNING

    # w1 was alive after all: its result is late. w2's counts.
    before = run.state
    t = run.complete("x", "w1's", attempt=1, server="w1")
    assert_only_recorded(before, t, HistoryKind.LATE_RESULT)
    assert t.history[0].reason.startswith("attempt 1 completed on w1, late")
    t = run.complete("x", "w2's", attempt=2, server="w2")
    assert [d.step for d in dispatches(t)] == ["after"]
    assert run.state.activities["x"].output == "w2's"


def test_time_outs_are_charged_to_the_crash_budget_but_a_workers_death_is_not() -> None:
    run = Run(parse(noop("x", timeout="30s")))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    run.deadline("x")  # interruption 1: attempt 2
    run.claim("x", "w2", wants_reply=False)
    run.fail("x", "slow", server="w2", timed_out=True)  # interruption 2: attempt 3
    assert run.state.activities["x"].interruptions == 2
    run.claim("x", "w3", wants_reply=False)
    t = run.crash("x", "w4", deliveries=1)  # w3 died: a suspect, charged nothing
    assert AnswerClaim(True, 4, "restarted as attempt 4") in t.decisions
    assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.RESTARTED]
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.interruptions, x.flag) == (ActivityStatus.RUNNING, 4, 2, None)
    assert [(c.attempt, c.server_id, c.alone) for c in x.crashes] == [(3, "w3", False)]
    # The third time-out is the third interruption of 3: timed out for good.
    t = run.deadline("x")
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.interruptions) == (ActivityStatus.TIMED_OUT, 4, 3)
    assert x.reason == "timed out 3 times"
    assert run.instance() is InstanceStatus.FAILED


def test_a_crash_budget_of_one_flags_the_first_crash_of_an_isolated_runner() -> None:
    run = Run(parse(noop("x")), Policy(crash_budget=1))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    t = run.crash("x", "w2")  # a worker's death: never charged, whatever the budget
    assert t.decisions == [AnswerClaim(True, 2, "restarted as attempt 2")]
    run.crash("x", "w3", attempt=1, deliveries=2)  # a second death: it runs alone next
    assert (run.attempt("x"), run.state.activities["x"].isolated) == (3, True)
    assert run.state.activities["x"].interruptions == 0
    run.claim("x", "w4")
    t = run.stop("x", StopCause.RUNNER_CRASHED, server="w4", message="killed by signal 9")
    assert t.decisions == []
    flag = run.state.activities["x"].flag
    assert flag is not None
    assert (flag.kind, flag.attempt, flag.server_id) == ("crash_budget", 3, "w4")
    assert run.state.activities["x"].interruptions == 1
    assert run.instance() is InstanceStatus.FLAGGED


def _stale(run: Run) -> tuple[str, int]:
    run.fail("x")  # attempt 2 is dispatched
    return "x", 1


def _final_activity(run: Run) -> tuple[str, int]:
    run.complete("x")
    return "x", 1


def _final_instance(run: Run) -> tuple[str, int]:
    run.send(Cancel("stop"))
    return "x", 1


def _flagged(run: Run) -> tuple[str, int]:
    run.claim("x", "w1")
    run.crash("x", "w2")
    return "x", 1


def _never_dispatched(run: Run) -> tuple[str, int]:
    return "after", 1


@pytest.mark.parametrize(
    ("setup", "server", "because"),
    [
        (_stale, "w9", "attempt 1 is stale: the activity is at attempt 2"),
        (_final_activity, "w9", "the activity is COMPLETED"),
        (_final_instance, "w9", "the instance is CANCELLED"),
        (_flagged, "w3", "the activity is flagged, waiting for an operator"),
        (_flagged, "w1", "the activity is flagged, waiting for an operator"),
        (_never_dispatched, "w9", "no such activity was dispatched"),
    ],
)
@pytest.mark.parametrize("redelivered", [False, True])
def test_a_claim_that_cannot_be_run_is_refused(
    setup: Setup, server: str, because: str, redelivered: bool
) -> None:
    run = Run(parse(shell("x", retry={"max_attempts": 2}), noop("after")))
    run.start()
    step, attempt = setup(run)
    before = run.state
    t = run.claim(step, server, attempt, redelivered=redelivered, delivery_count=1)
    assert_only_recorded(before, t, HistoryKind.CLAIM_REFUSED)
    assert t.decisions == [AnswerClaim(False, attempt, because)]
    refused = t.history[0]
    assert (refused.step, refused.attempt, refused.reason) == (
        step,
        attempt,
        f"{server}: {because}",
    )


# --- results ------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", [_stale, _final_activity, _final_instance])
def test_a_start_notice_that_cannot_be_run_changes_nothing(setup: Setup) -> None:
    """A restartable first delivery runs whatever the answer (it asked for none): a notice
    for an attempt that has ended leaves everything as it was, and is not answered."""
    run = Run(parse(noop("x", retry={"max_attempts": 2}), noop("after")))
    run.start()
    step, attempt = setup(run)
    before = run.state
    t = run.claim(step, "w9", attempt, wants_reply=False)
    assert dump(t.state) == dump(before)
    assert t.decisions == []
    assert t.changed_steps == frozenset()


def test_a_result_of_the_current_attempt_counts_before_any_claim() -> None:
    run = Run(parse(noop("x"), noop("after")))
    run.start()
    t = run.complete("x", "done")
    assert run.status("x") is ActivityStatus.COMPLETED
    assert [d.step for d in dispatches(t)] == ["after"]
    assert kinds(t) == [HistoryKind.COMPLETED, HistoryKind.DISPATCHED]


def test_a_late_success_of_a_flagged_attempt_resolves_the_flag() -> None:
    run = flagged_shell(noop("after"))
    t = run.complete("x", {"ok": True}, attempt=1, server="w1")
    assert kinds(t) == [HistoryKind.RESOLVED, HistoryKind.COMPLETED, HistoryKind.DISPATCHED]
    resolved = entry(t, HistoryKind.RESOLVED)
    assert (resolved.step, resolved.attempt) == ("x", 1)
    assert "w1" in resolved.reason
    assert "the flag resolves itself" in resolved.reason
    x = run.state.activities["x"]
    assert (x.status, x.output, x.flag) == (ActivityStatus.COMPLETED, {"ok": True}, None)
    assert run.instance() is InstanceStatus.RUNNING
    assert [d.step for d in dispatches(t)] == ["after"]
    run.complete("after")
    assert run.instance() is InstanceStatus.COMPLETED


def test_a_late_failure_of_a_flagged_attempt_resolves_the_flag_and_is_retried() -> None:
    run = Run(parse(shell("x", retry={"max_attempts": 2, "backoff": "5s"})))
    run.start()
    run.claim("x", "w1")
    run.crash("x", "w2")
    t = run.fail("x", "exit 3", attempt=1)
    assert kinds(t) == [HistoryKind.RESOLVED, HistoryKind.FAILED, HistoryKind.RETRY]
    assert "the flag resolves itself" in t.history[0].reason
    assert t.decisions == [
        Dispatch("x", "shell.command", {"argv": ["deploy", "x"]}, 2, False, None, run.now + 5 * S)
    ]
    assert run.instance() is InstanceStatus.RUNNING
    assert run.state.activities["x"].flag is None
    # The last attempt fails for good.
    run.claim("x", "w3")
    t = run.fail("x", "exit 3 again", server="w3")
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert run.status("x") is ActivityStatus.FAILED


def test_the_instance_stays_flagged_while_another_activity_is_flagged() -> None:
    run = Run(parse({"id": "p", "parallel": [[shell("a")], [shell("b")]]}, noop("after")))
    run.start()
    for step in ("a", "b"):
        run.claim(step, "w1")
        run.crash(step, "w2")
    assert run.instance() is InstanceStatus.FLAGGED
    t = run.complete("a", attempt=1)
    assert kinds(t)[:2] == [HistoryKind.RESOLVED, HistoryKind.COMPLETED]
    assert run.status("a") is ActivityStatus.COMPLETED
    assert run.instance() is InstanceStatus.FLAGGED, "b is still flagged"
    assert dispatches(t) == []
    t = run.complete("b", attempt=1)
    assert run.instance() is InstanceStatus.RUNNING
    assert [d.step for d in dispatches(t)] == ["after"]


def test_a_result_of_another_attempt_of_a_flagged_activity_is_only_recorded() -> None:
    run = Run(parse(noop("x")), Policy(crash_budget=1))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    # The same message (attempt 1) takes two servers down; attempt 3 then runs alone.
    run.crash("x", "w2", attempt=1, deliveries=1)  # attempt 2 on w2
    run.crash("x", "w3", attempt=1, deliveries=2)  # attempt 3, isolated
    run.claim("x", "w3")
    run.stop("x", StopCause.RUNNER_CRASHED, server="w3")  # crash budget: flagged at attempt 3
    assert run.instance() is InstanceStatus.FLAGGED
    assert run.attempt("x") == 3
    before = run.state
    for attempt in (1, 2, 4):
        t = run.complete("x", attempt=attempt, server="w2")
        assert_only_recorded(before, t, HistoryKind.LATE_RESULT)
        assert (t.history[0].attempt, t.history[0].data) == (attempt, {"server": "w2"})
    assert_only_recorded(before, run.fail("x", attempt=2), HistoryKind.LATE_RESULT)
    assert_only_recorded(before, run.fail("x", attempt=1, timed_out=True), HistoryKind.LATE_RESULT)


@pytest.mark.parametrize("action", ["retry", "skip", "fail"])
def test_the_first_attempts_result_after_an_operator_decided_is_only_recorded(
    action: Literal["retry", "skip", "fail"],
) -> None:
    run = flagged_shell(noop("after"))
    run.resolve("x", action)
    before = run.state
    assert_only_recorded(before, run.complete("x", attempt=1), HistoryKind.LATE_RESULT)
    assert_only_recorded(before, run.fail("x", attempt=1), HistoryKind.LATE_RESULT)


# --- time-outs ----------------------------------------------------------------------------------


def test_a_time_out_of_a_non_restartable_attempt_flags_it() -> None:
    run = running(shell("x", retry={"max_attempts": 3}))
    since = run.now
    t = run.fail("x", "ran longer than its timeout", server="w1", timed_out=True)
    assert t.decisions == []  # not retried, whatever the retry policy says
    assert kinds(t) == [HistoryKind.FLAGGED]
    x = run.state.activities["x"]
    assert x.status is ActivityStatus.INTERRUPTED
    flag = assert_flag(run, "timeout", 1, "w1", since)
    assert flag.reason == (
        "attempt 1 on w1 timed out: timeout: ran longer than its timeout; "
        "it may have had its effect, and it is not restartable"
    )
    assert t.history[0].reason == flag.reason
    assert x.error == ActivityError(kind="timeout", message="ran longer than its timeout")
    assert (x.interruptions, x.failures) == (0, 0)
    assert run.instance() is InstanceStatus.FLAGGED


def test_a_deadline_of_a_running_non_restartable_attempt_flags_it() -> None:
    run = Run(parse(shell("x", timeout="1m")))
    run.start()
    run.claim("x", "w1")
    t = run.deadline("x")
    assert t.decisions == []
    assert kinds(t) == [HistoryKind.FLAGGED]
    x = run.state.activities["x"]
    assert x.flag is not None
    assert (x.flag.kind, x.flag.server_id, x.flag.attempt) == ("timeout", "w1", 1)
    assert x.flag.reason.startswith("attempt 1 on w1 sent no result within its timeout of 60s")
    assert run.instance() is InstanceStatus.FLAGGED


def test_a_deadline_of_a_running_restartable_attempt_dispatches_a_new_one() -> None:
    run = Run(parse(noop("x", timeout="30s", retry={"max_attempts": 1, "backoff": "9s"})))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    t = run.deadline("x")
    # At once (no backoff), though the retry policy allows a single attempt.
    assert t.decisions == [Dispatch("x", "noop", {"v": "x"}, 2, True, 30.0, None)]
    assert kinds(t) == [HistoryKind.TIMED_OUT, HistoryKind.RETRY]
    timed_out = entry(t, HistoryKind.TIMED_OUT)
    assert (timed_out.step, timed_out.attempt) == ("x", 1)
    assert timed_out.reason == "attempt 1 on w1 sent no result within its timeout of 30s"
    assert "1 of 3" in entry(t, HistoryKind.RETRY).reason
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.interruptions, x.claimed_by) == (
        ActivityStatus.SCHEDULED,
        2,
        1,
        None,
    )
    assert run.instance() is InstanceStatus.RUNNING


def test_time_outs_past_the_crash_budget_time_out_the_activity_and_fail_the_instance() -> None:
    run = Run(parse(noop("x", timeout="30s")), Policy(crash_budget=2))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    run.deadline("x")
    run.claim("x", "w2", wants_reply=False)
    t = run.deadline("x")
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert kinds(t) == [HistoryKind.TIMED_OUT, HistoryKind.INSTANCE_FAILED]
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.interruptions) == (ActivityStatus.TIMED_OUT, 2, 2)
    assert x.error is not None
    assert x.error.kind == "timeout"
    assert "attempt 2 on w2" in x.error.message
    assert run.instance() is InstanceStatus.FAILED
    assert run.state.error == x.error


def _scheduled(run: Run) -> tuple[str, int]:
    return "x", 1


def _restarted(run: Run) -> tuple[str, int]:
    run.claim("x", "w1", wants_reply=False)
    run.crash("x", "w2")
    return "x", 1


def _retried(run: Run) -> tuple[str, int]:
    run.claim("x", "w1", wants_reply=False)
    run.deadline("x")
    run.claim("x", "w2", wants_reply=False)
    return "x", 1


def _completed(run: Run) -> tuple[str, int]:
    run.claim("x", "w1", wants_reply=False)
    run.complete("x")
    return "x", 1


def _interrupted(run: Run) -> tuple[str, int]:
    run.claim("x", "w1", wants_reply=False)
    run.quarantine("x")
    return "x", 1


def _cancelled(run: Run) -> tuple[str, int]:
    run.claim("x", "w1", wants_reply=False)
    run.send(Cancel("stop"))
    run.stop("x", StopCause.CANCELLED, server="w1")  # w1 confirms: the instance is CANCELLED
    assert run.instance() is InstanceStatus.CANCELLED
    return "x", 1


@pytest.mark.parametrize(
    "setup",
    [_scheduled, _restarted, _retried, _completed, _interrupted, _cancelled, _never_dispatched],
)
def test_a_deadline_not_for_a_running_current_attempt_changes_nothing(setup: Setup) -> None:
    run = Run(parse(noop("x", timeout="30s"), noop("after")))
    run.start()
    step, attempt = setup(run)
    before = run.state
    t = run.deadline(step, attempt)
    assert_only_recorded(before, t)  # timers leave no trace
    assert t.decisions == []


def test_a_failure_after_a_time_out_still_gets_its_retries() -> None:
    """Time-outs count against the crash budget, not the retry policy: a step allowed two
    attempts on failure still gets its second one after a time-out."""
    run = Run(parse(noop("x", retry={"max_attempts": 2, "backoff": "3s"})))
    run.start()
    run.fail("x", "slow", timed_out=True)  # attempt 2, at once
    t = run.fail("x", "first failure")
    assert t.decisions == [Dispatch("x", "noop", {"v": "x"}, 3, True, None, run.now + 3 * S)]
    assert kinds(t) == [HistoryKind.FAILED, HistoryKind.RETRY]
    assert entry(t, HistoryKind.RETRY).reason.startswith("failure 1 of 2 allowed")
    x = run.state.activities["x"]
    assert (x.attempt, x.failures, x.interruptions) == (3, 1, 1)
    assert run.instance() is InstanceStatus.RUNNING
    t = run.fail("x", "second failure")
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert run.state.activities["x"].reason == "failed 2 time(s)"


def test_failures_survive_an_operators_retry() -> None:
    """The retry policy counts failures however the attempts came: an operator's retry after
    a flag does not give the step a fresh policy, nor take one attempt of it away."""
    run = Run(parse(shell("x", retry={"max_attempts": 2})))
    run.start()
    run.claim("x", "w1")
    run.fail("x", "exit 1")  # failure 1 of 2: attempt 2
    run.claim("x", "w2")
    run.crash("x", "w3")  # flagged at attempt 2
    run.resolve("x", "retry")  # attempt 3
    assert (run.attempt("x"), run.state.activities["x"].failures) == (3, 1)
    run.claim("x", "w4")
    t = run.fail("x", "exit 1 again", server="w4")
    assert t.decisions == [Finish(InstanceStatus.FAILED)]


def test_a_deadline_of_a_step_without_a_timeout_changes_nothing() -> None:
    """No timer is ever set for such a step: one arriving (a stray command) is ignored."""
    run = Run(parse(noop("x")))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    before = run.state
    t = run.deadline("x")
    assert_only_recorded(before, t)
    assert t.decisions == []


# --- quarantine ---------------------------------------------------------------------------------


def test_a_quarantined_delivery_flags_the_activity() -> None:
    run = Run(parse(noop("x"), noop("after")))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    since = run.now
    t = run.quarantine("x", deliveries=4, server="w3")
    assert t.decisions == []
    assert kinds(t) == [HistoryKind.FLAGGED]
    x = run.state.activities["x"]
    assert x.status is ActivityStatus.INTERRUPTED
    flag = assert_flag(run, "crash_budget", 1, "w1", since)
    assert "delivered 4 times" in flag.reason
    assert "quarantined by w3" in flag.reason
    assert t.history[0].reason == flag.reason
    assert run.instance() is InstanceStatus.FLAGGED


def test_a_quarantined_delivery_never_claimed_is_flagged_with_no_holder() -> None:
    run = Run(parse(noop("x")))
    run.start()
    run.quarantine("x")
    x = run.state.activities["x"]
    assert x.flag is not None
    assert (x.flag.kind, x.flag.server_id, x.flag.held_since) == ("crash_budget", None, None)
    assert run.instance() is InstanceStatus.FLAGGED


def test_a_quarantine_of_a_stale_attempts_message_changes_nothing() -> None:
    """w1 ran attempt 1 and published its failure, then died before its ack: the broker keeps
    redelivering attempt 1's message until a worker quarantines it. Attempt 2 runs on w2."""
    run = Run(parse(noop("x", retry={"max_attempts": 2})))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    run.fail("x", server="w1")  # attempt 2 is dispatched
    run.claim("x", "w2", wants_reply=False)
    before = run.state
    t = run.send(Quarantined("x", 1, 4, "w9"))
    assert_only_recorded(before, t, HistoryKind.IGNORED)
    assert t.decisions == []
    assert t.history[0].reason == "quarantine of attempt 1 ignored: the activity is at attempt 2"
    # A restart keeps the message: its quarantine flags the attempt it became.
    run.crash("x", "w3", attempt=2)  # w2 died: attempt 3 on w3, from attempt 2's message
    t = run.send(Quarantined("x", 2, 4, "w9"))
    assert kinds(t) == [HistoryKind.FLAGGED]
    assert run.state.activities["x"].flag is not None
    assert run.state.activities["x"].flag.attempt == 3


@pytest.mark.parametrize("setup", [_interrupted, _completed, _cancelled])
def test_a_quarantine_of_a_flagged_or_ended_activity_changes_nothing(setup: Setup) -> None:
    run = Run(parse(noop("x", timeout="30s"), noop("after")))
    run.start()
    setup(run)
    before = run.state
    t = run.quarantine("x")
    assert dump(t.state) == dump(before)
    assert t.decisions == []
    assert set(kinds(t)) <= {HistoryKind.IGNORED}


# --- operator decisions -------------------------------------------------------------------------


def test_retry_runs_a_flagged_activity_again_as_a_new_attempt() -> None:
    run = flagged_shell(timeout="1m")
    t = run.resolve("x", "retry")
    assert t.decisions == [
        Dispatch("x", "shell.command", {"argv": ["deploy", "x"]}, 2, False, 60.0, None)
    ]
    assert kinds(t) == [HistoryKind.RESOLVED, HistoryKind.DISPATCHED]
    resolved = t.history[0]
    assert (resolved.step, resolved.attempt, resolved.reason, resolved.data) == (
        "x",
        1,
        "alice chose retry",
        {"action": "retry"},
    )
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.flag, x.claimed_by) == (ActivityStatus.SCHEDULED, 2, None, None)
    assert run.instance() is InstanceStatus.RUNNING
    # The new attempt is claimed afresh; the old one stays refused.
    assert run.claim("x", "w3").decisions[-1] == AnswerClaim(True, 2, "granted")
    refused = run.claim("x", "w2", attempt=1, redelivered=True, delivery_count=1)
    assert refused.decisions == [
        AnswerClaim(False, 1, "attempt 1 is stale: the activity is at attempt 2")
    ]
    run.complete("x", attempt=2, server="w3")
    assert run.instance() is InstanceStatus.COMPLETED


def test_interruptions_survive_a_new_dispatch_but_an_operator_retry_resets_them() -> None:
    run = Run(parse(noop("x", timeout="30s")))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    run.deadline("x")
    assert run.state.activities["x"].interruptions == 1  # after a time-out's new attempt
    run.claim("x", "w2", wants_reply=False)
    run.quarantine("x")
    run.resolve("x", "retry")
    # The operator took responsibility for running it again: a fresh crash budget.
    assert (run.attempt("x"), run.state.activities["x"].interruptions) == (3, 0)
    run.claim("x", "w3", wants_reply=False)
    run.deadline("x")
    assert (run.attempt("x"), run.state.activities["x"].interruptions) == (4, 1)


def test_skip_completes_a_flagged_activity_with_the_operators_output() -> None:
    run = flagged_shell({"id": "after", "type": "noop", "with": {"got": "${steps.x.output.rows}"}})
    t = run.resolve("x", "skip", {"rows": 7})
    assert kinds(t) == [HistoryKind.RESOLVED, HistoryKind.DISPATCHED]
    assert t.history[0].reason == "alice chose skip"
    x = run.state.activities["x"]
    assert (x.status, x.output, x.flag) == (ActivityStatus.SKIPPED, {"rows": 7}, None)
    assert x.reason == "skipped by alice"
    assert t.decisions == [Dispatch("after", "noop", {"got": 7}, 1, True, None, None)]
    assert run.instance() is InstanceStatus.RUNNING
    run.complete("after", {"got": 7})
    assert run.instance() is InstanceStatus.COMPLETED
    assert outputs_of(run.state.activities) == {"x": {"rows": 7}, "after": {"got": 7}}


def test_skip_without_an_output_gives_an_empty_object() -> None:
    run = flagged_shell({"id": "after", "type": "noop", "with": {"got": "${steps.x.output}"}})
    t = run.resolve("x", "skip")
    assert run.state.activities["x"].output == {}
    assert dispatches(t)[0].params == {"got": {}}


def test_fail_fails_a_flagged_activity_and_the_instance() -> None:
    run = flagged_shell(noop("after"))
    t = run.resolve("x", "fail")
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert kinds(t) == [HistoryKind.RESOLVED, HistoryKind.INSTANCE_FAILED]
    x = run.state.activities["x"]
    assert (x.status, x.flag) == (ActivityStatus.FAILED, None)
    assert x.error == ActivityError(kind="operator", message="failed by alice")
    assert run.instance() is InstanceStatus.FAILED
    assert run.state.error == x.error
    assert "after" not in run.state.activities


def test_a_decision_on_one_flag_leaves_the_instance_flagged_for_the_other() -> None:
    run = Run(parse({"id": "p", "parallel": [[shell("a"), noop("a2")], [shell("b")]]}))
    run.start()
    for step in ("a", "b"):
        run.claim(step, "w1")
        run.crash(step, "w2")
    t = run.resolve("a", "skip")
    assert run.instance() is InstanceStatus.FLAGGED
    assert [d.step for d in dispatches(t)] == ["a2"], "a's branch goes on"
    run.resolve("b", "retry")
    assert run.instance() is InstanceStatus.RUNNING


@pytest.mark.parametrize(
    "setup", [_scheduled, _restarted, _completed, _cancelled, _never_dispatched]
)
@pytest.mark.parametrize("action", ["retry", "skip", "fail"])
def test_a_decision_on_an_activity_not_flagged_is_ignored(
    setup: Setup, action: Literal["retry", "skip", "fail"]
) -> None:
    run = Run(parse(noop("x", timeout="30s"), noop("after")))
    run.start()
    step, _ = setup(run)
    before = run.state
    t = run.resolve(step, action)
    assert_only_recorded(before, t, HistoryKind.IGNORED)
    assert t.decisions == []
    assert f"alice's {action} ignored" in t.history[0].reason


def test_a_decision_names_the_flagged_attempt_it_is_for() -> None:
    run = flagged_shell(noop("after"))
    before = run.state
    t = run.send(Resolve("x", "skip", {"n": 1}, by="alice", attempt=2))
    assert_only_recorded(before, t, HistoryKind.IGNORED)
    assert t.history[0].reason == (
        "alice's skip ignored: the activity is flagged at attempt 1, not 2"
    )
    assert (t.history[0].step, t.history[0].attempt) == ("x", 2)
    t = run.send(Resolve("x", "skip", {"n": 1}, by="alice", attempt=1))
    assert kinds(t)[0] is HistoryKind.RESOLVED
    assert run.status("x") is ActivityStatus.SKIPPED


def test_cancel_ends_a_flagged_instance() -> None:
    run = flagged_shell(noop("after"))
    t = run.send(Cancel("not today"))
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    assert kinds(t) == [HistoryKind.INSTANCE_CANCELLED]
    x = run.state.activities["x"]
    assert (x.status, x.flag) == (ActivityStatus.CANCELLED, None)
    assert run.instance() is InstanceStatus.CANCELLED
    before = run.state
    assert_only_recorded(before, run.resolve("x", "retry"), HistoryKind.IGNORED)
    assert_only_recorded(before, run.complete("x", attempt=1), HistoryKind.LATE_RESULT)


def test_a_restarted_attempt_whose_server_dies_too_runs_alone() -> None:
    """A restart runs a new attempt under the old message: when that server dies too, the
    broker redelivers the same message, which still names the first attempt. The activity has
    now been there at two deaths: it runs next alone, in an isolated runner, charged nothing."""
    run = Run(parse(noop("x")))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    first = run.now
    run.crash("x", "w2", deliveries=1)  # w1 died: w2 runs attempt 2, from attempt 1's message
    since = run.now
    # w2 dies too: the broker hands the same message (attempt 1) to w3.
    t = run.crash("x", "w3", attempt=1, deliveries=2)
    reason = (
        "a suspect: 2 workers died while it ran; running alone, in an isolated runner, as attempt 3"
    )
    assert t.decisions == [
        AnswerClaim(False, 1, f"moved to isolation: {reason}"),
        Dispatch("x", "noop", {"v": "x"}, 3, True, None, None, isolated=True),
    ]
    assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.ISOLATED]
    assert entry(t, HistoryKind.REDELIVERED).reason == (
        f"attempt 2 held by w2 since {since.isoformat(timespec='milliseconds')} "
        "was redelivered to w3 (delivery 3)"
    )
    isolated = entry(t, HistoryKind.ISOLATED)
    assert (isolated.step, isolated.attempt, isolated.reason) == ("x", 3, reason)
    assert isolated.data == {"restartable": True, "isolated": True}
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.claimed_by, x.isolated, x.interruptions) == (
        ActivityStatus.SCHEDULED,
        3,
        None,
        True,
        0,
    )
    assert [(c.attempt, c.server_id, c.since, c.alone) for c in x.crashes] == [
        (1, "w1", first, False),
        (2, "w2", since, False),
    ]
    # w3 asks again under the message's attempt (its reply was lost): the message is stale now.
    before = run.state
    t = run.claim("x", "w3", attempt=1, redelivered=True, delivery_count=2)
    assert_only_recorded(before, t, HistoryKind.CLAIM_REFUSED)
    assert t.decisions == [
        AnswerClaim(False, 1, "attempt 1 is stale: the activity is at attempt 3")
    ]
    # The isolated attempt is claimed afresh, alone, and its result counts.
    t = run.claim("x", "w4")
    assert t.decisions == [AnswerClaim(True, 3, "granted")]
    assert t.history[0].reason == "attempt 3 claimed by w4 alone, in an isolated runner"
    run.complete("x", attempt=3, server="w4")
    assert run.instance() is InstanceStatus.COMPLETED


# --- the property: arbitrary interleavings of results, crashes, stops and cancels ---------------

ACTIVITY_KINDS: list[tuple[str, bool | None]] = [
    ("noop", None),
    ("sleep", None),
    ("shell.command", None),
    ("noop", False),
    ("sleep", False),
    ("shell.command", True),
]
"""(type, the author's `restartable`): restartable by default or not, and overridden both ways."""

FLAG_KINDS = {"redelivered", "timeout", "crash_budget", "outcome_unknown", "drain_deadline"}


@dataclass(frozen=True)
class Spec:
    restartable: bool
    timeout_s: float | None
    max_attempts: int
    preds: frozenset[str]
    """The activities before it in its sequences (and the parallels they join): each must be
    done before it is dispatched, if it ran at all (a condition's untaken branch did not)."""
    poison: bool = False
    """A restartable activity that crashes its runner when it runs alone (the model sends
    `RUNNER_CRASHED` for no other): the others are healthy."""


class Builder:
    """Draws a random definition: sequences, conditions (on a literal or on an earlier
    output) and parallel steps, of restartable and non-restartable activities."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.budget = draw(st.integers(1, 7))
        self.specs: dict[str, Spec] = {}
        self.count = 0

    def sequence(self, depth: int, visible: frozenset[str]) -> tuple[list[Any], frozenset[str]]:
        steps: list[Any] = []
        for i in range(self.draw(st.integers(1, 3))):
            if i and self.count >= self.budget:
                break
            step, visible = self.step(depth, visible)
            steps.append(step)
        return steps, visible

    def step(self, depth: int, visible: frozenset[str]) -> tuple[dict[str, Any], frozenset[str]]:
        self.count += 1
        step_id = f"s{self.count}"
        kinds = ["activity", "activity"]
        if depth < 2 and self.count < self.budget:
            kinds += ["condition", "parallel"]
        kind = self.draw(st.sampled_from(kinds))
        if kind == "condition":
            k = self.draw(st.integers(0, 2))
            sources = ["true", "false", *(f"steps.{v}.output.v == {k}" for v in sorted(visible))]
            raw: dict[str, Any] = {"id": step_id, "if": self.draw(st.sampled_from(sources))}
            raw["then"], after = self.sequence(depth + 1, visible)
            if self.draw(st.booleans()):
                raw["else"], other = self.sequence(depth + 1, visible)
                after |= other
            return raw, after
        if kind == "parallel":
            branches, after = [], visible
            for _ in range(self.draw(st.integers(1, 3))):
                branch, seen = self.sequence(depth + 1, visible)
                branches.append(branch)
                after |= seen
            return {"id": step_id, "parallel": branches}, after
        type_name, override = self.draw(st.sampled_from(ACTIVITY_KINDS))
        params = {
            "noop": {"v": step_id},
            "sleep": {"seconds": 0},
            "shell.command": {"argv": ["run", step_id]},
        }[type_name]
        raw = {"id": step_id, "type": type_name, "with": params}
        if override is not None:
            raw["restartable"] = override
        timeout = self.draw(st.sampled_from([None, 30.0]))
        if timeout is not None:
            raw["timeout"] = timeout
        max_attempts = self.draw(st.sampled_from([1, 1, 2, 3]))
        if max_attempts > 1:
            raw["retry"] = {"max_attempts": max_attempts, "backoff": "1s"}
        restartable = type_name != "shell.command" if override is None else override
        poison = restartable and self.draw(st.integers(0, 2)) == 0
        self.specs[step_id] = Spec(restartable, timeout, max_attempts, visible, poison)
        return raw, visible | {step_id}


@st.composite
def failover_definitions(draw: st.DrawFn) -> tuple[Definition, dict[str, Spec]]:
    builder = Builder(draw)
    steps, _ = builder.sequence(0, frozenset())
    return parse_definition({"name": "random", "steps": steps}), builder.specs


@dataclass
class Message:
    """An activity message in the broker: the attempt it was dispatched as never changes."""

    step: str
    attempt: int
    restartable: bool
    delivery_count: int = 0
    isolated: bool = False


@dataclass
class Work:
    """A message in a worker's hands: prefetched (`attempt` None), then running as `attempt`."""

    message: Message
    server: str
    attempt: int | None = None


DONE = (ActivityStatus.COMPLETED, ActivityStatus.SKIPPED)
ACTIONS: list[Literal["retry", "skip", "fail"]] = ["retry", "skip", "fail"]
CANCELLER = "alice"


@dataclass
class Cluster:
    """The scheduler (this test, calling `apply`), a broker and a few workers that crash,
    freeze, receive duplicates, report late, run suspects alone, drain, and hear of cancels
    (sometimes before the scheduler does); every transition is checked."""

    definition: Definition
    specs: dict[str, Spec]
    policy: Policy
    quarantine_at: int
    """A worker quarantines a message delivered this many times before (its own setting)."""
    state: InstanceState = field(default_factory=lambda: new_instance({}))
    now: datetime = T0
    queue: list[Message] = field(default_factory=list)
    held: list[Work] = field(default_factory=list)
    zombies: list[Work] = field(default_factory=list)
    """Runs of frozen workers: their messages went back to the broker; they may still report."""
    live: list[str] = field(default_factory=lambda: ["w1", "w2", "w3"])
    servers: int = 3
    published: list[Message] = field(default_factory=list)
    deadlines: list[SetDeadline] = field(default_factory=list)
    ran: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    """(step, attempt) -> the servers that started running it."""
    top: dict[str, int] = field(default_factory=dict)
    """Step -> the highest attempt dispatched or granted."""
    new_attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    """(step, cause) -> attempts after the first, by cause: failure, interruption (a time-out
    or a crash of its runner), restart, isolation, refresh, drain, operator."""
    interruptions: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    """Step -> failures it reported for a current attempt that its retry policy counts."""
    message_attempt: dict[str, int] = field(default_factory=dict)
    """Step -> the attempt its latest message names (a restart keeps the message)."""
    sent_before: dict[str, int] = field(default_factory=dict)
    """`message_attempt` as it was before the transition being checked."""
    finished: Finish | None = None
    may_cancel: bool = True
    focus: str = "mixed"
    """What the chaos favours: `crashes` (poison activities take their workers and runners
    down), `cancels`, or a mix."""
    heard: str | None = None
    """Workers heard that the instance is cancelled (by whom): they drop its messages and stop
    what of it they run."""
    pending_cancel: str | None = None
    """A cancel broadcast reached the workers; its command has not reached the scheduler yet."""
    events: int = 0
    seen: dict[str, int] = field(default_factory=dict)
    """What happened, for the statistics."""

    def saw(self, what: str, n: int = 1) -> None:
        self.seen[what] = self.seen.get(what, 0) + n

    def statistics(self, *seen: str) -> None:
        """For Hypothesis' statistics: how the instance ended, and how often each of `seen`
        happened (3+ for three or more)."""
        event(f"ended {self.state.status.value}")
        for what in seen:
            n = self.seen.get(what, 0)
            event(f"{what}: {n if n < 3 else '3+'}")

    # --- sending and checking --------------------------------------------------------------

    def send(self, event: Event) -> Transition:
        self.now += S
        self.events += 1
        before = self.state
        snapshot = dump(before)
        t = apply(self.definition, before, event, self.now, self.policy)
        # (g) apply never mutates its input.
        assert dump(before) == snapshot, "apply mutated the state it was given"
        check_partial(self.definition, before, event, self.now, t, self.policy)
        self.state = t.state
        self.check(event, before, t)
        return t

    def check(self, event: Event, before: InstanceState, t: Transition) -> None:
        state = t.state
        self.check_activities(event, before, state)
        self.check_status(before, state)
        for h in t.history:
            self.saw(h.kind.value)

        # The messages going round when the event came (a dispatch below sends a new one).
        self.sent_before = dict(self.message_attempt)
        answers = [d for d in t.decisions if isinstance(d, AnswerClaim)]
        if isinstance(event, Claim) and event.wants_reply:
            assert len(answers) == 1, t.decisions
        else:
            assert answers == [], (event, t.decisions)
        if self.finished is not None:
            # Nothing is decided after the instance finished, but refusals.
            assert all(isinstance(d, AnswerClaim) and not d.granted for d in t.decisions)
        if state.cancel is not None:
            # (h) nothing is dispatched or granted once a cancel is recorded.
            assert not any(isinstance(d, Dispatch) for d in t.decisions), t.decisions
            assert not any(isinstance(d, AnswerClaim) and d.granted for d in t.decisions)
        stops = [d for d in t.decisions if isinstance(d, StopInstance)]
        if before.cancel is None and state.cancel is not None:
            # The cancel is recorded now: workers are told whenever they may hold something.
            may_hold = any(
                a.status in (ActivityStatus.SCHEDULED, ActivityStatus.RUNNING)
                for a in before.activities.values()
            )
            assert stops == ([StopInstance(state.cancel.by)] if may_hold else []), t.decisions
        else:
            assert stops == []
            assert state.cancel == before.cancel, "a recorded cancel never changes"
        for d in t.decisions:
            if isinstance(d, Finish):
                assert self.finished is None
                assert d.status is state.status
                assert state.status.is_final
                assert all(a.status.is_final for a in state.activities.values())
                if d.status is InstanceStatus.COMPLETED:
                    assert all(a.status in DONE for a in state.activities.values())
                assert (d.status is InstanceStatus.CANCELLED) is (state.cancel is not None)
                self.finished = d
            elif isinstance(d, Dispatch):
                self.check_dispatch(event, before, t, d)
            elif isinstance(d, SetDeadline):
                self.check_deadline(event, before, state, d)
            elif isinstance(d, StopInstance):
                self.heard = self.heard or d.by
            elif isinstance(d, AnswerClaim) and d.granted:
                assert isinstance(event, Claim)
                self.check_grant(event, d, before)

        self.check_event(event, before, t)

    def check_activities(self, event: Event, before: InstanceState, state: InstanceState) -> None:
        for step, a in state.activities.items():
            b = before.activities.get(step)
            # (c) a flagged activity carries its flag, naming the attempt and its holder.
            if a.status is ActivityStatus.INTERRUPTED:
                assert a.flag is not None, step
                assert a.flag.kind in FLAG_KINDS, a.flag
                assert a.flag.attempt == a.attempt
                assert f"attempt {a.attempt}" in a.flag.reason, a.flag.reason
                assert a.flag.server_id is None or a.flag.server_id in a.flag.reason
                # A restartable activity is flagged only when it exhausted its crash budget.
                assert not a.restartable or a.flag.kind == "crash_budget", a.flag
                if a.flag.kind == "crash_budget" and (b is None or b.flag != a.flag):
                    # (k) charged to its own crashes alone, or quarantined by a worker's
                    # backstop: a healthy activity is never flagged for its neighbours' crashes.
                    if isinstance(event, ActivityStopped):
                        assert event.cause is StopCause.RUNNER_CRASHED
                        assert self.specs[step].poison, (step, a.flag)
                        assert a.interruptions >= self.policy.crash_budget
                    else:
                        assert isinstance(event, Quarantined), (event, a.flag)
            else:
                assert a.flag is None, (step, a)
            # Interruptions survive new dispatches: they never go down, except that an
            # operator's retry starts a fresh crash budget.
            operator_retry = (
                isinstance(event, Resolve)
                and event.step == step
                and event.action == "retry"
                and b is not None
                and a.attempt > b.attempt
            )
            if operator_retry:
                assert a.interruptions == 0
            else:
                assert a.interruptions >= self.interruptions.get(step, 0)
            if b is not None and a.interruptions > b.interruptions:
                # (i) charged only to its own time-out or to a crash of its runner, one each.
                assert a.interruptions == b.interruptions + 1
                assert getattr(event, "step", None) == step, event
                assert isinstance(event, ActivityFailed | DeadlineExpired | ActivityStopped)
                if isinstance(event, ActivityFailed):
                    assert event.timed_out
                if isinstance(event, ActivityStopped):
                    assert event.cause is StopCause.RUNNER_CRASHED
            self.interruptions[step] = a.interruptions
            if b is not None and a.crashes != b.crashes:
                # A crash is recorded when a worker died holding it (a suspect: charged
                # nothing) or its isolated runner died (charged).
                crash = a.crashes[-1]
                assert crash.detected_at == self.now
                assert [*b.crashes, crash][-MAX_CRASHES_KEPT:] == a.crashes
                if isinstance(event, Claim):
                    assert not crash.alone
                    assert a.interruptions == b.interruptions
                else:
                    assert isinstance(event, ActivityStopped), event
                    assert event.cause is StopCause.RUNNER_CRASHED
                    assert crash.alone

    def check_status(self, before: InstanceState, state: InstanceState) -> None:
        interrupted = any(a.status is ActivityStatus.INTERRUPTED for a in state.activities.values())
        if state.status.is_final:
            assert not interrupted
        elif state.status is InstanceStatus.CANCELLING:
            assert state.cancel is not None
            assert not interrupted
            assert any(a.status is ActivityStatus.RUNNING for a in state.activities.values())
            assert not any(a.status is ActivityStatus.SCHEDULED for a in state.activities.values())
        elif state.status is not InstanceStatus.PENDING:
            assert state.cancel is None
            assert (state.status is InstanceStatus.FLAGGED) is interrupted, state.status
        if before.status is InstanceStatus.CANCELLING:
            # (j) CANCELLING is left only to CANCELLED.
            assert state.status in (InstanceStatus.CANCELLING, InstanceStatus.CANCELLED)
        if before.status.is_final:
            assert state.status is before.status

    def check_deadline(
        self, event: Event, before: InstanceState, state: InstanceState, d: SetDeadline
    ) -> None:
        if isinstance(event, Claim):
            spec = self.specs[d.step]
            assert spec.timeout_s is not None
            assert d.at == event.at + timedelta(
                seconds=spec.timeout_s + self.policy.deadline_grace_s
            )
            assert d.attempt == state.activities[d.step].attempt
        else:
            # A cancel's grace, for each activity that ran when it was recorded.
            assert before.cancel is None
            assert state.status is InstanceStatus.CANCELLING
            assert d.at == self.now + timedelta(seconds=self.policy.cancel_grace_s)
            b = before.activities[d.step]
            assert (b.status, b.attempt) == (ActivityStatus.RUNNING, d.attempt)
        self.deadlines.append(d)

    def check_event(self, event: Event, before: InstanceState, t: Transition) -> None:
        """What each kind of event must do, given the state it met."""
        state = t.state
        if isinstance(event, Claim):
            self.check_claim(event, before, t)
        elif isinstance(event, Quarantined):
            self.check_quarantine(event, before, t)
        elif isinstance(event, DeadlineExpired):
            a = before.activities.get(event.step)
            if (
                a is None
                or a.attempt != event.attempt
                or a.status is not ActivityStatus.RUNNING
                or before.status.is_final
                or (
                    self.specs[event.step].timeout_s is None  # no timer was set: a stray one
                    and before.status is not InstanceStatus.CANCELLING
                )
            ):
                assert_only_recorded(before, t)  # timers leave no trace
                assert t.decisions == []
                return
            after = state.activities[event.step]
            if before.status is InstanceStatus.CANCELLING:
                # Its worker never confirmed the stop: recorded as cancelled.
                assert after.status is ActivityStatus.CANCELLED
                assert "did not confirm" in (after.reason or "")
            elif not a.restartable:
                assert after.status is ActivityStatus.INTERRUPTED
                assert after.flag is not None
                assert after.flag.kind == "timeout"
            elif a.interruptions + 1 < self.policy.crash_budget:
                assert (after.attempt, after.status) == (a.attempt + 1, ActivityStatus.SCHEDULED)
                assert after.isolated is a.isolated
            else:
                assert after.status is ActivityStatus.TIMED_OUT
                assert state.status is InstanceStatus.FAILED
        elif isinstance(event, Resolve):
            a = before.activities.get(event.step)
            if a is None or a.status is not ActivityStatus.INTERRUPTED or before.status.is_final:
                assert_only_recorded(before, t, HistoryKind.IGNORED)
                assert t.decisions == []
                return
            assert kinds(t)[0] is HistoryKind.RESOLVED
            after = state.activities[event.step]
            assert after.flag is None
            if event.action == "retry":
                assert (after.attempt, after.status) == (a.attempt + 1, ActivityStatus.SCHEDULED)
                assert after.interruptions == 0, "the operator's retry gets a fresh crash budget"
                # A restartable activity with crashes on its record runs alone.
                assert after.isolated is (a.restartable and bool(a.crashes))
            elif event.action == "skip":
                assert after.status is ActivityStatus.SKIPPED
                assert after.output == ({} if event.output is None else event.output)
            else:
                assert after.status is ActivityStatus.FAILED
                assert after.error is not None
                assert after.error.kind == "operator"
                assert state.status is InstanceStatus.FAILED
                assert state.error == after.error
        elif isinstance(event, Cancel):
            self.check_cancel(event, before, t)
        elif isinstance(event, ActivityStopped):
            self.check_stop(event, before, t)
        elif isinstance(event, ActivityCompleted | ActivityFailed):
            self.check_result(event, before, t)

    def check_result(
        self, event: ActivityCompleted | ActivityFailed, before: InstanceState, t: Transition
    ) -> None:
        state = t.state
        if self.current(before, event.step, event.attempt):
            assert dump(state) != dump(before)
            assert event.step in t.changed_steps
            a = before.activities[event.step]
            after = state.activities[event.step]
            if a.status is ActivityStatus.INTERRUPTED:
                # A late result of the flagged attempt: the flag resolves itself.
                assert kinds(t)[0] is HistoryKind.RESOLVED
                assert "resolves itself" in t.history[0].reason
            if before.status is InstanceStatus.CANCELLING:
                # Its ending is recorded; nothing runs again.
                self.saw("result while cancelling")
                assert after.attempt == a.attempt
                assert after.status in (
                    ActivityStatus.COMPLETED,
                    ActivityStatus.FAILED,
                    ActivityStatus.TIMED_OUT,
                )
                assert after.failures == a.failures
                return
            if isinstance(event, ActivityFailed) and not event.timed_out:
                if event.error.outcome_unknown and not a.restartable:
                    # Outcome unknown: flagged, and the retry policy is not touched.
                    assert after.status is ActivityStatus.INTERRUPTED
                    assert after.flag is not None
                    assert after.flag.kind == "outcome_unknown"
                    assert after.failures == a.failures
                    return
                # The retry policy counts failures, whatever else ended earlier attempts.
                failures = self.failures[event.step] = self.failures.get(event.step, 0) + 1
                assert after.failures == failures
                if failures < self.specs[event.step].max_attempts:
                    assert (after.attempt, after.status) == (
                        event.attempt + 1,
                        ActivityStatus.SCHEDULED,
                    )
                else:
                    assert after.status is ActivityStatus.FAILED
                    assert state.status is InstanceStatus.FAILED
        else:
            # (e) a result of a stale attempt (or for an ended activity or instance) changes
            # nothing but the history.
            assert dump(state) == dump(before)
            assert t.decisions == []
            assert kinds(t) in ([HistoryKind.LATE_RESULT], [HistoryKind.IGNORED]), t.history

    def check_cancel(self, event: Cancel, before: InstanceState, t: Transition) -> None:
        state = t.state
        if before.status.is_final or before.cancel is not None:
            assert_only_recorded(before, t, HistoryKind.IGNORED)
            if before.cancel is not None:
                assert f"{before.cancel.by} asked first" in t.history[0].reason
            return
        assert state.cancel is not None
        assert state.cancel.by == event.by
        running = {s for s, a in before.activities.items() if a.status is ActivityStatus.RUNNING}
        for step, b in before.activities.items():
            after = state.activities[step]
            if b.status in (ActivityStatus.SCHEDULED, ActivityStatus.INTERRUPTED):
                assert (after.status, after.flag) == (ActivityStatus.CANCELLED, None)
            elif b.status is ActivityStatus.RUNNING:
                assert after.status is ActivityStatus.RUNNING
            else:
                assert after.status is b.status
        if running:
            assert state.status is InstanceStatus.CANCELLING
            assert kinds(t) == [HistoryKind.INSTANCE_CANCELLING]
            deadlines = {d.step for d in t.decisions if isinstance(d, SetDeadline)}
            assert deadlines == running
            assert not any(isinstance(d, Finish) for d in t.decisions)
        else:
            assert state.status is InstanceStatus.CANCELLED
            assert t.decisions[-1] == Finish(InstanceStatus.CANCELLED)
            assert kinds(t) == [HistoryKind.INSTANCE_CANCELLED]
            assert event.by in t.history[0].reason

    def check_stop(self, event: ActivityStopped, before: InstanceState, t: Transition) -> None:
        state = t.state
        a = before.activities.get(event.step)
        if (
            event.cause is StopCause.CANCELLED
            and a is not None
            and a.attempt == event.attempt
            and a.status is ActivityStatus.CANCELLED
        ):
            # Cancelled before it started (or while flagged): the worker's stop is noted, and
            # its word that the attempt had started replaces what the activity said.
            if event.error.outcome_unknown and not (a.error and a.error.outcome_unknown):
                after = state.activities[event.step]
                assert after.error == event.error and after.status is ActivityStatus.CANCELLED
                assert kinds(t) == [HistoryKind.CANCELLED]
                assert t.decisions == []
            else:
                assert_only_recorded(before, t, HistoryKind.CANCELLED)
            return
        if not self.current(before, event.step, event.attempt):
            assert_only_recorded(before, t, HistoryKind.LATE_RESULT)
            return
        assert a is not None
        after = state.activities[event.step]
        if before.status is InstanceStatus.CANCELLING or event.cause is StopCause.CANCELLED:
            assert after.status is ActivityStatus.CANCELLED
            assert state.cancel is not None
            if before.cancel is None:
                # The worker heard of the cancel first: its stop records it.
                assert state.cancel.by == event.cancelled_by
            if a.status is ActivityStatus.RUNNING:
                # Started, by the stopping worker's word; or held by another, which may have.
                lost = a.claimed_by not in (None, event.server_id)
                unknown = (event.error.outcome_unknown or lost) and not a.restartable
                assert ("outcome unknown" in (after.reason or "")) is unknown, after.reason
            return
        if event.cause is StopCause.DRAIN_DEADLINE:
            # The operator's doing, not the activity's: nothing is charged.
            assert after.interruptions == a.interruptions
            if a.restartable:
                assert (after.attempt, after.status) == (a.attempt + 1, ActivityStatus.SCHEDULED)
                assert after.isolated is a.isolated
            else:
                assert after.flag is not None
                assert after.flag.kind == "drain_deadline"
            return
        # Its isolated runner died: charged to it alone.
        assert after.interruptions == a.interruptions + 1
        assert after.crashes[-1].alone
        if not a.restartable:
            assert after.flag is not None
            assert after.flag.kind == "outcome_unknown"
        elif after.interruptions < self.policy.crash_budget:
            assert (after.attempt, after.status, after.isolated) == (
                a.attempt + 1,
                ActivityStatus.SCHEDULED,
                True,
            )
        else:
            assert after.flag is not None
            assert after.flag.kind == "crash_budget"

    def check_quarantine(self, event: Quarantined, before: InstanceState, t: Transition) -> None:
        a = before.activities.get(event.step)
        if a is None or a.status.is_final or before.status.is_final:
            assert_only_recorded(before, t, HistoryKind.IGNORED)
        elif a.status is ActivityStatus.INTERRUPTED:
            assert dump(t.state) == dump(before)  # flagged already
            assert set(kinds(t)) <= {HistoryKind.IGNORED}
        elif event.attempt not in (a.attempt, self.sent_before[event.step]):
            # A copy of an older attempt's message: the attempt running now crashed nothing.
            assert_only_recorded(before, t, HistoryKind.IGNORED)
        elif before.status is InstanceStatus.CANCELLING:
            assert t.state.activities[event.step].status is ActivityStatus.CANCELLED
        else:
            assert kinds(t) == [HistoryKind.FLAGGED]
            flag = t.state.activities[event.step].flag
            assert flag is not None
            assert (flag.kind, flag.attempt) == ("crash_budget", a.attempt)
            assert f"delivered {event.deliveries} times" in flag.reason
        assert [d for d in t.decisions if not isinstance(d, Finish)] == []

    def check_claim(self, claim: Claim, before: InstanceState, t: Transition) -> None:
        state = t.state
        answers = [d for d in t.decisions if isinstance(d, AnswerClaim)]
        granted = [d for d in answers if d.granted]
        new = [d for d in t.decisions if isinstance(d, Dispatch)]
        a = before.activities.get(claim.step)
        if (
            a is None
            or before.status.is_final
            or a.status.is_final
            or a.status is ActivityStatus.INTERRUPTED
            or claim.attempt not in (a.attempt, self.sent_before[claim.step])
        ):
            # Nothing to run: refused, and only recorded (a start notice needs no answer).
            assert granted == []
            assert dump(state) == dump(before)
            assert [d for d in t.decisions if not isinstance(d, AnswerClaim)] == []
            refused = [HistoryKind.CLAIM_REFUSED]
            assert kinds(t) == refused or (not claim.wants_reply and kinds(t) == [])
            return
        deadlines = [d for d in t.decisions if isinstance(d, SetDeadline)]
        timed = self.specs[claim.step].timeout_s is not None
        after = state.activities[claim.step]
        lost = (
            a.status is ActivityStatus.RUNNING
            and a.claimed_by not in (None, claim.server_id)
            and claim.redelivered
            and claim.delivery_count > a.claim_delivery
        )
        too_often = claim.delivery_count + 1 >= self.policy.refresh_after_deliveries
        if before.status is InstanceStatus.CANCELLING:
            # Nothing starts once a cancel is recorded; a lost holder has stopped, one way or
            # another.
            assert granted == []
            assert new == []
            if lost:
                assert kinds(t)[:2] == [HistoryKind.REDELIVERED, HistoryKind.CANCELLED]
                assert after.status is ActivityStatus.CANCELLED
            else:
                assert dump(state) == dump(before)
                assert kinds(t) in ([HistoryKind.CLAIM_REFUSED], [])
            return
        if a.claimed_by == claim.server_id and a.status is ActivityStatus.RUNNING:
            # Asked again by the holder: the same answer, nothing new.
            assert [d.attempt for d in granted] == [a.attempt] or not claim.wants_reply
            assert dump(state) == dump(before)
            assert (t.history, deadlines) == ([], [])
        elif a.claimed_by is None:
            if too_often:
                # Delivered too often: refused, and re-sent as a fresh message.
                assert (granted, kinds(t)) == ([], [HistoryKind.RETRY])
                assert [(d.attempt, d.isolated) for d in new] == [(a.attempt + 1, a.isolated)]
            else:
                assert kinds(t) == [HistoryKind.CLAIMED]
                assert len(deadlines) == int(timed)
                assert after.claimed_by == claim.server_id
        elif not lost:
            # A duplicate delivery, or an older one: the holder has it.
            assert granted == []
            assert dump(state) == dump(before)
            assert kinds(t) == [HistoryKind.CLAIM_REFUSED]
        else:
            # Its holder is gone: a suspect, charged nothing; the record says who held it.
            assert kinds(t)[0] is HistoryKind.REDELIVERED
            assert a.claimed_by in t.history[0].reason
            assert after.interruptions == a.interruptions
            assert (after.crashes[-1].server_id, after.crashes[-1].alone) == (a.claimed_by, False)
            if not a.restartable:
                assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.FLAGGED]
                assert after.flag is not None
                assert after.flag.kind == "redelivered"
                assert (granted, new) == ([], [])
            elif a.isolated or a.crashes:
                # An earlier crash on its record, or lost while alone: it runs alone next.
                assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.ISOLATED]
                assert granted == []
                assert [(d.attempt, d.isolated) for d in new] == [(a.attempt + 1, True)]
            elif too_often:
                assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.RETRY]
                assert granted == []
                assert [(d.attempt, d.isolated) for d in new] == [(a.attempt + 1, False)]
            else:
                assert kinds(t) == [HistoryKind.REDELIVERED, HistoryKind.RESTARTED]
                assert [d.attempt for d in granted] == [a.attempt + 1]
                assert len(deadlines) == int(timed)

    @staticmethod
    def current(state: InstanceState, step: str, attempt: int) -> bool:
        a = state.activities.get(step)
        return (
            a is not None
            and a.attempt == attempt
            and not a.status.is_final
            and not state.status.is_final
        )

    def new_attempt(self, step: str, attempt: int, cause: str) -> None:
        # (f) attempts of a step come in order, one more each time, within the budgets.
        top = self.top.get(step, 0)
        assert attempt == top + 1, (step, top, attempt)
        self.top[step] = attempt
        if attempt == 1:
            return
        key = (step, cause)
        self.new_attempts[key] = self.new_attempts.get(key, 0) + 1
        if cause == "operator":
            # The operator's retry starts a fresh crash budget.
            self.new_attempts[(step, "interruption")] = 0
        assert self.new_attempts.get((step, "failure"), 0) <= self.specs[step].max_attempts - 1
        assert self.new_attempts.get((step, "interruption"), 0) <= self.policy.crash_budget - 1

    def check_dispatch(
        self, event: Event, before: InstanceState, t: Transition, d: Dispatch
    ) -> None:
        spec = self.specs[d.step]
        assert (d.restartable, d.timeout_s) == (spec.restartable, spec.timeout_s)
        b = before.activities.get(d.step)
        if d.attempt > 1:
            # A new attempt answers an event about that very step.
            assert b is not None
            assert getattr(event, "step", None) == d.step, event
        if d.attempt == 1:
            cause = "first"
            for pred in spec.preds & set(self.state.activities):
                assert self.state.activities[pred].status in DONE, (d.step, pred)
            assert not d.isolated
        elif isinstance(event, Resolve):
            assert event.action == "retry", event
            cause = "operator"
        elif isinstance(event, ActivityFailed) and not event.timed_out:
            # A failure the step's retry policy repeats: its outcome is known, or it is
            # restartable.
            assert spec.restartable or not event.error.outcome_unknown, event
            cause = "failure"
            assert not d.isolated
        elif isinstance(event, ActivityFailed | DeadlineExpired):
            cause = "interruption"  # a time-out
            assert b is not None
            assert d.isolated is b.isolated
        elif isinstance(event, ActivityStopped):
            assert event.cause is not StopCause.CANCELLED
            assert spec.restartable
            if event.cause is StopCause.RUNNER_CRASHED:
                cause = "interruption"
                assert d.isolated
            else:
                cause = "drain"
                assert b is not None
                assert d.isolated is b.isolated
        else:
            assert isinstance(event, Claim), event
            assert b is not None
            if HistoryKind.ISOLATED in kinds(t):
                cause = "isolation"
                assert spec.restartable
                assert d.isolated
            else:
                assert d.isolated is b.isolated
                cause = "refresh"
                assert event.delivery_count + 1 >= self.policy.refresh_after_deliveries
                # A non-restartable message is re-sent only when nobody ever claimed it.
                assert spec.restartable or b.claimed_by is None, (d, b)
        if not spec.restartable:
            # (b) a non-restartable activity runs again only when an operator says so, after
            # a failure with a known outcome, or re-sent before anyone claimed it; never after
            # a crash, a time-out, a drain or an unknown outcome.
            assert cause in ("first", "operator", "failure", "refresh"), (d, event)
        self.new_attempt(d.step, d.attempt, cause)
        message = Message(d.step, d.attempt, d.restartable, isolated=d.isolated)
        self.message_attempt[d.step] = d.attempt
        self.queue.append(message)
        self.published.append(message)

    def check_grant(self, claim: Claim, answer: AnswerClaim, before: InstanceState) -> None:
        a = self.state.activities[claim.step]
        assert (a.attempt, a.status, a.claimed_by) == (
            answer.attempt,
            ActivityStatus.RUNNING,
            claim.server_id,
        )
        if answer.attempt != before.activities[claim.step].attempt:
            # A restart: only of a restartable activity whose holder is gone.
            assert claim.redelivered
            assert self.specs[claim.step].restartable
            self.new_attempt(claim.step, answer.attempt, "restart")
        # (f) a grant is always for the step's latest attempt, so grants come in order.
        assert answer.attempt == self.top[claim.step] >= claim.attempt

    # --- what the workers and the broker do ------------------------------------------------

    def server(self, exclude: Message | None = None) -> list[str]:
        busy = {
            w.server
            for w in self.held
            if exclude is not None
            and (w.message.step, w.message.attempt) == (exclude.step, exclude.attempt)
        }
        return [s for s in self.live if s not in busy]

    def deliver(self, message: Message, server: str) -> None:
        self.queue.remove(message)
        if message.delivery_count >= self.quarantine_at:
            # A poison message: the worker tells the scheduler and dead-letters it.
            self.send(
                Quarantined(message.step, message.attempt, message.delivery_count + 1, server)
            )
            return
        self.held.append(Work(message, server))

    def drop(self, work: Work, *, report: bool) -> None:
        """The worker heard of the cancel: it never starts what it holds (it may say so)."""
        self.held.remove(work)
        if report:
            self.stop(work, StopCause.CANCELLED, work.message.attempt, started=False)

    def claim(self, work: Work, *, reply_lost: bool = False) -> None:
        m = work.message
        redelivered = m.delivery_count > 0
        wants_reply = redelivered or not m.restartable or m.isolated
        at = self.now + S
        claim = Claim(
            m.step, m.attempt, work.server, at, redelivered, m.delivery_count, wants_reply
        )
        t = self.send(claim)
        if wants_reply:
            (answer,) = [d for d in t.decisions if isinstance(d, AnswerClaim)]
            if answer.granted and reply_lost:
                # The worker asks again (a claim is idempotent for its server): the same answer.
                again = self.send(claim)
                assert again.decisions == [AnswerClaim(True, answer.attempt, "granted")]
                assert again.history == []
                assert dump(again.state) == dump(t.state)
            if not answer.granted:
                self.held.remove(work)  # not run: acked
                return
            attempt = answer.attempt
        else:
            attempt = m.attempt  # a start notice: the worker runs it whatever the answer
        work.attempt = attempt
        servers = self.ran.setdefault((m.step, attempt), set())
        servers.add(work.server)
        if not self.specs[m.step].restartable:
            # (a) never silently run twice: one server per non-restartable attempt, ever.
            assert len(servers) == 1, (m.step, attempt, servers)

    def stop(self, work: Work, cause: StopCause, attempt: int, *, started: bool) -> None:
        error = ActivityError(kind=cause.value, message=cause.value, outcome_unknown=started)
        by = self.heard if cause is StopCause.CANCELLED else None
        self.send(
            ActivityStopped(
                work.message.step, attempt, cause, error, work.server, self.now, self.now, by
            )
        )

    def report(self, work: Work, outcome: str) -> None:
        assert work.attempt is not None
        step, attempt = work.message.step, work.attempt
        self.saw(f"outcome {outcome}")
        if outcome == "completed":
            output = {"v": self.events % 3}
            self.send(ActivityCompleted(step, attempt, output, work.server, self.now, self.now))
            return
        stops = {
            "stopped": StopCause.CANCELLED,
            "drained": StopCause.DRAIN_DEADLINE,
            "runner crashed": StopCause.RUNNER_CRASHED,
        }
        if outcome in stops:
            self.stop(work, stops[outcome], attempt, started=True)
            return
        error = ActivityError(
            kind=outcome,
            message=f"{step} attempt {attempt} on {work.server}",
            outcome_unknown=outcome in ("unknown", "timeout"),
        )
        timed_out = outcome == "timeout"
        self.send(ActivityFailed(step, attempt, error, work.server, self.now, self.now, timed_out))

    def outcomes(self, work: Work, *, chaos: bool) -> list[str]:
        """What a worker may report of a run."""
        stop = ["stopped"] * 3 if self.heard else []
        if not chaos:
            # A worker told to stop stops, or had just ended (its result crossed the cancel).
            return [*stop, "completed", "failed"] if stop else ["completed"]
        outcomes = ["completed", "completed", "failed", "unknown", "timeout", "drained", *stop]
        if self.focus == "crashes":
            outcomes = ["completed", "completed", "completed", "timeout", "drained"]
        if work.message.isolated and self.specs[work.message.step].poison:
            outcomes += ["runner crashed"] * (9 if self.focus == "crashes" else 3)
        return outcomes

    def lose(self, server: str, *, frozen: bool) -> None:
        """A server dies (or is cut off): the broker requeues what it held, redelivered."""
        self.live.remove(server)
        self.saw("frozen" if frozen else "crashed")
        for work in [w for w in self.held if w.server == server]:
            self.held.remove(work)
            m = work.message
            self.queue.append(
                Message(m.step, m.attempt, m.restartable, m.delivery_count + 1, m.isolated)
            )
            if frozen and work.attempt is not None:
                self.zombies.append(work)
        while len(self.live) < 2:
            self.servers += 1
            self.live.append(f"w{self.servers}")

    def flagged(self) -> list[str]:
        return sorted(
            s for s, a in self.state.activities.items() if a.status is ActivityStatus.INTERRUPTED
        )

    # --- one random turn -------------------------------------------------------------------

    def turn(self, data: st.DataObject, *, chaos: bool) -> bool:
        """One event (or broker move) drawn at random; False when nothing is left to do."""
        running = [w for w in self.held if w.attempt is not None]
        prefetched = [w for w in self.held if w.attempt is None]
        options: list[str] = []
        if self.queue:
            options += ["deliver"] * 3
        if prefetched:
            options += ["claim"] * 3
        if running:
            options += ["result"] * 2
        if self.zombies:
            options.append("late")
        if self.flagged():
            options += ["resolve"] * (1 if chaos else 5)
        if self.pending_cancel and not chaos:
            options.append("cancel")  # the command reaches the scheduler in the end
        if chaos:
            crashable = sorted({w.server for w in self.held})
            if crashable:
                options += ["crash", "crash", "freeze"]
            # A poison activity takes its worker down when it runs beside others.
            poisoned_steps = {
                w.message.step
                for w in running
                if self.specs[w.message.step].poison and not w.message.isolated
            }
            poisoned = sorted(
                {w.server for w in running if w.message.step in poisoned_steps}
                - {w.server for w in running if w.message.isolated}
            )
            if poisoned:
                options += ["poison"] * (9 if self.focus == "crashes" else 3)
            if self.focus != "crashes":
                if self.published and self.seen.get("duplicate", 0) < 3:
                    options.append("duplicate")
                options += ["deadline", "noise"]
            if self.may_cancel and not self.state.status.is_final:
                if self.state.cancel is not None:
                    options.append("cancel")  # asked again: only recorded
                else:
                    options += ["cancel"] * (1 + 2 * bool(self.flagged()))
                    if self.focus == "cancels" and running:
                        options += ["cancel"] * 3
        elif not options and self.deadlines:
            options.append("deadline")
        if not options:
            return False
        what = data.draw(st.sampled_from(options), label="turn")
        if what == "deliver":
            message = data.draw(st.sampled_from(self.queue), label="message")
            servers = self.server(exclude=message)
            if servers:
                self.deliver(message, data.draw(st.sampled_from(servers), label="to"))
        elif what == "claim":
            work = data.draw(st.sampled_from(prefetched), label="claimer")
            # A worker that heard of the cancel drops what it has not started (its claim may
            # have been on its way already).
            if self.heard and (not chaos or data.draw(st.booleans(), label="heard in time")):
                self.drop(work, report=data.draw(st.booleans(), label="says so"))
            else:
                lost = chaos and data.draw(st.integers(0, 4), label="lost") == 0
                self.claim(work, reply_lost=lost)
        elif what == "result":
            work = data.draw(st.sampled_from(running), label="reporter")
            if chaos and self.focus == "crashes" and work.message.step in poisoned_steps:
                # Beside others, a poison activity never ends: it takes its worker down.
                self.lose(work.server, frozen=False)
                return True
            outcome = data.draw(st.sampled_from(self.outcomes(work, chaos=chaos)), label="outcome")
            self.held.remove(work)
            self.report(work, outcome)
        elif what == "late":
            work = data.draw(st.sampled_from(self.zombies), label="zombie")
            self.zombies.remove(work)
            self.saw("frozen worker reported")
            outcome = data.draw(st.sampled_from(self.outcomes(work, chaos=chaos)), label="late")
            self.report(work, outcome)
        elif what == "resolve":
            step = data.draw(st.sampled_from(self.flagged()), label="flagged")
            action = data.draw(st.sampled_from(ACTIONS), label="action")
            output = data.draw(st.sampled_from([None, {"v": 0}, {"v": 1}]), label="output")
            self.send(Resolve(step, action, output, by="op"))
        elif what in ("crash", "freeze"):
            server = data.draw(st.sampled_from(crashable), label=what)
            self.lose(server, frozen=what == "freeze")
        elif what == "poison":
            self.lose(data.draw(st.sampled_from(poisoned), label="poisoned"), frozen=False)
        elif what == "duplicate":
            # The outbox relay published a message twice (it crashed before marking it sent).
            m = data.draw(st.sampled_from(self.published), label="duplicate of")
            self.queue.append(Message(m.step, m.attempt, m.restartable, isolated=m.isolated))
            self.saw("duplicate")
        elif what == "deadline":
            if len(self.deadlines) > 0 and data.draw(st.integers(0, 3), label="set") > 0:
                d = data.draw(st.sampled_from(self.deadlines), label="deadline")
                self.deadlines.remove(d)
                self.send(DeadlineExpired(d.step, d.attempt))
            else:
                # A timer for another attempt, one that fired twice, or a stray one.
                step = data.draw(st.sampled_from(sorted(self.specs)), label="any step")
                self.send(DeadlineExpired(step, data.draw(st.integers(1, 4), label="attempt")))
        elif what == "noise":
            self.noise(data)
        else:
            self.cancel(data, chaos=chaos)
        return True

    def cancel(self, data: st.DataObject, *, chaos: bool) -> None:
        """An operator cancels: the command reaches the scheduler, or its broadcast reaches
        the workers first (the command follows)."""
        if self.pending_cancel is not None:
            by, self.pending_cancel = self.pending_cancel, None
            self.send(Cancel("random cancel", by=by))
            return
        if chaos and self.heard is None and data.draw(st.booleans(), label="heard first"):
            self.heard = self.pending_cancel = CANCELLER
            self.saw("cancel heard first")
            return
        self.send(Cancel("random cancel", by=CANCELLER))

    def noise(self, data: st.DataObject) -> None:
        """An operator decision on something not flagged, or a quarantine of a stale copy."""
        step = data.draw(st.sampled_from(sorted(self.specs)), label="noise step")
        if step not in self.flagged():
            before = self.state
            t = self.send(Resolve(step, "retry", None, by="op"))
            assert_only_recorded(before, t, HistoryKind.IGNORED)


def interleave(
    generated: tuple[Definition, dict[str, Spec]],
    data: st.DataObject,
    focus: str | None = None,
    may_cancel: bool | None = None,
) -> Cluster:
    definition, specs = generated
    policy = Policy(
        crash_budget=data.draw(st.sampled_from([1, 2, 3, 3, 4]), label="crash budget"),
        deadline_grace_s=data.draw(st.sampled_from([0.0, 10.0]), label="grace"),
        cancel_grace_s=data.draw(st.sampled_from([0.0, 30.0]), label="cancel grace"),
        refresh_after_deliveries=data.draw(st.sampled_from([2, 3, 5]), label="refresh after"),
    )
    quarantine_at = data.draw(st.integers(2, 6), label="quarantine at")
    c = Cluster(definition, specs, policy, quarantine_at)
    c.focus = focus or data.draw(st.sampled_from(["mixed", "crashes", "cancels"]), label="focus")
    if may_cancel is None:
        may_cancel = c.focus == "cancels" or data.draw(st.integers(0, 2), label="may cancel") == 0
    c.may_cancel = may_cancel
    c.send(Start())
    least = 30 if c.focus == "crashes" else 0
    for _ in range(data.draw(st.integers(least, 100), label="chaotic turns")):
        if not c.turn(data, chaos=True):
            break
    # (d) once the workers answer what they hold (a cancel's stops included), its timers fire
    # and operators resolve every flag, the instance ends: nothing is lost, nothing is stuck
    # CANCELLING.
    for _ in range(500):
        if c.state.status.is_final or not c.turn(data, chaos=False):
            break
    assert c.state.status.is_final, (c.state.status, c.state.activities, c.queue, c.held)
    assert c.finished == Finish(c.state.status)
    return c


@property_settings(250)
@given(generated=failover_definitions(), data=st.data())
def test_any_interleaving_of_results_crashes_stops_cancels_and_decisions(
    generated: tuple[Definition, dict[str, Spec]], data: st.DataObject
) -> None:
    """Properties (a) to (k) of the module docstring."""
    c = interleave(generated, data)
    c.statistics(
        "flagged",
        "restarted",
        "isolated",
        "resolved",
        "late_result",
        "claim_refused",
        "crashed",
        "frozen",
        "frozen worker reported",
        "duplicate",
        "activity_timed_out",
        "activity_interrupted",
        "activity_cancelled",
        "instance_cancelling",
        "cancel heard first",
        "outcome unknown",
        "outcome stopped",
        "outcome drained",
        "outcome runner crashed",
    )
    flags = {a.flag.kind for a in c.state.activities.values() if a.flag is not None}
    event(f"flag kinds at the end: {sorted(flags)}")


def test_a_late_claim_of_an_older_delivery_is_refused_not_restarted() -> None:
    """Found by `make chaos`: w2's claim (delivery 2) reached the scheduler after w3's claim
    of delivery 3 (w2 was frozen, then killed). Restarting for w2 would have handed the attempt
    to a dead worker while w3's copy was acked as late: the activity was lost."""
    run = Run(parse(noop("x")))
    run.start()
    run.claim("x", "w1", wants_reply=False)
    run.crash("x", "w3", deliveries=2)  # w3 holds delivery 3, as attempt 2
    before = dump(run.state)
    t = run.crash("x", "w2", attempt=1, deliveries=1)  # delivery 2, late
    assert t.decisions == [AnswerClaim(False, 1, "attempt 1 is already claimed by w3")]
    assert kinds(t) == [HistoryKind.CLAIM_REFUSED]
    assert "delivery 2 is older than the holder's 3" in t.history[0].reason
    after = dump(run.state)
    assert after == before, "nothing but history changes"
    assert (run.attempt("x"), run.state.activities["x"].claimed_by) == (2, "w3")
