from __future__ import annotations

from pydantic import Field

from paceline_engine.events import Policy
from paceline_infra.settings import Settings


class SchedulerSettings(Settings):
    scheduler_prefetch: int = Field(default=400, ge=1, le=10_000)
    """Unacked deliveries per consumer: at least a batch, so batches fill."""
    scheduler_batch_size: int = Field(default=200, ge=1, le=5_000)
    """Deliveries applied in one database transaction."""
    scheduler_batch_window_ms: float = Field(default=5.0, ge=0, le=1_000)
    """How long a batch waits for more deliveries after its first."""
    deadline_grace_s: float = Field(default=10.0, ge=0)
    """How long past a step's timeout the scheduler waits for the worker's own report
    before it times the attempt out itself (a hung or unreachable worker)."""

    server_forget_after_s: float = Field(default=86_400.0, ge=60)
    """A server silent this long (LOST, or DRAINED and gone) is removed from the registry."""
    cancel_grace_s: float = Field(default=30.0, ge=1, le=86_400)
    """How long a cancel waits for a running activity's worker to confirm that it stopped
    (a shell command gets SIGTERM, then SIGKILL after its `kill_grace`); past it the activity
    is recorded as cancelled with an unknown outcome."""

    schedule_missed_after_s: float = Field(default=60.0, ge=0, le=3_600)
    """A schedule's fire due longer ago than this when a scheduler gets to it was missed (no
    scheduler ran): the schedule's catch-up policy decides it. Due less long ago, it fires
    as on time, however late."""

    def policy(self) -> Policy:
        return Policy(
            crash_budget=self.crash_budget,
            deadline_grace_s=self.deadline_grace_s,
            cancel_grace_s=self.cancel_grace_s,
        )
