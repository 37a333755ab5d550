"""The process engine: a pure state machine.

`apply(definition, state, event, now, policy)` returns the next state, the decisions the
scheduler must carry out and the history entries that explain them. It does no I/O and reads
no clock, so any interleaving of results, claims, crashes and cancels can be replayed and
tested.

Progress is computed by walking the definition against the state (run.py): a sequence runs its
first unfinished step; a condition takes the branch it chose once; a parallel step advances
every branch and joins when all are done. Walking again after any event is idempotent.

Where each rule lives:
- claims.py: the failover rule (who holds an attempt; a redelivered attempt runs again when
  restartable and is flagged when not) and the charging of crashes to their cause;
- results.py: what workers report, with the outcome rule (an ending that does not prove the
  effect did not happen flags a non-restartable activity), time-outs, drains and stops;
- commands.py: start, cancel (CANCELLING until what ran has stopped) and operators' resolves.
- waits.py: `wait` steps (timers and signals); approvals.py: `approval` activities, which the
  scheduler runs itself (checkpointed: one approval record per attempt).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from paceline_engine import approvals, claims, commands, results, waits
from paceline_engine.definitions import Definition
from paceline_engine.events import (
    Abandon,
    ActivityCompleted,
    ActivityFailed,
    ActivityStopped,
    ApprovalDecided,
    Cancel,
    Claim,
    DeadlineExpired,
    Dispatch,
    Event,
    Policy,
    Quarantined,
    Resolve,
    SignalArrived,
    Start,
    WaitDue,
)
from paceline_engine.run import Run, Transition
from paceline_engine.state import InstanceState

__all__ = ["ActivityFailed", "Dispatch", "Start", "Transition", "apply", "new_instance"]

_DEFAULT_POLICY = Policy()


def new_instance(inputs: dict[str, Any]) -> InstanceState:
    return InstanceState(inputs=inputs)


def apply(
    definition: Definition,
    state: InstanceState,
    event: Event,
    now: datetime,
    policy: Policy | None = None,
    *,
    trigger: Mapping[str, Any] | None = None,
) -> Transition:
    """The pure transition function: never mutates `state`. `trigger`: how the instance was
    started, what its expressions see as `trigger` (definitions.py: `trigger_for_event`,
    `trigger_for_schedule`); None (the default) for an instance started through the API."""
    run = Run(definition, state, now, policy or _DEFAULT_POLICY, trigger)
    match event:
        case Start():
            commands.start(run)
        case Cancel():
            commands.cancel(run, event)
        case Resolve():
            commands.resolve(run, event)
        case ActivityCompleted():
            results.completed(run, event)
        case ActivityFailed():
            results.failed(run, event)
        case ActivityStopped():
            results.stopped(run, event)
        case DeadlineExpired():
            results.deadline(run, event)
        case Claim():
            claims.claim(run, event)
        case Quarantined():
            claims.quarantined(run, event)
        case WaitDue():
            waits.due(run, event)
        case SignalArrived():
            waits.signal(run, event)
        case ApprovalDecided():
            approvals.decided(run, event)
        case Abandon():
            commands.abandon(run, event)
    return run.result()
