"""The `waiting` scenario of `make bench` (see bench.py): waiting instances held with flat
memory, and timers due in the same second."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
from bench_common import (
    SERVICE_KINDS,
    BackendCpu,
    define,
    percentile,
    running_stack,
    say,
    service_cpu_ms,
    start_many,
    wait_ended,
)
from chaos_api import Api
from stack_env import StackEnv

from paceline_contracts.queues import Queue, queue_name
from stack import Stack

WAIT_LONG = "2h"
"""How long phase 1's instances wait: far beyond the scenario, so none of them ends in it."""


def _status_kib(pid: int, field: str) -> int | None:
    """A field of /proc/<pid>/status in KiB (VmRSS, RssAnon); None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


async def rss_mib(stack: Stack, conn: asyncpg.Connection, databases: list[str]) -> dict[str, Any]:
    """Each service process's VmRSS (its own process, not its descendants), and `postgres`: the
    RssAnon (private memory; a backend's VmRSS counts the shared buffers it has touched) summed
    over the backends of the stack's databases, the benchmark's own connections left out."""
    found: dict[str, Any] = {}
    for service in stack.services.values():
        if not service.alive():
            raise RuntimeError(f"{service.name} died during the waiting run")
        found[service.name] = round((_status_kib(service.pid, "VmRSS") or 0) / 1024, 1)
    pids = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1) "
        "AND application_name <> 'bench' AND pid <> pg_backend_pid()",
        databases,
    )
    kib = sum(_status_kib(r["pid"], "RssAnon") or 0 for r in pids)
    found["postgres"] = round(kib / 1024, 1)
    found["postgres_backends"] = len(pids)
    return found


async def count_waiting(conn: asyncpg.Connection, names: list[str]) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM instances WHERE status = 'WAITING' AND definition = ANY($1)",
            names,
        )
    )


async def until_waiting(
    conn: asyncpg.Connection,
    names: list[str],
    expected: int,
    within_s: float,
    backends: BackendCpu | None = None,
) -> None:
    """Wait until `expected` instances of `names` are WAITING."""
    deadline = time.monotonic() + within_s
    last_said = time.monotonic()
    while (waiting := await count_waiting(conn, names)) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {waiting} of {expected} instances are WAITING")
        if time.monotonic() - last_said > 10:
            last_said = time.monotonic()
            say(f"  {waiting} of {expected} WAITING")
        if backends is not None:
            await backends.sample()
        await asyncio.sleep(0.5)


async def start_chunked(
    api: Api,
    plan: list[tuple[str, dict[str, Any]]],
    what: str,
    backends: BackendCpu | None = None,
    on_chunk: Callable[[], Awaitable[None]] | None = None,
    chunk: int = 2000,
) -> list[str]:
    """start_many over (definition, inputs) pairs, a chunk at a time (progress on stderr)."""
    ids: list[str] = []
    began = time.monotonic()
    for at in range(0, len(plan), chunk):
        by_name: dict[str, list[dict[str, Any]]] = {}
        for name, inputs in plan[at : at + chunk]:
            by_name.setdefault(name, []).append(inputs)
        for name, inputs_ in by_name.items():
            ids += await start_many(api, name, inputs_)
        if backends is not None:
            await backends.sample()
        if on_chunk is not None:
            await on_chunk()
        took = time.monotonic() - began
        say(f"  {what}: {len(ids)} of {len(plan)} started ({len(ids) / took:.0f}/s)")
    return ids


def _runqueue_ms(pid: int) -> float:
    """How long the process's threads have waited for a CPU while runnable (the second field
    of /proc/<pid>/task/<tid>/schedstat, in ns): a busy machine, not the process, slowed it."""
    waited = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                waited += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return waited / 1e6


def _runqueue_by_kind(stack: Stack) -> dict[str, float]:
    waited = dict.fromkeys(SERVICE_KINDS, 0.0)
    for service in stack.services.values():
        waited[service.kind] += _runqueue_ms(service.pid)
    return waited


@dataclass
class CpuUse:
    wall_s: float
    cpu_ms: dict[str, float]
    """By kind of service, and `postgres` (the stack's backends)."""
    runqueue_ms: dict[str, float]
    """By kind of service: time its threads were runnable but waited for a CPU."""

    def per(self, count: int) -> dict[str, float | None]:
        return {k: round(ms / count, 2) if count else None for k, ms in self.cpu_ms.items()}

    def cores(self) -> dict[str, dict[str, float]]:
        """Busy cores (CPU time / wall time) of each, and the cores' worth of time each waited
        runnable for a CPU: waits besides these are on PostgreSQL, the broker or nothing."""
        wall = max(self.wall_s, 1e-9)
        return {
            "busy": {k: round(ms / 1000 / wall, 2) for k, ms in self.cpu_ms.items()},
            "waiting_for_cpu": {
                k: round(ms / 1000 / wall, 2) for k, ms in self.runqueue_ms.items()
            },
        }


class CpuWindow:
    """CPU each kind of service and the stack's PostgreSQL backends use from `open()` on."""

    def __init__(self, stack: Stack, backends: BackendCpu) -> None:
        self._stack, self.backends = stack, backends
        self._before: dict[str, float] = {}
        self._waited: dict[str, float] = {}
        self._began = 0.0

    async def open(self) -> None:
        await self.backends.start()
        self._before = service_cpu_ms(self._stack)
        self._waited = _runqueue_by_kind(self._stack)
        self._began = time.monotonic()

    async def used(self) -> CpuUse:
        """What was used since `open()`."""
        await self.backends.sample()
        after, waited = service_cpu_ms(self._stack), _runqueue_by_kind(self._stack)
        used = {kind: after[kind] - self._before[kind] for kind in SERVICE_KINDS}
        used["postgres"] = self.backends.used_ms()
        return CpuUse(
            time.monotonic() - self._began,
            used,
            {kind: waited[kind] - self._waited[kind] for kind in SERVICE_KINDS},
        )


async def watch_due(
    env: StackEnv, stop: asyncio.Event, samples: list[tuple[datetime, int, int]]
) -> None:
    """Four times a second until `stop`: the database's now(), the timers due and not yet
    published by the outbox relay, and the FireTimer (and other) commands published and not
    yet delivered to the scheduler (the commands queue's ready messages; the scheduler holds
    up to its prefetch unacknowledged besides)."""
    conn = await asyncpg.connect(env.database_url, server_settings={"application_name": "bench"})
    broker = await aio_pika.connect(env.amqp_url)
    try:
        channel = await broker.channel()
        commands = queue_name(env.namespace, Queue.COMMANDS)
        while not stop.is_set():
            now, due = await conn.fetchrow(
                "SELECT now(), count(*) FROM outbox WHERE delayed AND available_at <= now()"
            )
            declared = await channel.declare_queue(commands, passive=True)
            samples.append((now, int(due), declared.declaration_result.message_count or 0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    finally:
        await broker.close()
        await conn.close()


async def waiting(instances: int, due_timers: int, settle_s: float) -> dict[str, Any]:
    async with running_stack(workers=2, log_name="waiting") as (env, stack, api):
        tag = uuid.uuid4().hex[:6]
        names = {kind: f"bench-w{kind}-{tag}" for kind in ("t", "s", "u")}
        await define(
            api,
            {"name": names["t"], "steps": [{"id": "w", "wait": {"for": WAIT_LONG}}]},
        )
        await define(
            api,
            {
                "name": names["s"],
                "steps": [{"id": "w", "wait": {"signal": "go", "timeout": WAIT_LONG}}],
            },
        )
        await define(
            api,
            {
                "name": names["u"],
                "inputs": {"at": {"type": "string"}},
                "steps": [
                    {"id": "w", "wait": {"until": "${inputs.at}"}},
                    {"id": "after", "type": "noop"},
                ],
            },
        )
        conn = await asyncpg.connect(
            env.database_url, server_settings={"application_name": "bench"}
        )
        try:
            databases = [env.database, env.reporting_database]
            cpu = CpuWindow(stack, BackendCpu(conn, databases))
            held = await _hold(stack, api, conn, cpu, databases, names, instances, settle_s)
            fired = await _fire(env, stack, api, conn, cpu, databases, names, due_timers, held)
        finally:
            await conn.close()
    return {"scenario": "waiting", **held, **fired}


async def _hold(
    stack: Stack,
    api: Api,
    conn: asyncpg.Connection,
    cpu: CpuWindow,
    databases: list[str],
    names: dict[str, str],
    instances: int,
    settle_s: float,
) -> dict[str, Any]:
    """Phase 1: `instances` waits held at once, half timers, half signals (both 2 h). A warm-up
    tenth (at most 1,000) goes first, so that growth is also read from a warm stack, not from
    the first use of pools, caches and code paths."""
    held = [names["t"], names["s"]]
    plan = [(names["t"] if i % 2 == 0 else names["s"], {}) for i in range(instances)]
    warm_n = min(1000, max(1, instances // 10))
    rss_before = await rss_mib(stack, conn, databases)
    say(f"waiting: {instances} instances waiting (timers and signals), {warm_n} first")
    await start_chunked(api, plan[:warm_n], "warm-up")
    await until_waiting(conn, held, warm_n, within_s=120)
    rss_warm = await rss_mib(stack, conn, databases)
    scheduler = stack.of_kind("scheduler")
    curve: list[list[float]] = []

    async def note_rss() -> None:
        rss = sum(_status_kib(s.pid, "VmRSS") or 0 for s in scheduler) / 1024
        curve.append([await count_waiting(conn, held), round(rss, 1)])

    load = round(os.getloadavg()[0], 1)
    await cpu.open()
    await start_chunked(api, plan[warm_n:], "waiting", cpu.backends, note_rss)
    started_s = (await cpu.used()).wall_s
    await until_waiting(conn, held, instances, within_s=600, backends=cpu.backends)
    use = await cpu.used()
    waiting_s = use.wall_s
    rss_after = await rss_mib(stack, conn, databases)
    say(f"  all {instances} WAITING after {waiting_s:.1f}s; settling {settle_s:.0f}s")
    await asyncio.sleep(settle_s)
    rss_settled = await rss_mib(stack, conn, databases)
    measured = instances - warm_n
    per_10k = measured / 10_000
    await note_rss()
    step = max(1, len(curve) // 10)
    return {
        "waiting_instances": instances,
        "warm_up_instances": warm_n,
        "start_rate_per_s": round(measured / started_s, 1) if measured else None,
        "all_waiting_after_s": round(waiting_s, 1),
        "starting": {
            "loadavg_1m": load,
            "cpu_ms_per_start": use.per(measured),
            **use.cores(),
        },
        "settle_s": settle_s,
        "rss_mib_before": rss_before,
        "rss_mib_warm": rss_warm,
        "rss_mib_after": rss_after,
        "rss_mib_settled": rss_settled,
        "rss_growth_mib_per_10k": {
            k: round((rss_settled[k] - rss_warm[k]) / per_10k, 2) if per_10k else None
            for k in rss_settled
            if k != "postgres_backends"
        },
        "scheduler_rss_growth_mib": round(
            sum(rss_settled[s.name] - rss_before[s.name] for s in scheduler), 1
        ),
        # [instances WAITING, the scheduler's VmRSS in MiB] as they were started, and settled.
        "scheduler_rss_mib_by_waiting": curve[::step]
        + ([curve[-1]] if (len(curve) - 1) % step else []),
    }


async def _fire(
    env: StackEnv,
    stack: Stack,
    api: Api,
    conn: asyncpg.Connection,
    cpu: CpuWindow,
    databases: list[str],
    names: dict[str, str],
    due_timers: int,
    held: dict[str, Any],
) -> dict[str, Any]:
    """Phase 2: `due_timers` waits until the same instant T, then a noop, next to phase 1's.
    T, on the database's clock, leaves time to start them all at phase 1's rate (half again,
    and 5 s more)."""
    rate = held["start_rate_per_s"] or 50.0
    lead_s = float(round(max(5.0, 1.5 * due_timers / rate + 5)))
    due_at: datetime = await conn.fetchval(
        "SELECT date_trunc('second', now()) + make_interval(secs => $1)", lead_s
    )
    say(f"waiting: {due_timers} timers due at {due_at.isoformat()} ({lead_s:.0f}s from now)")
    ids = await start_chunked(api, [(names["u"], {"at": due_at.isoformat()})] * due_timers, "due")
    await until_waiting(conn, [names["u"]], due_timers, within_s=max(60.0, lead_s))
    rss_due = await rss_mib(stack, conn, databases)
    left = (due_at - await conn.fetchval("SELECT now()")).total_seconds()
    if left > 1:
        await asyncio.sleep(left - 1)
    stop, samples = asyncio.Event(), []
    watcher = asyncio.create_task(watch_due(env, stop, samples))
    load = round(os.getloadavg()[0], 1)
    await cpu.open()
    try:
        not_ended = await wait_ended(conn, ids, within_s=max(0.0, left) + 600)
        use = await cpu.used()
    finally:
        stop.set()
        await watcher
    rss_fired = await rss_mib(stack, conn, databases)
    completed = await conn.fetchval(
        "SELECT count(*) FROM instances WHERE id = ANY($1::uuid[]) AND status = 'COMPLETED'",
        ids,
    )
    ended = await conn.fetch(
        "SELECT at, (data->>'lateness_s')::float8 AS lateness_s FROM history "
        "WHERE instance_id = ANY($1::uuid[]) AND kind = 'wait_ended' AND step = 'w'",
        ids,
    )
    late_starts = await conn.fetchval(
        "SELECT count(*) FROM history WHERE instance_id = ANY($1::uuid[]) "
        "AND kind = 'waiting' AND at > $2",
        ids,
        due_at,
    )
    still = await count_waiting(conn, [names["t"], names["s"]])
    lateness = sorted(r["lateness_s"] * 1000 for r in ended if r["lateness_s"] is not None)
    fired = sorted(r["at"] for r in ended)
    after = [(at - due_at).total_seconds() for at, _, _ in samples]
    pending = [i for i, (_, due, _) in enumerate(samples) if due and after[i] >= 0]
    drained = after[pending[-1] + 1] if pending and pending[-1] + 1 < len(samples) else None
    return {
        "still_waiting": still,
        "rss_mib_due": rss_due,
        "rss_mib_after_timers": rss_fired,
        "due_timers": due_timers,
        "due_lead_s": lead_s,
        "timers_started_after_due": late_starts,
        "completed": completed,
        "not_ended": not_ended,
        "lateness_values": len(lateness),
        "lateness_p50_ms": round(percentile(lateness, 50), 1),
        "lateness_p99_ms": round(percentile(lateness, 99), 1),
        "lateness_max_ms": round(max(lateness, default=0.0), 1),
        "firing": {
            "loadavg_1m": load,
            "first_fired_after_s": (
                round((fired[0] - due_at).total_seconds(), 3) if fired else None
            ),
            "last_fired_after_s": (
                round((fired[-1] - due_at).total_seconds(), 3) if fired else None
            ),
            "fired_per_s": (
                round(len(fired) / (fired[-1] - due_at).total_seconds(), 1)
                if fired and fired[-1] > due_at
                else None
            ),
            "outbox_due_peak": max((due for _, due, _ in samples), default=0),
            "outbox_drained_after_s": round(drained, 2) if drained is not None else None,
            "commands_ready_peak": max((ready for _, _, ready in samples), default=0),
            "cpu_ms_per_timer": use.per(due_timers),
            **use.cores(),
        },
    }
