"""Moving on: from the steps a transition finished to what comes next.

Only where a finished step sits counts (layout.py): the next step of its sequence, or, at a
sequence's end, the condition or parallel step that owns it (a parallel step counts the
branches it still waits for). Nothing walks the whole definition or reads every activity, so
a transition costs the same at step 5 and at step 5,000.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine import approvals, waits
from paceline_engine.activity_types import SCHEDULER_TYPES
from paceline_engine.definitions import ActivityStep, ConditionStep, ParallelStep, Step, WaitStep
from paceline_engine.events import HistoryKind
from paceline_engine.expressions import EvaluationError

if TYPE_CHECKING:
    from paceline_engine.run import Run

Work = deque[tuple[str, str | Step]]
"""What is left to do: ("enter", a step), ("after", a finished step's id), ("end", "")."""

DONE = (ActivityStatus.COMPLETED, ActivityStatus.SKIPPED)
ACTIVE = (InstanceStatus.RUNNING, InstanceStatus.FLAGGED, InstanceStatus.WAITING)
"""Started, not final, not cancelling: steps still move on."""


def advance(run: Run) -> None:
    """Move on from every activity this transition finished: enter what comes next, join
    parallel steps, complete the instance at the end of its steps; fail it when an
    activity failed. Calling it again does nothing more."""
    if run.state.status not in ACTIVE:
        return
    ended = sorted((step for step in run.changed if _ended_now(run, step)), key=run.layout.position)
    work: Work = deque()
    for step in ended:
        run.moved_on.add(step)
        activity = run.state.activities[step]
        if activity.status not in DONE:
            run.failure = run.failure or activity.error
            run.fail()
            return
        work.append(("after", step))
    _run(run, work)


def _ended_now(run: Run, step: str) -> bool:
    """The activity of `step` reached a final status in this transition and nothing has
    moved on from it yet."""
    activity = run.state.activities.get(step)
    before = run.before.get(step)
    return (
        step not in run.moved_on
        and activity is not None
        and activity.status.is_final
        and not (before is not None and before.is_final)
    )


def begin(run: Run) -> None:
    """Enter the first step of the definition (or complete an empty one)."""
    work: Work = deque()
    if run.definition.steps:
        work.append(("enter", run.definition.steps[0]))
    else:
        work.append(("end", ""))
    _run(run, work)


def _run(run: Run, work: Work) -> None:
    # A work list, not recursion: a long run of empty branches costs no Python frames.
    while work:
        if run.state.status.is_final:
            return
        what, target = work.popleft()
        if what == "enter":
            assert not isinstance(target, str)
            _enter(run, target, work)
        elif what == "after":
            assert isinstance(target, str)
            _after(run, target, work)
        else:
            _complete(run)


def _after(run: Run, step_id: str, work: Work) -> None:
    """`step_id` finished: its sequence goes on, or ends and its owner hears of it."""
    place = run.layout.place(step_id)
    if place.index + 1 < len(place.sequence):
        work.append(("enter", place.sequence[place.index + 1]))
        return
    _sequence_ended(run, place.owner, work)


def _sequence_ended(run: Run, owner: str | None, work: Work) -> None:
    if owner is None:
        work.append(("end", ""))
        return
    container = run.definition.step_index()[owner]
    if isinstance(container, ConditionStep):
        run.state.branches.pop(owner, None)
        work.append(("after", owner))
        return
    assert isinstance(container, ParallelStep)
    counted = run.state.joins.get(owner)
    if counted is None:
        # Every parallel step is counted when entered (and carried-over instances by
        # `paceline-scheduler migrate`): without a count, joining would be a guess.
        raise RuntimeError(
            f"parallel step {owner!r} is in progress but has no count of its branches: "
            "was the process database upgraded with `paceline-scheduler migrate`?"
        )
    if counted > 1:
        run.state.joins[owner] = counted - 1
        return
    run.state.joins.pop(owner, None)
    work.append(("after", owner))


def _start_leaf(run: Run, step: ActivityStep | WaitStep) -> None:
    """Start an activity or a wait: dispatched to the workers, or run by the scheduler
    (an approval, a wait). It may end at once (its parameters could not be evaluated; a
    buffered signal ended a wait)."""
    if isinstance(step, WaitStep):
        waits.enter(run, step)
    elif step.type in SCHEDULER_TYPES:
        approvals.enter(run, step)
    else:
        run.dispatch(step, 1, None, "its turn came")


def _enter(run: Run, step: Step, work: Work) -> None:
    if isinstance(step, ActivityStep | WaitStep):
        if step.id in run.state.activities:
            return  # entered already (a complete state can tell)
        _start_leaf(run, step)
        activity = run.state.activities[step.id]
        if not activity.status.is_final:
            return
        run.moved_on.add(step.id)
        if activity.status in DONE:
            work.append(("after", step.id))
        else:
            run.failure = run.failure or activity.error
            run.fail()
        return
    if isinstance(step, ConditionStep):
        try:
            taken = bool(step.condition.evaluate(run.context(step.condition.references())))
        except EvaluationError as exc:
            run.failure = ActivityError(kind="expression", message=f"{step.id}.if: {exc}")
            run.fail()
            return
        run.note(
            HistoryKind.BRANCH,
            f"'{step.condition.source}' is {taken}: took {'then' if taken else 'else'}",
            step.id,
        )
        branch = step.then if taken else step.otherwise
        if not branch:
            work.append(("after", step.id))
            return
        run.state.branches[step.id] = taken
        work.append(("enter", branch[0]))
        return
    branches = [b for b in step.branches if b]
    if not branches:
        work.append(("after", step.id))
        return
    run.state.joins[step.id] = len(branches)
    work.extend(("enter", b[0]) for b in branches)


def _complete(run: Run) -> None:
    run.finish(
        InstanceStatus.COMPLETED,
        None,
        HistoryKind.INSTANCE_COMPLETED,
        "every step finished",
    )
