"""Carrying an instance over from the single-document layout: the joins and conditions in
progress derived from its complete state, so that it finishes under the new engine."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.definitions import Definition, parse_definition
from paceline_engine.events import ActivityCompleted, Dispatch, Event
from paceline_engine.machine import apply
from paceline_engine.state import ActivityState, InstanceState
from paceline_engine.upgrade import carry_over

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def noop(step_id: str) -> dict[str, Any]:
    return {"id": step_id, "type": "noop", "with": {}}


def done() -> ActivityState:
    return ActivityState(type="noop", status=ActivityStatus.COMPLETED, attempt=1, restartable=True)


def scheduled() -> ActivityState:
    return ActivityState(
        type="noop", status=ActivityStatus.SCHEDULED, attempt=1, message_attempt=1, restartable=True
    )


def old_state(activities: dict[str, ActivityState], branches: dict[str, bool]) -> InstanceState:
    """An instance as the single-document layout stored it: every activity, every choice."""
    counts: dict[str, int] = {}
    for a in activities.values():
        counts[a.status.value] = counts.get(a.status.value, 0) + 1
    return InstanceState(
        status=InstanceStatus.RUNNING, activities=activities, branches=branches, counts=counts
    )


def finish_all(definition: Definition, state: InstanceState) -> tuple[InstanceState, list[str]]:
    """Completes whatever is scheduled until nothing is; the steps dispatched on the way."""
    now = T0
    pending: deque[Event] = deque(
        ActivityCompleted(s, a.attempt, {}, "w", now, now)
        for s, a in state.activities.items()
        if a.status is ActivityStatus.SCHEDULED
    )
    dispatched: list[str] = []
    while pending:
        now += timedelta(seconds=1)
        t = apply(definition, state, pending.popleft(), now)
        state = t.state
        for d in t.decisions:
            if isinstance(d, Dispatch):
                dispatched.append(d.step)
                pending.append(ActivityCompleted(d.step, d.attempt, {}, "w", now, now))
    return state, dispatched


# p: [[c1 (then [x], else []) ], [y1, y2]]; then z.
NESTED = parse_definition(
    {
        "name": "nested",
        "steps": [
            {
                "id": "p",
                "parallel": [
                    [{"id": "c1", "if": "true", "then": [noop("x")], "else": []}],
                    [noop("y1"), noop("y2")],
                ],
            },
            noop("z"),
        ],
    }
)


@pytest.mark.parametrize(
    ("activities", "branches", "joins", "kept"),
    [
        # The condition's branch still runs, and so does the other one: both branches wait.
        ({"x": scheduled(), "y1": done(), "y2": scheduled()}, {"c1": True}, {"p": 2}, {"c1": True}),
        # The condition's branch finished (x done): one branch waits.
        ({"x": done(), "y1": done(), "y2": scheduled()}, {"c1": True}, {"p": 1}, {}),
        # The condition took its empty branch: it finished when entered.
        ({"y1": scheduled()}, {"c1": False}, {"p": 1}, {}),
    ],
)
def test_joins_and_choices_in_progress_are_derived(
    activities: dict[str, ActivityState],
    branches: dict[str, bool],
    joins: dict[str, int],
    kept: dict[str, bool],
) -> None:
    state = old_state(activities, branches)
    result = carry_over(NESTED, state)
    assert (result.joins, result.branches) == (joins, kept)
    # And the engine finishes the instance from there, joining exactly once.
    upgraded = state.model_copy(update={"joins": result.joins, "branches": result.branches})
    final, dispatched = finish_all(NESTED, upgraded)
    assert final.status is InstanceStatus.COMPLETED
    assert dispatched.count("z") == 1


def test_a_finished_instance_keeps_nothing() -> None:
    state = old_state({"x": done(), "y1": done(), "y2": done(), "z": done()}, {"c1": True})
    state.status = InstanceStatus.COMPLETED
    result = carry_over(NESTED, state)
    assert (result.joins, result.branches) == ({}, {})


def test_without_a_join_count_the_engine_refuses_to_guess() -> None:
    state = old_state({"x": done(), "y1": done(), "y2": scheduled()}, {})
    with pytest.raises(RuntimeError, match="paceline-scheduler migrate"):
        apply(NESTED, state, ActivityCompleted("y2", 1, {}, "w", T0, T0), T0)
