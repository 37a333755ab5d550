"""The engine applied to an instance as the scheduler stores it: the document and no
activities, loading only what the engine asks for (`NotLoaded`). Every driver of the engine's
tests checks each event this way too, so each rule is also checked on partial state."""

from __future__ import annotations

from datetime import datetime

from paceline_engine.definitions import Definition
from paceline_engine.events import Event, Policy
from paceline_engine.machine import Transition, apply
from paceline_engine.state import InstanceState, NotLoaded

MAX_LOADS = 3
"""Reads of activities one event may need: its own step, then what a step entered refers to,
then the open activities (a cancel, an ending)."""


def apply_partially(
    definition: Definition,
    state: InstanceState,
    event: Event,
    now: datetime,
    policy: Policy | None = None,
) -> Transition:
    """`event` applied to `state` as stored (its document only), the activities the engine
    asks for loaded from `state` (a complete state) as the scheduler loads them."""
    partial = InstanceState.partial(state.document())
    for _ in range(MAX_LOADS + 1):
        try:
            return apply(definition, partial, event, now, policy)
        except NotLoaded as need:
            held = state.activities
            if need.every:
                partial.add_loaded(dict(held), every=True)
            if need.open:
                partial.add_loaded(
                    {s: a for s, a in held.items() if not a.status.is_final}, open=True
                )
            partial.add_loaded({s: held[s] for s in need.steps if s in held}, need.steps)
    raise AssertionError(f"more than {MAX_LOADS} reads for {event!r}")


def check_partial(
    definition: Definition,
    state: InstanceState,
    event: Event,
    now: datetime,
    full: Transition,
    policy: Policy | None = None,
) -> None:
    """The event applied to `state` stored and loaded piecemeal makes the same transition as
    `full` (applied to the complete `state`); and the stored counts are the true ones."""
    t = apply_partially(definition, state, event, now, policy)
    assert t.decisions == full.decisions
    assert t.history == full.history
    assert t.changed_steps == full.changed_steps
    assert t.state.document() == full.state.document()
    for step, activity in t.state.activities.items():
        assert full.state.activities.get(step) == activity, step
    for step in full.changed_steps:
        assert t.state.activities.get(step) == full.state.activities.get(step), step
    true_counts: dict[str, int] = {}
    for a in full.state.activities.values():
        true_counts[a.status.value] = true_counts.get(a.status.value, 0) + 1
    assert full.state.counts == true_counts
