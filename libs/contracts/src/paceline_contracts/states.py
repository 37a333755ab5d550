"""Every state a process instance, an activity or a server can be in (CONTRACT.md)."""

from enum import StrEnum


class InstanceStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    WAITING = "WAITING"
    FLAGGED = "FLAGGED"
    CANCELLING = "CANCELLING"
    """A cancel was recorded; it waits for the activities that were running to stop."""
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in _FINAL_INSTANCE


_FINAL_INSTANCE = frozenset(
    {InstanceStatus.COMPLETED, InstanceStatus.FAILED, InstanceStatus.CANCELLED}
)


class ActivityStatus(StrEnum):
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    WAITING = "WAITING"
    """A `wait` step: for a time, or a signal (the scheduler alone handles it)."""
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    INTERRUPTED = "INTERRUPTED"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"

    @property
    def is_final(self) -> bool:
        return self in _FINAL_ACTIVITY


_FINAL_ACTIVITY = frozenset(
    {
        ActivityStatus.COMPLETED,
        ActivityStatus.FAILED,
        ActivityStatus.TIMED_OUT,
        ActivityStatus.CANCELLED,
        ActivityStatus.SKIPPED,
    }
)


class ServerStatus(StrEnum):
    ACTIVE = "ACTIVE"
    DRAINING = "DRAINING"
    DRAINED = "DRAINED"
    LOST = "LOST"


class ServerKind(StrEnum):
    SCHEDULER = "scheduler"
    ACTIVITY_WORKER = "activity-worker"
    REPORTING = "reporting"
    ADMIN = "admin"


class ErrorKind(StrEnum):
    """`ActivityError.kind` values the engine acts on (adapters add kinds of their own)."""

    TIMEOUT = "timeout"
    """The step's own timeout ended the attempt."""
    CANCELLED = "cancelled"
    """The worker stopped (or never started) the attempt because its instance was cancelled."""
    DRAIN_DEADLINE = "drain_deadline"
    """The attempt still ran when its worker's drain reached the grace deadline."""
    RUNNER_CRASHED = "runner_crashed"
    """The isolated runner process of a suspect died while it ran the attempt alone."""
