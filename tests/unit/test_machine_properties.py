"""Properties of the engine's state machine over random definitions and random schedules.

A generator builds a random valid definition (nested sequences, conditions on an input or on an
earlier output, parallel steps of 1-3 branches, depth at most 3, `noop`/`sleep` activities with
retry policies) together with an oracle: which branch each condition must take, which
activities are on the taken path, what each must wait for, and what each `noop` renders.

A random scheduler then drives the instance: at each turn it answers any outstanding dispatched
attempt (completed, failed with a known or an unknown outcome, timed out, or cut by its worker's
drain), or sends noise (a duplicate of an answered result, a result of a stale attempt, a result
for a step never dispatched, a second Start) or a Cancel. Every transition is checked against
the oracle. Failures follow each step's retry policy whatever their outcome (these activities
are restartable); time-outs follow the engine's crash budget instead (a new attempt at once
until the budget is spent, then TIMED_OUT); a drain's cut is charged to nothing (a new attempt at
once). A cancel finds nothing running (no attempt is ever claimed here): it cancels at once,
telling the workers to drop what they hold. Claims, crashes and cancels of running activities
are in test_machine_failover.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from unit.partial_state import check_partial

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.definitions import Definition, parse_definition, resolve_inputs
from paceline_engine.events import (
    ActivityCompleted,
    ActivityFailed,
    ActivityStopped,
    Cancel,
    Dispatch,
    Event,
    Finish,
    HistoryKind,
    Policy,
    Start,
    StopCause,
    StopInstance,
)
from paceline_engine.machine import Transition, apply, new_instance
from paceline_engine.state import InstanceState, outputs_of

T0 = datetime(2025, 1, 1, tzinfo=UTC)
MAX_DEPTH = 3
FINAL = {InstanceStatus.COMPLETED, InstanceStatus.FAILED, InstanceStatus.CANCELLED}
CRASH_BUDGET = Policy().crash_budget
"""Time-outs a step may have in all; `apply` is called without a policy, so the default."""
MAX_DRAINS = 3
"""Drain cuts the scheduler sends in all (each one is a new attempt, charged to nothing)."""

# --- the generator and its oracle ----------------------------------------------------------------


@dataclass(frozen=True)
class Act:
    """What the oracle knows of one activity step."""

    id: str
    type: str
    max_attempts: int
    backoff_s: float
    on_path: bool
    """On the taken path: it must run; off it, it must never be dispatched."""
    preds: frozenset[str]
    """On-path activities that must be COMPLETED before it is dispatched (sequence order,
    and every branch of each parallel step before it: the join)."""
    joins: frozenset[str]
    """The parallel steps (on the path) that come before it in an enclosing sequence."""
    params: dict[str, Any]
    """Its `with` as it must be rendered (meaningful when on the path)."""

    @property
    def output(self) -> Any:
        return self.params if self.type == "noop" else {"slept": self.params["seconds"]}

    @property
    def most_attempts(self) -> int:
        """Failures retried by the retry policy plus time-outs retried within the budget (plus
        whatever drains cut: `MAX_DRAINS` in all)."""
        return self.max_attempts + CRASH_BUDGET - 1


@dataclass
class Oracle:
    inputs: dict[str, Any]
    acts: dict[str, Act] = field(default_factory=dict)
    taken: dict[str, bool] = field(default_factory=dict)
    """Condition id -> True for `then`, for the conditions on the path."""
    inside: dict[str, frozenset[str]] = field(default_factory=dict)
    """Parallel id -> the on-path activities inside it."""

    @property
    def path(self) -> list[Act]:
        return [a for a in self.acts.values() if a.on_path]


@dataclass(frozen=True)
class Scope:
    """What a step sees where it stands."""

    visible: dict[str, Any]
    """Activity id -> the value of `steps.<id>.output.v` (None when it did not run)."""
    before: frozenset[str]
    joins: frozenset[str]
    on_path: bool

    def then(self, visible: dict[str, Any], before: frozenset[str], joins: frozenset[str]) -> Scope:
        return Scope(visible, before, joins, self.on_path)


class Builder:
    """Draws a definition and fills in the oracle as it goes."""

    def __init__(self, draw: st.DrawFn, n: int) -> None:
        self.draw = draw
        self.n = n
        self.oracle = Oracle(inputs={"n": n})
        self.budget = draw(st.integers(1, 12))
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def sequence(self, depth: int, scope: Scope) -> tuple[list[dict[str, Any]], Scope]:
        steps: list[dict[str, Any]] = []
        for i in range(self.draw(st.integers(1, 3))):
            if i and self.count >= self.budget:
                break
            step, scope = self.step(depth, scope)
            steps.append(step)
        return steps, scope

    def step(self, depth: int, scope: Scope) -> tuple[dict[str, Any], Scope]:
        kinds = ["activity"]
        if depth < MAX_DEPTH and self.count < self.budget:
            kinds += ["condition", "parallel"]
        kind = self.draw(st.sampled_from(kinds))
        if kind == "condition":
            return self.condition(depth, scope)
        if kind == "parallel":
            return self.parallel(depth, scope)
        return self.activity(scope)

    def activity(self, scope: Scope) -> tuple[dict[str, Any], Scope]:
        step_id = self.fresh("a")
        raw: dict[str, Any] = {"id": step_id}
        if self.draw(st.booleans()):
            raw["type"] = "noop"
            sources: list[tuple[str, str | None]] = [("literal", None), ("input", None)]
            sources += [("step", other) for other in sorted(scope.visible)]
            source, other = self.draw(st.sampled_from(sources))
            if source == "literal":
                value = self.draw(st.integers(0, 3))
                raw["with"] = {"v": value, "text": "fixed"}
            elif source == "input":
                value = self.n
                raw["with"] = {"v": "${inputs.n}", "text": "n=${inputs.n}"}
            else:
                assert other is not None
                value = scope.visible[other]
                raw["with"] = {"v": f"${{steps.{other}.output.v}}", "from": other}
            params = {**raw["with"], "v": value}
            if source == "input":
                params["text"] = f"n={self.n}"
        else:
            raw["type"] = "sleep"
            raw["with"] = params = {"seconds": self.draw(st.sampled_from([0, 0.5, 1]))}
            value = None  # a sleep's output has no `v`
        max_attempts, backoff_s = 1, 0.0
        policy = self.draw(st.sampled_from([None, (2, None), (3, "1s"), (2, "500ms"), (1, "2s")]))
        if policy is not None:
            max_attempts, backoff = policy
            raw["retry"] = {"max_attempts": max_attempts}
            if backoff is not None:
                raw["retry"]["backoff"] = backoff
                backoff_s = {"1s": 1.0, "500ms": 0.5, "2s": 2.0}[backoff]
        self.oracle.acts[step_id] = Act(
            step_id,
            raw["type"],
            max_attempts,
            backoff_s,
            scope.on_path,
            scope.before,
            scope.joins,
            params,
        )
        visible = {**scope.visible, step_id: value if scope.on_path else None}
        before = scope.before | {step_id} if scope.on_path else scope.before
        return raw, scope.then(visible, before, scope.joins)

    def condition(self, depth: int, scope: Scope) -> tuple[dict[str, Any], Scope]:
        step_id = self.fresh("c")
        k = self.draw(st.integers(0, 3))
        choices: list[tuple[str, bool]] = [
            (f"inputs.n == {k}", self.n == k),
            (f"inputs.n > {k}", self.n > k),
            ("true", True),
            ("false", False),
        ]
        for other, value in sorted(scope.visible.items()):
            # A step off the path reads as null: `==` is false, `!=` true.
            choices.append((f"steps.{other}.output.v == {k}", value == k))
            choices.append((f"steps.{other}.output.v != {k}", value != k))
        source, taken = self.draw(st.sampled_from(choices))
        if scope.on_path:
            self.oracle.taken[step_id] = taken
        raw: dict[str, Any] = {"id": step_id, "if": source}
        visible, before, joins = dict(scope.visible), scope.before, scope.joins
        for key, runs in (("then", taken), ("else", not taken)):
            if key == "else" and self.draw(st.booleans()):
                continue  # no `else`
            inner = Scope(scope.visible, scope.before, scope.joins, scope.on_path and runs)
            raw[key], after = self.sequence(depth + 1, inner)
            visible |= after.visible
            before |= after.before
            joins |= after.joins
        return raw, scope.then(visible, before, joins)

    def parallel(self, depth: int, scope: Scope) -> tuple[dict[str, Any], Scope]:
        step_id = self.fresh("p")
        branches: list[list[dict[str, Any]]] = []
        visible, before, joins = dict(scope.visible), scope.before, scope.joins
        for _ in range(self.draw(st.integers(1, 3))):
            # A branch sees only what ran before the parallel step.
            branch, after = self.sequence(depth + 1, scope)
            branches.append(branch)
            visible |= after.visible
            before |= after.before
            joins |= after.joins
        if scope.on_path:
            self.oracle.inside[step_id] = before - scope.before
            joins |= {step_id}
        return {"id": step_id, "parallel": branches}, scope.then(visible, before, joins)


@st.composite
def definitions(draw: st.DrawFn) -> tuple[dict[str, Any], Oracle]:
    builder = Builder(draw, draw(st.integers(0, 3)))
    top = Scope({}, frozenset(), frozenset(), True)
    steps, _ = builder.sequence(0, top)
    raw = {"name": "random", "inputs": {"n": {"type": "integer"}}, "steps": steps}
    return raw, builder.oracle


# --- the scheduler ------------------------------------------------------------------------------


def dump(state: InstanceState) -> str:
    return json.dumps(state.model_dump(mode="json"), sort_keys=True)


@dataclass
class Scheduler:
    definition: Definition
    oracle: Oracle
    state: InstanceState
    now: datetime = T0
    outstanding: dict[tuple[str, int], Dispatch] = field(default_factory=dict)
    """Dispatched attempts no result has answered yet."""
    answered: list[tuple[str, int]] = field(default_factory=list)
    dispatched: list[tuple[str, int]] = field(default_factory=list)
    finish: Finish | None = None
    branches_taken: set[str] = field(default_factory=set)
    cancel_sent: bool = False
    cancelled: bool = False
    """The Cancel came while the instance ran (a later one is ignored)."""
    events: int = 0
    real_answers: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    """Step -> failures (not time-outs) reported for its current attempts so far."""
    timeouts: dict[str, int] = field(default_factory=dict)
    """Step -> time-outs reported so far: its interruptions."""
    drains: dict[str, int] = field(default_factory=dict)
    """Step -> attempts cut by a drain's deadline: charged to nothing."""
    cause: str = ""
    """The outcome of the result being sent: what a new attempt in reply is for."""

    def send(self, event: Event) -> Transition:
        self.now += timedelta(seconds=1)
        self.events += 1
        before = dump(self.state)
        t = apply(self.definition, self.state, event, self.now)
        assert dump(self.state) == before, "apply mutated the state it was given"
        self.check(t)
        check_partial(self.definition, self.state, event, self.now, t)
        self.state = t.state
        return t

    def check(self, t: Transition) -> None:
        finishes = [d for d in t.decisions if isinstance(d, Finish)]
        if self.finish is not None:
            # (7) nothing is decided after the instance finished.
            assert t.decisions == [], (self.finish, t.decisions)
        if finishes:
            (finish,) = finishes
            stop = [d for d in t.decisions if isinstance(d, StopInstance)]
            assert t.decisions == [*stop, finish], "a finishing transition dispatches nothing"
            assert not stop or finish.status is InstanceStatus.CANCELLED
            assert t.state.status is finish.status
            assert finish.status in FINAL
            assert all(a.status.is_final for a in t.state.activities.values())
            self.finish = finish
        elif self.state.status is not InstanceStatus.PENDING:
            assert t.state.status is self.state.status, "only a Finish changes the status"
        for step, taken in t.state.branches.items():
            # (5) a condition takes the branch the oracle says, and only on the path.
            assert self.oracle.taken.get(step) is taken, (step, taken)
        for entry in t.history:
            if entry.kind is HistoryKind.BRANCH:
                # A condition is evaluated once, never again.
                assert entry.step not in self.branches_taken, entry
                assert entry.step is not None
                self.branches_taken.add(entry.step)
        for d in t.decisions:
            if isinstance(d, Dispatch):
                self.check_dispatch(d, t.state)

    def check_dispatch(self, d: Dispatch, state: InstanceState) -> None:
        act = self.oracle.acts[d.step]
        # (5) an untaken branch's activities are never dispatched.
        assert act.on_path, f"{d.step} is on an untaken branch"
        # (2) each (step, attempt) at most once, attempts 1, 2, 3 in order.
        previous = max((a for s, a in self.dispatched if s == d.step), default=0)
        assert d.attempt == previous + 1, (d.step, previous, d.attempt)
        # (3) never more attempts than the retry policy and the crash budget allow: failures
        # follow the retry policy, time-outs the crash budget.
        assert d.attempt <= act.most_attempts + self.drains.get(d.step, 0)
        assert self.failures.get(d.step, 0) < act.max_attempts
        assert self.timeouts.get(d.step, 0) < CRASH_BUDGET
        assert d.attempt == (
            1
            + self.failures.get(d.step, 0)
            + self.timeouts.get(d.step, 0)
            + self.drains.get(d.step, 0)
        )
        assert not d.isolated, "nothing crashed: nothing runs alone"
        # (4) sequence order and the join: everything before it has completed.
        for pred in act.preds:
            assert state.activities[pred].status is ActivityStatus.COMPLETED, (d.step, pred)
        for parallel in act.joins:
            for inner in self.oracle.inside[parallel]:
                assert state.activities[inner].status is ActivityStatus.COMPLETED
        # Outputs flow: the dispatch carries what the oracle rendered.
        assert d.params == act.params
        assert d.activity_type == act.type
        assert d.restartable is True
        # A retry after a failure waits for the backoff; a new attempt after a time-out or a
        # drain does not.
        backoff = timedelta(seconds=act.backoff_s)
        failure = self.cause in ("failed", "unknown")
        assert d.not_before == (self.now + backoff if failure else None)
        activity = state.activities[d.step]
        assert (activity.attempt, activity.status) == (d.attempt, ActivityStatus.SCHEDULED)
        self.dispatched.append((d.step, d.attempt))
        self.outstanding[d.step, d.attempt] = d

    def noise(self, event: Event) -> None:
        """(6) an event that must change nothing but the history."""
        before = dump(self.state)
        t = self.send(event)
        assert dump(t.state) == before
        assert t.decisions == []
        assert t.changed_steps == frozenset()
        assert [h.kind for h in t.history] in (
            [HistoryKind.LATE_RESULT],
            [HistoryKind.IGNORED],
        ), t.history

    def result(self, step: str, attempt: int, outcome: str) -> Event:
        when = self.now
        if outcome == "completed":
            output = self.oracle.acts[step].output if step in self.oracle.acts else None
            return ActivityCompleted(step, attempt, output, "w1", when, when)
        error = self.error(step, attempt, outcome)
        if outcome == "drained":
            return ActivityStopped(step, attempt, StopCause.DRAIN_DEADLINE, error, "w3", when, when)
        return ActivityFailed(step, attempt, error, "w2", when, when, outcome == "timeout")

    @staticmethod
    def error(step: str, attempt: int, outcome: str) -> ActivityError:
        unknown = outcome in ("unknown", "timeout", "drained")
        return ActivityError(
            kind=outcome, message=f"{step} attempt {attempt}", outcome_unknown=unknown
        )

    def answer(self, step: str, attempt: int, outcome: str) -> None:
        self.outstanding.pop((step, attempt))
        self.answered.append((step, attempt))
        if self.state.status.is_final:
            # The worker finished after the instance ended: late.
            self.noise(self.result(step, attempt, outcome))
            return
        activity = self.state.activities[step]
        assert (activity.attempt, activity.status) == (attempt, ActivityStatus.SCHEDULED)
        self.real_answers += 1
        act = self.oracle.acts[step]
        counts = {
            "failed": self.failures,
            "unknown": self.failures,
            "timeout": self.timeouts,
            "drained": self.drains,
        }.get(outcome)
        if counts is not None:
            counts[step] = counts.get(step, 0) + 1
        self.cause = outcome
        t = self.send(self.result(step, attempt, outcome))
        self.cause = ""
        after = t.state.activities[step]
        if outcome == "completed":
            assert after.status is ActivityStatus.COMPLETED
            assert after.output == act.output
            return
        event_error = self.error(step, attempt, outcome)
        if outcome == "drained":
            # A drain is the operator's doing: a new attempt at once, nothing charged.
            assert (after.interruptions, after.failures) == (
                self.timeouts.get(step, 0),
                self.failures.get(step, 0),
            )
            retry_due = True
        elif outcome == "timeout":
            assert after.interruptions == self.timeouts[step]
            retry_due = self.timeouts[step] < CRASH_BUDGET
        else:
            # Restartable: an unknown outcome is a failure like any other.
            # However many attempts time-outs took, the retry policy counts failures.
            assert after.failures == self.failures[step]
            retry_due = self.failures[step] < act.max_attempts
        retried = (step, attempt + 1) in self.outstanding
        assert retried is retry_due, (step, attempt, outcome, retry_due)
        if retried:
            assert t.state.status is InstanceStatus.RUNNING
            assert (after.attempt, after.status) == (attempt + 1, ActivityStatus.SCHEDULED)
        else:
            # The last failure fails the instance, with that activity's error.
            assert t.decisions == [Finish(InstanceStatus.FAILED)]
            assert t.state.error == event_error
            expected = ActivityStatus.TIMED_OUT if outcome == "timeout" else ActivityStatus.FAILED
            assert after.status is expected

    def cancel(self) -> None:
        self.cancel_sent = True
        if self.state.status.is_final:
            self.noise(Cancel("random cancel", by="carol"))
            return
        open_steps = {s for s, a in self.state.activities.items() if not a.status.is_final}
        t = self.send(Cancel("random cancel", by="carol"))
        self.cancelled = True
        # Nothing was claimed, so nothing runs: cancelled at once. Workers may hold what was
        # dispatched (prefetched): they are told to drop it.
        stop = [StopInstance("carol")] if open_steps else []
        assert t.decisions == [*stop, Finish(InstanceStatus.CANCELLED)]
        assert [h.kind for h in t.history] == [HistoryKind.INSTANCE_CANCELLED]
        assert t.state.cancel is not None
        assert t.state.cancel.by == "carol"
        for step in open_steps:
            assert t.state.activities[step].status is ActivityStatus.CANCELLED


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(generated=definitions(), data=st.data())
def test_random_definitions_under_a_random_scheduler(
    generated: tuple[dict[str, Any], Oracle], data: st.DataObject
) -> None:
    raw, oracle = generated
    definition = parse_definition(raw)  # the generator only writes valid definitions
    inputs = resolve_inputs(definition, oracle.inputs)
    s = Scheduler(definition, oracle, new_instance(inputs))

    cancel_at = data.draw(st.none() | st.integers(0, 25), label="cancel at event")
    noise_left = data.draw(st.integers(0, 8), label="noise events")
    if cancel_at == 0:
        s.cancel()
    t = s.send(Start())
    if cancel_at == 0:
        assert t.decisions == []
    else:
        assert t.history[0].kind is HistoryKind.STARTED

    # Each real answer either ends an attempt for good or leads to the next one, so this is
    # bounded by the path's retry policies and crash budgets; the cap only stops a runaway engine.
    bound = sum(a.most_attempts for a in oracle.path) + MAX_DRAINS + noise_left + 2
    for _ in range(4 * bound):
        if cancel_at is not None and s.events >= cancel_at and not s.cancel_sent:
            s.cancel()
            continue
        kinds = (["answer"] * 3 if s.outstanding else []) + (["noise"] if noise_left else [])
        if not kinds:
            break
        if data.draw(st.sampled_from(kinds), label="turn") == "answer":
            step, attempt = data.draw(st.sampled_from(sorted(s.outstanding)), label="attempt")
            outcomes = ["completed", "completed", "failed", "unknown", "timeout"]
            if sum(s.drains.values()) < MAX_DRAINS:
                outcomes.append("drained")
            outcome = data.draw(st.sampled_from(outcomes), label="outcome")
            s.answer(step, attempt, outcome)
        else:
            noise_left -= 1
            send_noise(s, data)
    else:
        raise AssertionError("the run did not end")

    # (1) once every dispatched attempt is answered, the instance has ended.
    assert not s.outstanding
    assert s.state.status in FINAL, s.state.status
    assert s.finish == Finish(s.state.status)
    assert s.real_answers <= sum(a.most_attempts for a in oracle.path) + MAX_DRAINS
    final = [a for a in s.state.activities.values() if a.status.is_final]
    assert len(final) == len(s.state.activities)

    event(f"ended {s.state.status.value}")
    event(f"activities on the path: {len(oracle.path) if len(oracle.path) < 5 else '5+'}")
    event(f"conditions and parallels on the path: {bool(oracle.taken)}, {bool(oracle.inside)}")
    event(f"retried: {any(a > 1 for _, a in s.dispatched)}")
    event(f"timed out: {sum(s.timeouts.values()) if sum(s.timeouts.values()) < 3 else '3+'}")
    event(f"cut by a drain: {sum(s.drains.values())}")
    if s.state.status is InstanceStatus.COMPLETED:
        # (5) every activity on the taken path completed; nothing else was ever dispatched.
        assert set(s.state.activities) == {a.id for a in oracle.path}
        assert all(a.status is ActivityStatus.COMPLETED for a in s.state.activities.values())
        assert s.state.branches == {}, "finished conditions keep their choice in the history"
        assert s.branches_taken == set(oracle.taken)
        assert outputs_of(s.state.activities) == {a.id: a.output for a in oracle.path}
        assert s.state.error is None
    elif s.state.status is InstanceStatus.FAILED:
        failed = [
            a
            for a in s.state.activities.values()
            if a.status in (ActivityStatus.FAILED, ActivityStatus.TIMED_OUT)
        ]
        assert len(failed) == 1
        assert s.state.error == failed[0].error
    else:
        assert s.cancelled


def send_noise(s: Scheduler, data: st.DataObject) -> None:
    options = ["unknown step", "start again"]
    if s.answered:
        options.append("duplicate")
    if s.state.activities:
        options.append("stale attempt")
    what = data.draw(st.sampled_from(options), label="noise")
    outcome = data.draw(st.sampled_from(["completed", "failed"]), label="noise outcome")
    if what == "duplicate":
        step, attempt = data.draw(st.sampled_from(s.answered), label="duplicate of")
        s.noise(s.result(step, attempt, outcome))
    elif what == "stale attempt":
        step = data.draw(st.sampled_from(sorted(s.state.activities)), label="stale step")
        current = s.state.activities[step].attempt
        attempt = data.draw(st.sampled_from([current - 1, current + 1, current + 7]))
        s.noise(s.result(step, attempt, outcome))
    elif what == "unknown step":
        never = [*sorted(set(s.oracle.acts) - set(s.state.activities)), "ghost"]
        step = data.draw(st.sampled_from(never), label="never dispatched")
        s.noise(s.result(step, 1, outcome))
    else:
        s.noise(Start())
