"""A transition reads only what it touches: the activities the engine needs to apply one
event do not grow with the steps an instance has run or with the width of a parallel step.
Counted, not timed (timings belong to `make bench`)."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from paceline_engine.definitions import ActivityStep, Definition, parse_definition
from paceline_engine.events import ActivityCompleted, Claim, Dispatch, Event, Start
from paceline_engine.machine import apply, new_instance
from paceline_engine.state import ActivityState, InstanceState, NotLoaded

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def noop(step_id: str, **params: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "noop", "with": params}


def run_all(definition: Definition) -> list[int]:
    """Runs every activity to completion, one at a time, as the scheduler does: the instance
    stored as a document plus activity rows, each event applied to the document with the rows
    the engine asks for. Returns, for each event, how many activities it held."""
    document = new_instance({}).document()
    rows: dict[str, ActivityState] = {}
    now = T0
    held: list[int] = []
    queue: deque[Event] = deque([Start()])
    while queue:
        event = queue.popleft()
        now += timedelta(seconds=1)
        state = InstanceState.partial(document)
        while True:
            try:
                t = apply(definition, state, event, now)
                break
            except NotLoaded as need:
                if need.open or need.every:
                    raise AssertionError(f"{event!r} needed more than named steps: {need}")
                state.add_loaded({s: rows[s] for s in need.steps if s in rows}, need.steps)
        held.append(len(t.state.activities))
        rows.update({s: t.state.activities[s] for s in t.changed_steps if s in t.state.activities})
        document = t.state.document()
        for d in t.decisions:
            if isinstance(d, Dispatch):
                queue.append(
                    Claim(d.step, d.attempt, "w1", now, redelivered=False, wants_reply=False)
                )
                queue.append(ActivityCompleted(d.step, d.attempt, {"n": 1}, "w1", now, now))
    assert t.state.status.value == "COMPLETED"
    assert len(rows) == sum(1 for s in definition.walk() if isinstance(s, ActivityStep))
    return held


def test_a_long_sequence_reads_the_same_few_activities_at_every_step() -> None:
    steps = [noop("s0")] + [
        noop(f"s{i}", previous=f"${{steps.s{i - 1}.output.n}}") for i in range(1, 1000)
    ]
    held = run_all(parse_definition({"name": "long", "steps": steps}))
    # Its own step, and the one the next step's parameters refer to: never the 1,000.
    assert max(held) <= 3, max(held)


def test_a_wide_parallel_step_joins_without_reading_its_branches() -> None:
    branches = [[noop(f"b{i}")] for i in range(500)]
    definition = parse_definition(
        {"name": "wide", "steps": [{"id": "p", "parallel": branches}, noop("after")]}
    )
    held = run_all(definition)
    # Start dispatches the 500 branches (it holds what it creates); every later event reads
    # its own activity only.
    assert held[0] == 500
    assert max(held[1:]) <= 2, max(held[1:])
