"""Helpers for integration tests: waiting on a stack of real service processes and its admin
API. A stack's names, its queues and its clean-up are deploy/stack_env.py's, shared with
`make chaos`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

FINAL = {"COMPLETED", "FAILED", "CANCELLED"}
TEST_VARIABLES = {"PACELINE_WORKER_GRACE_S": "10"}
"""Added to a test stack's variables: a drain gives up on work sooner than in production."""


async def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def wait_final(
    api: httpx.AsyncClient,
    ids: Iterable[str],
    timeout: float = 60.0,
) -> dict[str, dict[str, Any]]:
    """Wait until every instance is final; returns each instance as the API shows it."""
    pending = set(ids)
    done: dict[str, dict[str, Any]] = {}

    async def poll() -> bool:
        for instance_id in list(pending):
            body = (await api.get(f"/v1/instances/{instance_id}")).json()
            if body.get("status") in FINAL:
                done[instance_id] = body
                pending.discard(instance_id)
        return not pending

    await wait_for(poll, timeout, f"{len(pending)} instance(s) to end")
    return done


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
