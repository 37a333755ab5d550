"""`make bench`: what a stack does on this machine, as one JSON object a line (CONTRACT.md).

    python deploy/bench.py [--processes 2000] [--steps 5] [--kills 20]
                           [--scaling-steps 5,50,500] [--scaling-activities 2000]
                           [--scaling-in-flight N]
                           [--waiting-instances 100000] [--due-timers 10000]
                           [--waiting-settle-s 30]
                           [--scenarios throughput,failover,scaling]

throughput  --processes instances of --steps noop steps, started over the admin API (64 requests
            in flight) against the stack `make run` starts (1 scheduler, 2 workers, reporting,
            admin). activities_per_s: activities run / (last end - first start); p50_ms and
            p99_ms: each instance's start to end (its row's created_at and updated_at).
failover    --kills times, the worker holding the most restartable sleeps is SIGKILLed and
            started again (3 workers). redelivery_ms: from a kill to the survivor's claim of each
            sleep the dead worker held ("redelivered" in the history). Flags (non-restartable
            POSTs the dead worker held) are retried as an operator would. lost: instances that
            did not end; duplicated_non_restartable: POSTs to the sink beyond one per instance
            and operator retry.
scaling     the same number of activities (--scaling-activities, default 2000) run as instances
            of sequences of 5, 50 and 500 noop steps (--scaling-steps): 400, 40 and 4 instances,
            one size after the other, on one stack like throughput's (2 workers), after a
            warm-up. Every size keeps the same number of instances running at once
            (--scaling-in-flight; default: the largest size's count, 4), starting a new one as
            one ends: the batches the services see are then alike, and only the instances'
            length differs (0 starts them all at once; the largest size then runs far fewer at
            once, and its smaller batches cost more per activity in every service, the workers
            included, which never see an instance's state). For each size: activities_per_s as
            throughput computes it, and CPU milliseconds per activity of each service and of
            PostgreSQL (utime + stime from /proc/<pid>/stat, read when the size starts and once
            its instances have ended and the stack's queues are empty). A service counts its
            process and its descendants (the admin's validation pool); processes of one kind
            are summed (`activity-worker` is both workers). `postgres` is the backends of the
            stack's two databases (client backends and autovacuum workers; not the server's
            shared processes, which serve every stack on the machine): pg_stat_activity is read
            twice a second, and each backend counts from its first sighting (from zero when it
            appeared during the size's run) to its last, so a backend that exits loses at most
            half a second; the benchmark's own connection is left out. idle_cpu_ms_per_s: what
            each uses per second with nothing to do (in every size, in proportion to its
            duration). ratio_500_to_5 (named by the sizes): cpu_ms_per_activity of the largest
            size over the smallest's, for each. CPU per activity is far less sensitive than
            wall time to what else the machine runs.
waiting     not in the default list (opt in: --scenarios waiting; the whole default run would
            otherwise take half an hour more): one stack like throughput's (1 scheduler, 2
            workers). Phase 1: --waiting-instances (default 100,000) instances that only wait,
            half a timer (`for` 2 h), half a signal (`go`, timeout 2 h), started over the admin
            API (64 requests in flight; a warm-up tenth, at most 1,000, first); none ends in the
            run. The admin API starts 70-130 a second on this 2-core machine (start_rate_per_s;
            CPU-bound, shared with every other process), so 100,000 take 13-25 minutes (23
            measured with the machine's load average at 7); the scenario takes that plus about
            5 minutes. VmRSS (/proc/<pid>/status, MiB) of each service process (its own, not
            its descendants') before any is started (rss_mib_before), after the warm-up
            (rss_mib_warm), once all are WAITING (rss_mib_after), after --waiting-settle-s more
            (rss_mib_settled), with phase 2's waits started (rss_mib_due) and after they fired
            (rss_mib_after_timers); `postgres` there is the RssAnon (private memory) summed over
            the stack's backends. rss_growth_mib_per_10k: settled minus warm, per 10,000
            instances started after the warm-up; scheduler_rss_mib_by_waiting: [WAITING, the
            scheduler's VmRSS] as they were started (flat memory: the second does not follow
            the first). Phase 2, next to phase 1's waits: --due-timers (default 10,000)
            instances of `wait until T` then a noop, T the same second for all, on the
            database's clock, far enough ahead to start them all at phase 1's rate (1.5 times
            that, plus 5 s; due_lead_s). lateness_p50/p99/max_ms:
            each timer's `wait_ended` history entry's data.lateness_s (fired - due, the
            database's clock); every instance must complete (completed, not_ended,
            timers_started_after_due: waits that began after T, whose lateness would count from
            their start). `starting` and `firing` tell where the time went: CPU ms per instance
            of each service and PostgreSQL's backends, busy cores (CPU time / wall time) and
            cores' worth of time spent runnable waiting for a CPU (/proc/<pid>/task/*/schedstat:
            the machine's load, not the process); for firing also fired_per_s, the outbox
            relay's backlog of due timers (outbox_due_peak; outbox_drained_after_s: all
            published to the commands queue) and the commands queue's peak of ready messages
            (published, not yet delivered to the scheduler).

Each scenario runs a stack of its own (own namespace and databases, dropped afterwards), so it
runs next to `make run`. Progress goes to stderr; stdout carries only the JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
from chaos_api import Api
from effect_sink import Sink
from stack_env import StackEnv, drop_everything, queue_depths

from paceline_contracts.queues import Queue, queue_name
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
        for kind, count in (("scheduler", 1), ("activity-worker", workers), ("reporting", 1)):
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


async def throughput(processes: int, steps: int) -> dict[str, Any]:
    async with running_stack(workers=2, log_name="throughput") as (env, _, api):
        name = f"bench-{uuid.uuid4().hex[:6]}"
        await define(
            api,
            {
                "name": name,
                "inputs": {"n": {"type": "integer"}},
                "steps": [
                    {"id": f"s{i}", "type": "noop", "with": {"n": "${inputs.n}"}}
                    for i in range(steps)
                ],
            },
        )
        say(f"throughput: starting {processes} processes of {steps} steps")
        began = time.monotonic()
        ids = await start_many(api, name, [{"n": i} for i in range(processes)])
        say(f"  started {processes} in {time.monotonic() - began:.1f}s")
        conn = await asyncpg.connect(env.database_url)
        try:
            not_ended = await wait_ended(conn, ids, within_s=600)
            rows = await conn.fetch(
                "SELECT created_at, updated_at FROM instances WHERE id = ANY($1::uuid[]) "
                "AND status = 'COMPLETED'",
                ids,
            )
        finally:
            await conn.close()
    if not_ended or len(rows) != processes:
        raise RuntimeError(f"{processes - len(rows)} of {processes} did not complete")
    first = min(r["created_at"] for r in rows)
    last = max(r["updated_at"] for r in rows)
    latencies = [(r["updated_at"] - r["created_at"]).total_seconds() * 1000 for r in rows]
    return {
        "scenario": "throughput",
        "processes": processes,
        "steps": steps,
        "activities_per_s": round(processes * steps / (last - first).total_seconds(), 1),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
    }


def failover_definition(name: str, sink: Sink) -> dict[str, Any]:
    return {
        "name": name,
        "inputs": {"key": {"type": "string"}},
        "steps": [
            {"id": "nap", "type": "sleep", "with": {"seconds": 2}},
            {
                "id": "push",
                "type": "http.request",
                "with": {"method": "POST", "url": f"{sink.url}/effect/${{inputs.key}}"},
            },
            {"id": "done", "type": "noop"},
        ],
    }


async def held_naps(conn: asyncpg.Connection, ids: list[str]) -> dict[str, list[str]]:
    """Server id -> the instances whose sleep it holds now."""
    rows = await conn.fetch(
        "SELECT instance_id AS id, state->>'claimed_by' AS server FROM activities "
        "WHERE instance_id = ANY($1::uuid[]) AND step = 'nap' AND status = 'RUNNING'",
        ids,
    )
    held: dict[str, list[str]] = {}
    for row in rows:
        if row["server"]:
            held.setdefault(row["server"], []).append(str(row["id"]))
    return held


async def failover(kills: int) -> dict[str, Any]:
    sink = Sink()
    sink.start()
    try:
        async with running_stack(workers=3, log_name="failover") as (env, stack, api):
            name = f"bench-fo-{uuid.uuid4().hex[:6]}"
            await define(api, failover_definition(name, sink))
            conn = await asyncpg.connect(env.database_url)
            try:
                return await _failover(kills, stack, api, conn, name, sink)
            finally:
                await conn.close()
    finally:
        sink.stop()


async def _failover(
    kills: int, stack: Stack, api: Api, conn: asyncpg.Connection, name: str, sink: Sink
) -> dict[str, Any]:
    keys: dict[str, str] = {}
    killed: list[tuple[float, list[str]]] = []
    say(f"failover: {kills} kills of a worker holding restartable sleeps")
    for _ in range(kills):
        batch = [uuid.uuid4().hex[:12] for _ in range(12)]
        ids = await start_many(api, name, [{"key": k} for k in batch])
        keys |= dict(zip(ids, batch, strict=True))
        for _ in range(600):
            if held := await held_naps(conn, ids):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("no sleep was claimed within 30 s")
        server, instances = max(held.items(), key=lambda item: len(item[1]))
        victim = _service_of(stack, server)
        started_before = _ready_lines(stack, victim)
        stack.kill(victim)
        killed.append((time.time(), instances))
        stack.start(victim)  # as a supervisor would; the survivors take the work meanwhile
        # The next kill waits for this one's work to move and the worker to be back: each
        # measures a redelivery to ready survivors, not the start-up of a worker just killed.
        for _ in range(600):
            moved = await conn.fetchval(
                "SELECT count(DISTINCT instance_id) FROM history WHERE kind = 'redelivered' "
                "AND step = 'nap' AND instance_id = ANY($1::uuid[])",
                instances,
            )
            if moved == len(instances) and _ready_lines(stack, victim) > started_before:
                break
            await asyncio.sleep(0.05)
    ids = list(keys)
    retried: Counter[str] = Counter()
    not_ended = await wait_ended(conn, ids, within_s=180, operator=(api, retried))
    delays: list[float] = []
    for at, instances in killed:
        rows = await conn.fetch(
            "SELECT instance_id, min(at) AS at FROM history WHERE instance_id = ANY($1::uuid[]) "
            "AND step = 'nap' AND kind = 'redelivered' GROUP BY instance_id",
            instances,
        )
        delays += [max(0.0, r["at"].timestamp() - at) * 1000 for r in rows]
    posts = sink.posts()
    duplicated = sum(
        max(0, posts.get(f"/effect/{key}", 0) - 1 - retried[i]) for i, key in keys.items()
    )
    say(f"  {len(delays)} redeliveries measured; {sum(retried.values())} flags retried")
    return {
        "scenario": "failover",
        "kills": kills,
        "redelivery_p50_ms": round(percentile(delays, 50), 1),
        "redelivery_p99_ms": round(percentile(delays, 99), 1),
        "lost": not_ended,
        "duplicated_non_restartable": duplicated,
    }


def _ready_lines(stack: Stack, name: str) -> int:
    """How many times the service's log says it became ready (once per start)."""
    try:
        text = stack.services[name].log_path.read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return text.count(" ready: ")


