from __future__ import annotations

from pydantic import Field

from paceline_infra.settings import Settings


class WorkerSettings(Settings):
    worker_concurrency: int = Field(default=32, ge=1, le=10_000)
    """Activities run at once; also the prefetch, so nothing waits unstarted in this worker."""
    worker_grace_s: float = Field(default=30.0, ge=0)
    """On SIGTERM: how long in-flight activities may take to finish before the worker exits."""
