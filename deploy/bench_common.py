"""What the benchmark scenarios share: a stack of their own, starting instances over the
API, waiting for them, and reading CPU use from /proc and pg_stat_activity."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from chaos_api import Api
from stack_env import StackEnv, drop_everything, queue_depths

from stack import ROOT, Stack

FINAL = ("COMPLETED", "FAILED", "CANCELLED")
IN_FLIGHT = 64


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated; 0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


@asynccontextmanager
async def running_stack(workers: int, log_name: str) -> AsyncIterator[tuple[StackEnv, Stack, Api]]:
    env = StackEnv.fresh("plbench")
    stack = Stack(env=env.variables(), log_dir=ROOT / ".paceline" / "bench" / log_name)
    api = Api(env.base_url, env.token)
    try:
        await asyncio.to_thread(stack.migrate)
        for kind, count in (
            ("scheduler", 1),
            ("activity-worker", workers),
            ("reporting", 1),
        ):
            for _ in range(count):
                stack.add(kind)
        stack.add("admin")
        deadline = time.monotonic() + 90
        while not await api.ready():
            dead = [s.name for s in stack.services.values() if not s.alive()]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not come up (dead: {dead}); see {stack.log_dir}")
            await asyncio.sleep(0.3)
        yield env, stack, api
    finally:
        await api.close()
        await asyncio.to_thread(stack.stop_all, 30)
        await drop_everything(env)


async def define(api: Api, definition: dict[str, Any]) -> None:
    created = await api.call("POST", "/v1/definitions", json=definition)
    if created.status_code != 201:
        raise RuntimeError(f"definition refused: {created.status_code} {created.text}")


async def start_many(api: Api, name: str, inputs: list[dict[str, Any]]) -> list[str]:
    """Start one instance per inputs, IN_FLIGHT requests at a time; their ids in order."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(given: dict[str, Any]) -> str:
        async with gate:
            answer = await api.call(
                "POST",
                "/v1/instances",
                json={"definition": name, "inputs": given},
                headers={"Idempotency-Key": f"bench-{uuid.uuid4().hex}"},
            )
        if answer.status_code != 202:
            raise RuntimeError(f"start refused: {answer.status_code} {answer.text[:300]}")
        return str(answer.json()["id"])

    return list(await asyncio.gather(*(one(g) for g in inputs)))


async def wait_ended(
    conn: asyncpg.Connection,
    ids: list[str],
    within_s: float,
    operator: tuple[Api, Counter[str]] | None = None,
) -> int:
    """Wait until every instance has ended, retrying flags as an operator would when given
    `operator` (the API and retries per instance); how many did not end `within_s`."""
    deadline = time.monotonic() + within_s
    last_said = 0.0
    while True:
        open_ = await conn.fetchval(
            "SELECT count(*) FROM instances WHERE id = ANY($1::uuid[]) AND NOT status = ANY($2)",
            ids,
            list(FINAL),
        )
        if open_ == 0 or time.monotonic() > deadline:
            return int(open_)
        if operator is not None:
            await retry_flags(*operator)
        if time.monotonic() - last_said > 5:
            last_said = time.monotonic()
            say(f"  {len(ids) - open_} of {len(ids)} ended")
        await asyncio.sleep(0.5)


async def retry_flags(api: Api, retried: Counter[str]) -> None:
    for flag in await api.items("/v1/flags"):
        instance_id, step = flag["instance_id"], flag["step"]
        answer = await api.call(
            "POST",
            f"/v1/instances/{instance_id}/activities/{step}/resolve",
            json={"action": "retry"},
        )
        if answer.status_code == 202:
            retried[str(instance_id)] += 1


CLOCK_TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")
SERVICE_KINDS = ("scheduler", "activity-worker", "reporting", "admin")


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _ticks(fields: list[str], *, reaped: bool) -> int:
    """utime + stime (fields 14 and 15 of proc(5)), with cutime + cstime when `reaped`."""
    own = int(fields[11]) + int(fields[12])
    return own + (int(fields[13]) + int(fields[14]) if reaped else 0)


def _children() -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _proc_stat(int(entry))) is not None:
            found.setdefault(int(fields[1]), []).append(int(entry))
    return found


def service_cpu_ms(stack: Stack) -> dict[str, float]:
    """CPU ms each kind of service has used so far: its processes, their live descendants, and
    the descendants they have reaped (cutime + cstime)."""
    children = _children()
    used = dict.fromkeys(SERVICE_KINDS, 0.0)
    for service in stack.services.values():
        if not service.alive():
            raise RuntimeError(f"{service.name} died during the scaling run")
        todo, ticks = [service.pid], 0
        while todo:
            pid = todo.pop()
            if (fields := _proc_stat(pid)) is not None:
                ticks += _ticks(fields, reaped=True)
                todo += children.get(pid, [])
        used[service.kind] += ticks * CLOCK_TICK_MS
    return used


class BackendCpu:
    """CPU of the PostgreSQL backends of some databases, over a window: each backend counts
    from its first sighting (from zero when it appeared after `start`) to its last."""

    def __init__(self, conn: asyncpg.Connection, databases: list[str]) -> None:
        self._conn = conn
        self._databases = databases
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}

    async def start(self) -> None:
        self._first, self._last = {}, {}
        await self.sample(baseline=True)

    async def sample(self, *, baseline: bool = False) -> None:
        pids = await self._conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1) AND pid <> pg_backend_pid()",
            self._databases,
        )
        for row in pids:
            if (fields := _proc_stat(row["pid"])) is None:
                continue
            ticks = _ticks(fields, reaped=False)
            self._first.setdefault(row["pid"], ticks if baseline else 0)
            self._last[row["pid"]] = ticks

    def used_ms(self) -> float:
        return sum(self._last[p] - self._first[p] for p in self._last) * CLOCK_TICK_MS


def noop_sequence(name: str, steps: int) -> dict[str, Any]:
    return {
        "name": name,
        "inputs": {"n": {"type": "integer"}},
        "steps": [
            {"id": f"s{i}", "type": "noop", "with": {"n": "${inputs.n}"}} for i in range(steps)
        ],
    }


async def settle(env: StackEnv, backends: BackendCpu, within_s: float = 30) -> None:
    """Wait until the stack's queues are empty (the reporting service has taken every event)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        await backends.sample()
        depths = await queue_depths(env.namespace)
        if not any(depths.get(name, 0) for name in env.live_queues()):
            return
        await asyncio.sleep(0.5)
    say(f"  the queues did not empty within {within_s:.0f}s; measuring anyway")


async def idle_cpu(stack: Stack, backends: BackendCpu, seconds: float = 5) -> dict[str, float]:
    """CPU ms per second each process uses with nothing to do (heartbeats, polls): what a
    size's CPU per activity holds besides the work, in proportion to how long the size ran."""
    await backends.start()
    before = service_cpu_ms(stack)
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        await asyncio.sleep(0.5)
        await backends.sample()
    after = service_cpu_ms(stack)
    took = time.monotonic() - began
    used = {kind: after[kind] - before[kind] for kind in SERVICE_KINDS}
    used["postgres"] = backends.used_ms()
    return {kind: round(ms / took, 1) for kind, ms in used.items()}