def _service_of(stack: Stack, server_id: str) -> str:
    service = stack.serving(server_id)
    if service is None or not service.alive():
        raise RuntimeError(f"no running service of the stack is {server_id}")
    return service.name


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


async def scaling(sizes: list[int], activities: int, in_flight: int | None) -> dict[str, Any]:
    if in_flight is None:
        in_flight = max(1, activities // sizes[-1])
    async with running_stack(workers=2, log_name="scaling") as (env, stack, api):
        names = {steps: f"bench-sc{steps}-{uuid.uuid4().hex[:6]}" for steps in sizes}
        for steps, name in names.items():
            await define(api, noop_sequence(name, steps))
        conn = await asyncpg.connect(env.database_url)
        try:
            backends = BackendCpu(conn, [env.database, env.reporting_database])
            # Warm up (connection pools, definition caches) before anything is measured.
            warm = await start_many(api, names[sizes[0]], [{"n": i} for i in range(20)])
            if await wait_ended(conn, warm, within_s=120):
                raise RuntimeError("the warm-up instances did not end")
            await settle(env, backends)
            idle = await idle_cpu(stack, backends)
            measured = []
            for steps in sizes:
                measured.append(
                    await _scaling_size(
                        env,
                        stack,
                        api,
                        conn,
                        backends,
                        names[steps],
                        steps,
                        max(1, activities // steps),
                        in_flight,
                    )
                )
        finally:
            await conn.close()
    first, last = measured[0]["cpu_ms_per_activity"], measured[-1]["cpu_ms_per_activity"]
    return {
        "scenario": "scaling",
        "idle_cpu_ms_per_s": idle,
        "sizes": measured,
        f"ratio_{sizes[-1]}_to_{sizes[0]}": {
            k: round(last[k] / first[k], 2) if first[k] else None for k in first
        },
    }


async def run_in_lanes(
    api: Api,
    conn: asyncpg.Connection,
    backends: BackendCpu,
    name: str,
    instances: int,
    in_flight: int,
    within_s: float = 600,
) -> list[str]:
    """Start `instances` instances of `name`, `in_flight` at a time (a new one as soon as one
    ends), and wait until all have ended (or `within_s` has passed); their ids."""
    poll = 0.5 if in_flight >= instances else 0.02
    ids: list[str] = []
    open_: set[str] = set()
    deadline = time.monotonic() + within_s
    last_sampled = last_said = time.monotonic()
    while (len(ids) < instances or open_) and time.monotonic() < deadline:
        if (free := min(in_flight - len(open_), instances - len(ids))) > 0:
            started = await start_many(
                api, name, [{"n": n} for n in range(len(ids), len(ids) + free)]
            )
            ids += started
            open_.update(started)
        await asyncio.sleep(poll)
        ended = await conn.fetch(
            "SELECT id FROM instances WHERE id = ANY($1::uuid[]) AND status = ANY($2)",
            list(open_),
            list(FINAL),
        )
        open_ -= {str(r["id"]) for r in ended}
        if time.monotonic() - last_sampled >= 0.5:
            last_sampled = time.monotonic()
            await backends.sample()
        if time.monotonic() - last_said > 5:
            last_said = time.monotonic()
            say(f"  {len(ids) - len(open_)} of {instances} ended")
    return ids


async def _scaling_size(
    env: StackEnv,
    stack: Stack,
    api: Api,
    conn: asyncpg.Connection,
    backends: BackendCpu,
    name: str,
    steps: int,
    instances: int,
    in_flight: int,
) -> dict[str, Any]:
    say(f"scaling: {instances} instances of {steps} noop steps, {in_flight or 'all'} at a time")
    await backends.start()
    before = service_cpu_ms(stack)
    began = time.monotonic()
    ids = await run_in_lanes(api, conn, backends, name, instances, in_flight or instances)
    elapsed = time.monotonic() - began
    await settle(env, backends)
    after = service_cpu_ms(stack)
    rows = await conn.fetch(
        "SELECT created_at, updated_at FROM instances WHERE id = ANY($1::uuid[]) "
        "AND status = 'COMPLETED'",
        ids,
    )
    ran = await conn.fetchval(
        "SELECT count(*) FROM activities WHERE instance_id = ANY($1::uuid[]) "
        "AND status = 'COMPLETED'",
        ids,
    )
    if len(rows) != instances or ran != instances * steps:
        raise RuntimeError(
            f"{instances - len(rows)} of {instances} instances of {steps} steps did not "
            f"complete ({ran} of {instances * steps} activities)"
        )
    span = (max(r["updated_at"] for r in rows) - min(r["created_at"] for r in rows)).total_seconds()
    used = {kind: after[kind] - before[kind] for kind in SERVICE_KINDS}
    used["postgres"] = backends.used_ms()
    say(f"  {ran} activities in {elapsed:.1f}s")
    return {
        "steps": steps,
        "instances": instances,
        "in_flight": min(in_flight or instances, instances),
        "completed": len(rows),
        "activities": ran,
        "activities_per_s": round(ran / span, 1),
        "cpu_ms_per_activity": {kind: round(ms / ran, 3) for kind, ms in used.items()},
    }


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
        await define(api, {"name": names["t"], "steps": [{"id": "w", "wait": {"for": WAIT_LONG}}]})
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
        "starting": {"loadavg_1m": load, "cpu_ms_per_start": use.per(measured), **use.cores()},
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
        "SELECT count(*) FROM instances WHERE id = ANY($1::uuid[]) AND status = 'COMPLETED'", ids
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


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--scaling-steps", default="5,50,500")
    parser.add_argument("--scaling-activities", type=int, default=2000)
    parser.add_argument("--scaling-in-flight", type=int, default=None)
    parser.add_argument("--waiting-instances", type=int, default=100_000)
    parser.add_argument("--due-timers", type=int, default=10_000)
    parser.add_argument("--waiting-settle-s", type=float, default=30.0)
    parser.add_argument("--scenarios", default="throughput,failover,scaling")
    args = parser.parse_args(argv)
    sizes = sorted(int(n) for n in args.scaling_steps.split(","))
    scenarios = {
        "throughput": lambda: throughput(args.processes, args.steps),
        "failover": lambda: failover(args.kills),
        "scaling": lambda: scaling(sizes, args.scaling_activities, args.scaling_in_flight),
        "waiting": lambda: waiting(args.waiting_instances, args.due_timers, args.waiting_settle_s),
    }
    for scenario in args.scenarios.split(","):
        if scenario not in scenarios:
            parser.error(f"unknown scenario {scenario!r}; known: {', '.join(scenarios)}")
        print(json.dumps(await scenarios[scenario]()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
