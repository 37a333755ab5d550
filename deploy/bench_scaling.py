"""The `scaling` scenario of `make bench` (see bench.py): CPU per activity at 5, 50 and 500
steps."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
from bench_common import (
    FINAL,
    SERVICE_KINDS,
    BackendCpu,
    define,
    idle_cpu,
    noop_sequence,
    running_stack,
    say,
    service_cpu_ms,
    settle,
    start_many,
    wait_ended,
)
from chaos_api import Api
from stack_env import StackEnv

from stack import Stack


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
    first, last = (
        measured[0]["cpu_ms_per_activity"],
        measured[-1]["cpu_ms_per_activity"],
    )
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
