from __future__ import annotations

from pydantic import Field

from paceline_infra.settings import Settings


class WorkerSettings(Settings):
    worker_concurrency: int = Field(default=32, ge=1, le=10_000)
    """Activities run at once."""
    worker_prefetch: int | None = Field(default=None, ge=1, le=10_000)
    """Messages held from the broker; unset: the concurrency. Those beyond the concurrency
    wait unclaimed, so a survivor runs them if this worker dies."""
    worker_grace_s: float = Field(default=30.0, ge=0)
    """On SIGTERM: how long in-flight activities may take to finish before the worker exits."""
