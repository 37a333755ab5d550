"""Carrying an instance over from the single-document layout (every activity and every
condition's choice in one document) to the layout a transition reads piecemeal (state.py).

The engine now moves on from a finished step by its place, and joins a parallel step by
counting the branches it still waits for (`InstanceState.joins`); it keeps a condition's
choice only while the condition runs. An instance stored before that has no counts: this
derives them, once, from its complete state (`paceline-scheduler migrate` does it).
"""

from __future__ import annotations

from dataclasses import dataclass

from paceline_contracts.states import ActivityStatus
from paceline_engine.definitions import ActivityStep, ConditionStep, Definition, Step, WaitStep
from paceline_engine.state import InstanceState

__all__ = ["CarriedOver", "carry_over"]

_DONE = (ActivityStatus.COMPLETED, ActivityStatus.SKIPPED)


@dataclass(frozen=True, slots=True)
class CarriedOver:
    joins: dict[str, int]
    """Parallel step id -> branches not finished, for each parallel step in progress."""
    branches: dict[str, bool]
    """Condition step id -> the branch taken, for each condition in progress."""


def carry_over(definition: Definition, state: InstanceState) -> CarriedOver:
    """What the new layout keeps of a complete, old-layout `state` (all of its activities and
    every condition's choice): linear in the definition's size."""
    joins: dict[str, int] = {}
    branches: dict[str, bool] = {}
    if state.status.is_final:
        return CarriedOver(joins, branches)
    finished: dict[str, bool] = {}
    entered: dict[str, bool] = {}
    # Children before their owner: the reverse of a depth-first pre-order.
    for step in reversed(list(definition.walk())):
        if isinstance(step, ActivityStep | WaitStep):
            activity = state.activities.get(step.id)
            entered[step.id] = activity is not None
            finished[step.id] = activity is not None and activity.status in _DONE
        elif isinstance(step, ConditionStep):
            taken = state.branches.get(step.id)
            entered[step.id] = taken is not None
            chosen = () if taken is None else (step.then if taken else step.otherwise)
            finished[step.id] = taken is not None and _sequence_finished(chosen, finished)
            if entered[step.id] and not finished[step.id]:
                assert taken is not None
                branches[step.id] = taken
        else:
            running = [b for b in step.branches if b]
            entered[step.id] = any(entered[b[0].id] for b in running)
            waiting = sum(1 for b in running if not _sequence_finished(b, finished))
            finished[step.id] = entered[step.id] and waiting == 0
            if entered[step.id] and waiting:
                joins[step.id] = waiting
    return CarriedOver(joins, branches)


def _sequence_finished(sequence: tuple[Step, ...], finished: dict[str, bool]) -> bool:
    """A sequence is finished when its last step is (its steps run in order)."""
    return not sequence or finished[sequence[-1].id]
