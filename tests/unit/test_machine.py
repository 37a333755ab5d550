"""The engine's pure state machine, example by example: `apply(definition, state, event, now)`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from unit.partial_state import check_partial

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.definitions import Definition, parse_definition
from paceline_engine.events import (
    ActivityCompleted,
    ActivityFailed,
    Cancel,
    Dispatch,
    Event,
    Finish,
    HistoryKind,
    Start,
    StopInstance,
)
from paceline_engine.machine import Transition, apply, new_instance
from paceline_engine.state import CancelRequest, InstanceState, outputs_of

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def noop(step_id: str, **params: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "noop", "with": params}


def parse(*steps: dict[str, Any], inputs: dict[str, Any] | None = None) -> Definition:
    return parse_definition({"name": "t", "inputs": inputs or {}, "steps": list(steps)})


def dump(state: InstanceState) -> str:
    return json.dumps(state.model_dump(mode="json"), sort_keys=True)


@dataclass
class Run:
    """One instance driven event by event; checks at every step that `apply` left the state it
    was given exactly as it was."""

    definition: Definition
    state: InstanceState
    now: datetime = T0
    last: Transition | None = None
    transitions: list[Transition] = field(default_factory=list)

    @classmethod
    def of(cls, definition: Definition, inputs: dict[str, Any] | None = None) -> Run:
        return cls(definition, new_instance(inputs or {}))

    def send(self, event: Event) -> Transition:
        self.now += timedelta(seconds=1)
        before = dump(self.state)
        t = apply(self.definition, self.state, event, self.now)
        assert dump(self.state) == before, "apply changed the state it was given"
        check_partial(self.definition, self.state, event, self.now, t)
        self.state, self.last = t.state, t
        self.transitions.append(t)
        return t

    def start(self) -> Transition:
        return self.send(Start())

    def complete(self, step: str, output: Any = None, attempt: int | None = None) -> Transition:
        attempt = self.attempt(step) if attempt is None else attempt
        return self.send(
            ActivityCompleted(
                step, attempt, output, "w1", self.now, self.now + timedelta(seconds=1)
            )
        )

    def fail(
        self,
        step: str,
        message: str = "boom",
        attempt: int | None = None,
        timed_out: bool = False,
        kind: str = "adapter",
    ) -> Transition:
        attempt = self.attempt(step) if attempt is None else attempt
        error = ActivityError(kind=kind, message=message)
        return self.send(
            ActivityFailed(step, attempt, error, "w2", self.now, self.now, timed_out=timed_out)
        )

    def cancel(self, reason: str = "by an operator") -> Transition:
        return self.send(Cancel(reason))

    def attempt(self, step: str) -> int:
        return self.state.activities[step].attempt

    def status(self, step: str) -> ActivityStatus:
        return self.state.activities[step].status


def dispatches(t: Transition) -> list[Dispatch]:
    return [d for d in t.decisions if isinstance(d, Dispatch)]


def dispatched(t: Transition) -> list[str]:
    return [d.step for d in dispatches(t)]


def kinds(t: Transition) -> list[HistoryKind]:
    return [h.kind for h in t.history]


def assert_nothing_changed(before: InstanceState, t: Transition, kind: HistoryKind) -> None:
    """A result that must not count: the same state, no decision, one history entry."""
    assert dump(t.state) == dump(before)
    assert t.decisions == []
    assert t.changed_steps == frozenset()
    assert kinds(t) == [kind]


# --- sequences and outputs ----------------------------------------------------------------------


def test_a_sequence_dispatches_one_step_at_a_time_in_order() -> None:
    run = Run.of(parse(noop("a", n=1), noop("b", n=2), noop("c", n=3)))
    t = run.start()
    assert run.state.status is InstanceStatus.RUNNING
    assert run.state.started_at == run.now
    assert t.decisions == [Dispatch("a", "noop", {"n": 1}, 1, True, None, None)]
    assert kinds(t) == [HistoryKind.STARTED, HistoryKind.DISPATCHED]
    assert run.status("a") is ActivityStatus.SCHEDULED
    assert set(run.state.activities) == {"a"}

    t = run.complete("a", {"n": 1})
    assert dispatched(t) == ["b"]
    assert t.changed_steps == {"a", "b"}
    assert run.status("a") is ActivityStatus.COMPLETED
    assert run.state.activities["a"].server_id == "w1"

    t = run.complete("b", {"n": 2})
    assert dispatched(t) == ["c"]
    assert run.state.status is InstanceStatus.RUNNING

    t = run.complete("c", {"n": 3})
    assert t.decisions == [Finish(InstanceStatus.COMPLETED)]
    assert kinds(t)[-1] is HistoryKind.INSTANCE_COMPLETED
    assert t.state.status is InstanceStatus.COMPLETED
    assert run.state.finished_at == run.now
    assert run.state.error is None
    assert set(run.state.activities) == {"a", "b", "c"}


def test_outputs_flow_into_the_next_dispatch() -> None:
    run = Run.of(
        parse(
            noop("a"),
            noop(
                "b",
                whole="${steps.a.output.n}",
                text="n=${steps.a.output.n}",
                items="${steps.a.output.items}",
                obj="${steps.a.output}",
                nested={"k": ["${steps.a.output.name}", "${steps.a.output.items[1]}"]},
                sum="${steps.a.output.n + inputs.k}",
                missing="${steps.a.output.nothing.here}",
                flag="${steps.a.output.ok}",
                literal="plain",
                escaped="$${steps.a.output}",
            ),
            inputs={"k": {"type": "integer"}},
        ),
        {"k": 10},
    )
    run.start()
    output = {"n": 5, "items": [1, 2], "name": "sw1", "ok": False}
    (d,) = dispatches(run.complete("a", output))
    assert d.params == {
        "whole": 5,
        "text": "n=5",
        "items": [1, 2],
        "obj": output,
        "nested": {"k": ["sw1", 2]},
        "sum": 15,
        "missing": None,
        "flag": False,
        "literal": "plain",
        "escaped": "${steps.a.output}",
    }
    assert type(d.params["whole"]) is int
    assert type(d.params["flag"]) is bool


def test_inputs_render_into_the_first_dispatch() -> None:
    d = parse(
        noop("a", host="${inputs.host}", url="http://${inputs.host}/x", all="${inputs}"),
        inputs={"host": {"type": "string"}},
    )
    t = Run.of(d, {"host": "sw1"}).start()
    assert dispatches(t)[0].params == {
        "host": "sw1",
        "url": "http://sw1/x",
        "all": {"host": "sw1"},
    }


def test_dispatch_carries_type_timeout_and_restartability() -> None:
    run = Run.of(
        parse(
            {"id": "s", "type": "sleep", "with": {"seconds": 2}, "timeout": "500ms"},
            {"id": "x", "type": "shell.command", "with": {"argv": ["true"]}, "timeout": "1m"},
        )
    )
    (s,) = dispatches(run.start())
    assert (s.activity_type, s.params, s.timeout_s, s.restartable) == (
        "sleep",
        {"seconds": 2},
        0.5,
        True,
    )
    (x,) = dispatches(run.complete("s", {"slept": 2}))
    assert (x.activity_type, x.timeout_s, x.restartable, x.not_before) == (
        "shell.command",
        60.0,
        False,
        None,
    )
    assert run.state.activities["x"].type == "shell.command"


def test_instance_outputs_map_step_ids_to_outputs() -> None:
    run = Run.of(
        parse(
            noop("a"),
            {"id": "c", "if": "steps.a.output.go", "then": [noop("t")], "else": [noop("e")]},
            {"id": "p", "parallel": [[noop("p1")], [noop("p2")]]},
        )
    )
    run.start()
    run.complete("a", {"go": True})
    run.complete("t", "then-output")
    run.complete("p2", [2])
    run.complete("p1", None)
    assert run.state.status is InstanceStatus.COMPLETED
    outputs = outputs_of(run.state.activities)
    assert outputs == {"a": {"go": True}, "t": "then-output", "p1": None, "p2": [2]}


# --- conditions ---------------------------------------------------------------------------------


CONDITION = (
    noop("a"),
    {
        "id": "c",
        "if": "steps.a.output.ok == true",
        "then": [noop("t1"), noop("t2")],
        "else": [noop("e1")],
    },
    noop("z"),
)


@pytest.mark.parametrize(("ok", "path"), [(True, ["t1", "t2"]), (False, ["e1"])])
def test_a_condition_takes_one_branch(ok: bool, path: list[str]) -> None:
    run = Run.of(parse(*CONDITION))
    run.start()
    t = run.complete("a", {"ok": ok})
    assert dispatched(t) == path[:1]
    (branch,) = [h for h in t.history if h.kind is HistoryKind.BRANCH]
    assert branch.step == "c"
    assert ("then" if ok else "else") in branch.reason
    assert run.state.branches == {"c": ok}
    for step in path:
        t = run.complete(step)
    assert dispatched(t) == ["z"]
    t = run.complete("z")
    assert t.decisions == [Finish(InstanceStatus.COMPLETED)]
    assert set(run.state.activities) == {"a", *path, "z"}
    everything = [h.kind for t in run.transitions for h in t.history]
    assert everything.count(HistoryKind.BRANCH) == 1


def test_a_condition_is_never_re_evaluated() -> None:
    run = Run.of(parse(*CONDITION))
    run.start()
    run.complete("a", {"ok": True})
    # Were the condition evaluated again, it would now take `else`.
    run.state = run.state.model_copy(deep=True)
    run.state.activities["a"].output = {"ok": False}
    t = run.complete("t1")
    assert dispatched(t) == ["t2"]
    assert HistoryKind.BRANCH not in kinds(t)
    run.complete("t2")
    run.complete("z")
    assert run.state.status is InstanceStatus.COMPLETED
    assert "e1" not in run.state.activities


def test_a_condition_on_an_input() -> None:
    d = parse(
        {"id": "c", "if": "inputs.n > 3", "then": [noop("big")], "else": [noop("small")]},
        inputs={"n": {"type": "integer"}},
    )
    assert dispatched(Run.of(d, {"n": 4}).start()) == ["big"]
    assert dispatched(Run.of(d, {"n": 3}).start()) == ["small"]


def test_an_empty_branch_moves_on() -> None:
    run = Run.of(parse({"id": "c", "if": "false", "then": [noop("t")]}, noop("after")))
    t = run.start()
    assert dispatched(t) == ["after"]
    assert [h.reason for h in t.history if h.kind is HistoryKind.BRANCH] == [
        "'false' is False: took else"
    ]
    assert run.state.branches == {}, "a finished condition keeps its choice in the history"
    run.complete("after")
    assert run.state.status is InstanceStatus.COMPLETED


def test_a_condition_on_a_step_of_an_untaken_branch_sees_null() -> None:
    run = Run.of(
        parse(
            {"id": "c1", "if": "false", "then": [noop("t")], "else": []},
            {
                "id": "c2",
                "if": "steps.t.output == null",
                "then": [noop("yes", t="${steps.t.output.x}")],
                "else": [noop("no")],
            },
        )
    )
    t = run.start()
    assert dispatched(t) == ["yes"]
    assert dispatches(t)[0].params == {"t": None}


def test_a_condition_that_cannot_be_evaluated_fails_the_instance() -> None:
    run = Run.of(
        parse(
            noop("a"),
            {"id": "c", "if": "steps.a.output.n + 'x' == 1", "then": [noop("t")]},
        )
    )
    run.start()
    t = run.complete("a", {"n": 1})
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert run.state.status is InstanceStatus.FAILED
    assert run.state.error is not None
    assert run.state.error.kind == "expression"
    assert "c.if" in run.state.error.message
    assert "c" not in run.state.branches


# --- parallel -----------------------------------------------------------------------------------


PARALLEL = (
    {
        "id": "p",
        "parallel": [[noop("a1"), noop("a2")], [noop("b1")], [noop("c1")]],
    },
    noop("after", a="${steps.a2.output}", b="${steps.b1.output}", c="${steps.c1.output}"),
)


def test_a_parallel_dispatches_every_branch_at_once_and_joins() -> None:
    run = Run.of(parse(*PARALLEL))
    t = run.start()
    assert dispatched(t) == ["a1", "b1", "c1"]

    assert run.complete("b1", "B").decisions == []
    assert dispatched(run.complete("a1", "A1")) == ["a2"]
    assert run.complete("c1", "C").decisions == []
    assert run.complete("a2", "A2").decisions == [
        Dispatch("after", "noop", {"a": "A2", "b": "B", "c": "C"}, 1, True, None)
    ]
    t = run.complete("after")
    assert t.decisions == [Finish(InstanceStatus.COMPLETED)]


def test_a_parallel_as_the_last_step_finishes_only_after_the_last_branch() -> None:
    run = Run.of(parse({"id": "p", "parallel": [[noop("a")], [noop("b")]]}))
    run.start()
    t = run.complete("b")
    assert t.decisions == []
    assert run.state.status is InstanceStatus.RUNNING
    t = run.complete("a")
    assert t.decisions == [Finish(InstanceStatus.COMPLETED)]


def test_a_retry_in_one_branch_holds_the_join() -> None:
    run = Run.of(
        parse(
            {
                "id": "p",
                "parallel": [
                    [{"id": "a", "type": "noop", "retry": {"max_attempts": 2}}],
                    [noop("b")],
                ],
            },
            noop("after"),
        )
    )
    run.start()
    run.complete("b")
    t = run.fail("a")
    assert [(d.step, d.attempt) for d in dispatches(t)] == [("a", 2)]
    t = run.complete("a")
    assert dispatched(t) == ["after"]


def test_a_failing_branch_fails_the_instance_and_cancels_the_others() -> None:
    run = Run.of(parse({"id": "p", "parallel": [[noop("a1"), noop("a2")], [noop("b")]]}))
    run.start()
    t = run.fail("b", "no route")
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert run.state.status is InstanceStatus.FAILED
    assert run.state.error == ActivityError(kind="adapter", message="no route")
    assert run.status("b") is ActivityStatus.FAILED
    assert run.status("a1") is ActivityStatus.CANCELLED
    assert "a2" not in run.state.activities
    # The worker running a1 answers later: recorded, nothing moves.
    before = run.state
    assert_nothing_changed(before, run.complete("a1", attempt=1), HistoryKind.LATE_RESULT)


def test_no_dispatch_is_emitted_when_a_branch_fails_in_the_same_transition() -> None:
    run = Run.of(
        parse(
            noop("pre"),
            {
                "id": "p",
                "parallel": [
                    [noop("a", x="${steps.pre.output.n}")],
                    [noop("b", y="${steps.pre.output.n + 'x'}")],
                    [noop("c")],
                ],
            },
        )
    )
    run.start()
    t = run.complete("pre", {"n": 1})
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert [h for h in t.history if h.kind is HistoryKind.DISPATCHED] == []
    assert run.state.status is InstanceStatus.FAILED
    assert run.state.error is not None
    assert run.state.error.kind == "expression"
    assert run.status("b") is ActivityStatus.FAILED
    for step in ("a", "c"):  # if recorded at all, they are not waiting for anything
        assert step not in run.state.activities or run.status(step).is_final


def test_no_dispatch_is_emitted_when_a_branch_fails_at_start() -> None:
    run = Run.of(
        parse(
            {"id": "p", "parallel": [[noop("a")], [noop("b", y="${inputs.n + 'x'}")]]},
            inputs={"n": {"type": "integer"}},
        ),
        {"n": 1},
    )
    t = run.start()
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert HistoryKind.DISPATCHED not in kinds(t)
    assert run.state.status is InstanceStatus.FAILED


# --- retries, failures and timeouts --------------------------------------------------------------


def retried(max_attempts: int = 3, backoff: str | None = "2s") -> Definition:
    retry: dict[str, Any] = {"max_attempts": max_attempts}
    if backoff is not None:
        retry["backoff"] = backoff
    return parse({"id": "x", "type": "noop", "with": {"v": 1}, "retry": retry}, noop("after"))


def test_a_failure_with_attempts_left_dispatches_the_next_attempt_after_the_backoff() -> None:
    run = Run.of(retried())
    run.start()
    t = run.fail("x", "first")
    assert t.decisions == [
        Dispatch("x", "noop", {"v": 1}, 2, True, None, run.now + timedelta(seconds=2))
    ]
    assert kinds(t) == [HistoryKind.FAILED, HistoryKind.RETRY]
    assert run.state.status is InstanceStatus.RUNNING
    assert run.status("x") is ActivityStatus.SCHEDULED
    assert run.attempt("x") == 2
    assert run.state.activities["x"].reason is not None

    t = run.fail("x", "second")
    assert t.decisions == [
        Dispatch("x", "noop", {"v": 1}, 3, True, None, run.now + timedelta(seconds=2))
    ]


def test_a_retry_without_backoff_is_due_now() -> None:
    run = Run.of(retried(backoff=None))
    run.start()
    (d,) = dispatches(run.fail("x"))
    assert (d.attempt, d.not_before) == (2, run.now)


def test_the_last_failure_fails_the_instance_with_that_error() -> None:
    run = Run.of(retried())
    run.start()
    run.fail("x", "first")
    run.fail("x", "second")
    t = run.fail("x", "third", kind="http_status")
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert kinds(t)[-1] is HistoryKind.INSTANCE_FAILED
    assert run.state.status is InstanceStatus.FAILED
    assert run.state.error == ActivityError(kind="http_status", message="third")
    x = run.state.activities["x"]
    assert (x.status, x.attempt, x.error) == (ActivityStatus.FAILED, 3, run.state.error)
    assert "after" not in run.state.activities
    assert run.state.finished_at == run.now


def test_one_attempt_by_default() -> None:
    run = Run.of(parse(noop("x"), noop("after")))
    run.start()
    t = run.fail("x")
    assert t.decisions == [Finish(InstanceStatus.FAILED)]


def test_a_later_attempt_may_succeed() -> None:
    run = Run.of(retried())
    run.start()
    run.fail("x")
    t = run.complete("x", {"v": 1})
    assert dispatched(t) == ["after"]
    assert run.status("x") is ActivityStatus.COMPLETED
    assert run.state.activities["x"].error is None


def test_time_outs_count_against_the_crash_budget_not_the_retry_policy() -> None:
    run = Run.of(retried(max_attempts=2))
    run.start()
    for attempt in (1, 2):
        t = run.fail("x", f"too slow {attempt}", timed_out=True, kind="timeout")
        # A new attempt at once (no backoff), even past the retry policy's 2 attempts.
        assert t.decisions == [Dispatch("x", "noop", {"v": 1}, attempt + 1, True, None, None)]
        assert kinds(t) == [HistoryKind.TIMED_OUT, HistoryKind.RETRY]
        assert run.state.activities["x"].interruptions == attempt
        assert run.status("x") is ActivityStatus.SCHEDULED
        assert run.state.status is InstanceStatus.RUNNING
    # The third time-out exhausts the default crash budget of 3.
    t = run.fail("x", "too slow again", timed_out=True, kind="timeout")
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert kinds(t) == [HistoryKind.TIMED_OUT, HistoryKind.INSTANCE_FAILED]
    assert run.status("x") is ActivityStatus.TIMED_OUT
    assert (run.attempt("x"), run.state.activities["x"].interruptions) == (3, 3)
    assert run.state.status is InstanceStatus.FAILED
    assert run.state.error == ActivityError(kind="timeout", message="too slow again")
    assert "after" not in run.state.activities


# --- late, duplicate and unknown results -------------------------------------------------------


def test_a_result_of_a_stale_attempt_is_late_and_changes_nothing() -> None:
    run = Run.of(retried())
    run.start()
    run.fail("x")
    before = run.state
    assert_nothing_changed(before, run.complete("x", attempt=1), HistoryKind.LATE_RESULT)
    assert_nothing_changed(before, run.fail("x", attempt=1), HistoryKind.LATE_RESULT)
    assert_nothing_changed(before, run.complete("x", attempt=3), HistoryKind.LATE_RESULT)
    assert run.last is not None
    assert (run.last.history[0].step, run.last.history[0].attempt) == ("x", 3)
    # The current attempt still counts.
    assert dispatched(run.complete("x", attempt=2)) == ["after"]


def test_a_result_for_a_finished_activity_is_late_and_changes_nothing() -> None:
    run = Run.of(parse(noop("a"), noop("b")))
    run.start()
    run.complete("a", "first")
    before = run.state
    assert_nothing_changed(before, run.complete("a", "second", attempt=1), HistoryKind.LATE_RESULT)
    assert_nothing_changed(before, run.fail("a", attempt=1), HistoryKind.LATE_RESULT)
    assert run.state.activities["a"].output == "first"


def test_a_result_after_the_instance_failed_is_late() -> None:
    run = Run.of(parse(noop("a")))
    run.start()
    run.fail("a")
    before = run.state
    assert_nothing_changed(before, run.complete("a", attempt=1), HistoryKind.LATE_RESULT)


@pytest.mark.parametrize("step", ["b", "nope"])
def test_a_result_for_a_step_never_dispatched_is_ignored(step: str) -> None:
    run = Run.of(parse(noop("a"), noop("b")))
    run.start()
    before = run.state
    assert_nothing_changed(before, run.complete(step, attempt=1), HistoryKind.IGNORED)
    assert_nothing_changed(before, run.fail(step, attempt=1), HistoryKind.IGNORED)


def test_a_result_before_start_is_ignored() -> None:
    run = Run.of(parse(noop("a")))
    before = run.state
    assert_nothing_changed(before, run.complete("a", attempt=1), HistoryKind.IGNORED)
    assert run.state.status is InstanceStatus.PENDING


# --- start and cancel --------------------------------------------------------------------------


def test_start_twice_is_ignored_the_second_time() -> None:
    run = Run.of(parse(noop("a")))
    run.start()
    before = run.state
    t = run.start()
    assert_nothing_changed(before, t, HistoryKind.IGNORED)


def test_cancel_ends_a_running_instance() -> None:
    run = Run.of(parse(noop("a"), {"id": "p", "parallel": [[noop("b1")], [noop("b2")]]}, noop("z")))
    run.start()
    run.complete("a", "A")
    run.complete("b2")
    t = run.cancel("operator said so")
    # b1 was dispatched (its message may sit in a worker's prefetch) but nothing runs: workers
    # are told to drop it, and the instance ends at once.
    assert t.decisions == [StopInstance("operator"), Finish(InstanceStatus.CANCELLED)]
    assert kinds(t) == [HistoryKind.INSTANCE_CANCELLED]
    assert t.history[0].reason == "cancelled by operator: operator said so"
    assert run.state.status is InstanceStatus.CANCELLED
    assert run.state.finished_at == run.now
    assert run.state.cancel == CancelRequest(
        by="operator", reason="operator said so", requested_at=run.now
    )
    assert run.state.activities["b1"].reason == "cancelled by operator before it started"
    assert {s: a.status for s, a in run.state.activities.items()} == {
        "a": ActivityStatus.COMPLETED,
        "b1": ActivityStatus.CANCELLED,
        "b2": ActivityStatus.COMPLETED,
    }
    assert t.changed_steps == {"b1"}
    assert run.state.activities["a"].output == "A"
    # b1's worker finishes anyway: late, and nothing moves on.
    before = run.state
    assert_nothing_changed(before, run.complete("b1", attempt=1), HistoryKind.LATE_RESULT)


def test_cancel_during_a_retry_backoff_cancels_the_scheduled_attempt() -> None:
    run = Run.of(retried())
    run.start()
    run.fail("x")
    run.cancel()
    assert run.status("x") is ActivityStatus.CANCELLED
    assert run.state.status is InstanceStatus.CANCELLED


def test_cancel_ends_a_pending_instance() -> None:
    run = Run.of(parse(noop("a")))
    t = run.cancel()
    assert t.decisions == [Finish(InstanceStatus.CANCELLED)]
    assert run.state.status is InstanceStatus.CANCELLED
    before = run.state
    assert_nothing_changed(before, run.start(), HistoryKind.IGNORED)


@pytest.mark.parametrize("end", ["complete", "fail", "cancel"])
def test_cancel_of_a_final_instance_is_ignored(end: str) -> None:
    run = Run.of(parse(noop("a")))
    run.start()
    if end == "complete":
        run.complete("a")
    elif end == "fail":
        run.fail("a")
    else:
        run.cancel()
    assert run.state.status.is_final
    before = run.state
    assert_nothing_changed(before, run.cancel(), HistoryKind.IGNORED)


# --- render errors ------------------------------------------------------------------------------


def test_a_render_error_fails_the_activity_and_the_instance() -> None:
    run = Run.of(
        parse(noop("a", x='${inputs.n + "x"}'), inputs={"n": {"type": "integer"}}), {"n": 1}
    )
    t = run.start()
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert run.state.status is InstanceStatus.FAILED
    a = run.state.activities["a"]
    assert a.status is ActivityStatus.FAILED
    assert a.error is not None
    assert a.error.kind == "expression"
    assert run.state.error is not None
    assert run.state.error.kind == "expression"
    assert "with.x" in run.state.error.message


def test_a_render_error_after_earlier_steps_completed() -> None:
    run = Run.of(parse(noop("a"), noop("b", x="${steps.a.output.items[0] * 'x'}")))
    run.start()
    t = run.complete("a", {"items": [None]})
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert run.state.error is not None
    assert run.state.error.kind == "expression"
    assert run.status("a") is ActivityStatus.COMPLETED


# --- purity -------------------------------------------------------------------------------------


def test_apply_never_mutates_the_state_it_is_given() -> None:
    """Every kind of event, on states at every stage: Run.send compares before and after."""
    d = parse(
        noop("a"),
        {"id": "c", "if": "steps.a.output.ok", "then": [noop("t", v="${steps.a.output}")]},
        {
            "id": "p",
            "parallel": [
                [{"id": "r", "type": "noop", "retry": {"max_attempts": 2, "backoff": "1s"}}],
                [noop("q")],
            ],
        },
    )
    run = Run.of(d)
    run.start()
    run.start()
    run.complete("a", {"ok": True, "deep": {"list": [1, 2]}})
    run.complete("a", {"ok": False}, attempt=1)
    run.complete("t", {"deep": [1]})
    run.fail("r")
    run.fail("r", attempt=1)
    run.complete("nope", attempt=1)
    run.complete("q")
    snapshot = dump(run.state)
    run.cancel()
    run.cancel()
    run.complete("r", attempt=2)
    assert run.state.status is InstanceStatus.CANCELLED
    # Keep an old state and drive it down another road: it is still what it was.
    old = run.transitions[-4].state
    assert dump(old) == snapshot
    apply(d, old, ActivityCompleted("r", 2, {}, "w", T0, T0), T0)
    assert dump(old) == snapshot
