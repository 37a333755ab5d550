from __future__ import annotations

from pydantic import Field

from paceline_infra.settings import Settings


class WorkerSettings(Settings):
    worker_concurrency: int = Field(default=32, ge=1, le=10_000)
    """Activities run at once."""
    worker_prefetch: int | None = Field(default=None, ge=1, le=10_000)
    """Messages held from the broker; unset: the concurrency. Those beyond the concurrency
    wait unclaimed, so a survivor runs them if this worker dies."""
    worker_max_deliveries: int = Field(default=10, ge=2, le=1000)
    """A backstop against a message that keeps coming back without its claim being counted
    (the crash budget, counted by the scheduler from claims, normally acts first): delivered
    this often, it is quarantined without being run. RabbitMQ also counts returns that are no
    crash (a broker restart, a drain), so this stays well above the crash budget."""
    worker_grace_s: float = Field(default=30.0, ge=0)
    """On SIGTERM: how long in-flight activities may take to finish before the worker exits."""
