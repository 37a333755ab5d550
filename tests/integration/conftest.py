"""One stack of real service processes per test session, in its own namespace and databases,
so the tests pass while a `make run` stack uses the same broker."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from stack_env import StackEnv, drop_everything

from integration.harness import TEST_VARIABLES, log_tail, wait_for
from stack import Stack


def start_stack(env: StackEnv, log_dir: Path, workers: int = 2) -> Stack:
    stack = Stack(env={**env.variables(), **TEST_VARIABLES}, log_dir=log_dir)
    stack.migrate()
    stack.add("scheduler")
    for _ in range(workers):
        stack.add("activity-worker")
    stack.add("reporting")
    stack.add("admin")
    return stack


async def wait_ready(env: StackEnv, stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=env.base_url) as client:

        async def ready() -> bool:
            for service in stack.services.values():
                if not service.alive():
                    raise AssertionError(f"{service.name} died:\n{log_tail(service.log_path)}")
            try:
                return (await client.get("/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(ready, 60, "the admin API to be ready")


@pytest.fixture(scope="session")
def env() -> Iterator[StackEnv]:
    env = StackEnv.fresh("pltest")
    yield env
    if not os.environ.get("PACELINE_KEEP_TEST_DATA"):
        asyncio.run(drop_everything(env))


@pytest.fixture(scope="session")
async def stack(env: StackEnv, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    stack = start_stack(env, tmp_path_factory.mktemp("logs"))
    try:
        await wait_ready(env, stack)
        yield stack
    finally:
        stack.stop_all(timeout=30)


@pytest.fixture
async def api(env: StackEnv, stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=env.base_url, headers={"Authorization": f"Bearer {env.token}"}, timeout=30
    ) as client:
        yield client
