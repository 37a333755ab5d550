"""One stack of real service processes for the whole tests/cli folder (its own namespace and
databases), and the `paceline` console script run as a subprocess against it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from stack_env import StackEnv, drop_everything

from integration.conftest import start_stack, wait_ready
from stack import Stack

PACELINE = Path(sys.executable).parent / "paceline"
"""The console script, as installed in the virtual environment."""


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        import json

        return json.loads(self.out)


@pytest.fixture(scope="session")
def cli_env() -> Iterator[StackEnv]:
    env = StackEnv.fresh("plcli")
    yield env
    if not os.environ.get("PACELINE_KEEP_TEST_DATA"):
        asyncio.run(drop_everything(env))


@pytest.fixture(scope="session")
async def cli_stack(
    cli_env: StackEnv, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    stack = start_stack(cli_env, tmp_path_factory.mktemp("logs"))
    try:
        await wait_ready(cli_env, stack)
        yield stack
    finally:
        stack.stop_all(timeout=30)


@pytest.fixture(scope="session")
def api(cli_env: StackEnv, cli_stack: Stack) -> Iterator[httpx.Client]:
    """The admin API itself, to compare what the CLI shows with what the API answers."""
    with httpx.Client(
        base_url=cli_env.base_url,
        headers={"Authorization": f"Bearer {cli_env.token}"},
        timeout=30,
    ) as client:
        yield client


def cli_environment(url: str | None, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACELINE_")}
    if url is not None:
        env["PACELINE_URL"] = url
    if token is not None:
        env["PACELINE_TOKEN"] = token
    return env


Run = Callable[..., Ran]


@pytest.fixture(scope="session")
def paceline(cli_env: StackEnv, cli_stack: Stack) -> Run:
    """`paceline(*argv, url=..., token=..., stdin=...)`: the CLI as a subprocess, against the
    stack by default."""

    def run(
        *argv: str,
        url: str | None = cli_env.base_url,
        token: str | None = cli_env.token,
        stdin: str | None = None,
        timeout: float = 90,
    ) -> Ran:
        done = subprocess.run(
            [str(PACELINE), *argv],
            env=cli_environment(url, token),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Ran(done.returncode, done.stdout, done.stderr)

    return run


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
