"""`make run`'s supervisor: prints the URL and token, restarts a service that dies, and stops
everything with a friendly shutdown on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from stack_env import StackEnv, drop_everything

from integration.harness import TEST_VARIABLES, wait_final, wait_for

pytestmark = pytest.mark.integration
RUN_STACK = Path(__file__).resolve().parents[2] / "deploy" / "run_stack.py"


async def _read_until(
    stream: asyncio.StreamReader, pattern: str, seen: list[str], timeout: float = 60
) -> re.Match[str]:
    async def scan() -> re.Match[str]:
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"supervisor output ended; saw:\n{''.join(seen)}")
            seen.append(line)
            if m := re.search(pattern, line):
                return m

    return await asyncio.wait_for(scan(), timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


async def test_supervisor_restarts_a_killed_service_and_stops_friendly() -> None:
    env = StackEnv.fresh("pltest")
    given = {**env.variables(), **TEST_VARIABLES}
    variables = {k: v for k, v in given.items() if k != "PACELINE_ADMIN_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(RUN_STACK),
        env={**os.environ, **variables},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        started = await _read_until(proc.stdout, r"started (.*)", seen)
        pids = {
            name: int(pid)
            for name, pid in re.findall(r"([a-z-]+-\d+) \(pid (\d+)\)", started.group(1))
        }
        assert set(pids) == {
            "scheduler-1",
            "activity-worker-1",
            "activity-worker-2",
            "reporting-1",
            "admin-1",
        }
        token = (await _read_until(proc.stdout, r"API token: (\S+)", seen)).group(1)
        assert len(token) >= 24, "a generated token"

        async with httpx.AsyncClient(
            base_url=env.base_url, headers={"Authorization": f"Bearer {token}"}
        ) as api:

            async def ready() -> bool:
                try:
                    return (await api.get("/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_for(ready, 60, "the admin API")
            os.kill(pids["activity-worker-1"], signal.SIGKILL)
            await _read_until(proc.stdout, r"activity-worker-1 exited \(-9\); restarting", seen)

            flow = {"name": "hello", "steps": [{"id": "hi", "type": "noop", "with": {"a": 1}}]}
            assert (await api.post("/v1/definitions", json=flow)).status_code == 201
            r = await api.post("/v1/instances", json={"definition": "hello"})
            done = await wait_final(api, [r.json()["id"]])
            assert done[r.json()["id"]]["status"] == "COMPLETED"

        proc.send_signal(signal.SIGINT)
        await _read_until(proc.stdout, r"paceline: stopped", seen)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        for name, pid in pids.items():
            if name != "activity-worker-1":
                assert not _alive(pid), f"{name} still running after Ctrl-C"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await drop_everything(env)
