"""Every state a process instance, an activity or a server can be in (CONTRACT.md)."""

from enum import StrEnum


class InstanceStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    WAITING = "WAITING"
    FLAGGED = "FLAGGED"
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
