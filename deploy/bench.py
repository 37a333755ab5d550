"""`make bench`: what a stack does on this machine, as one JSON object a line (CONTRACT.md).

    python deploy/bench.py [--processes 2000] [--steps 5] [--kills 20]
                           [--scenarios throughput,failover]

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

Each scenario runs a stack of its own (own namespace and databases, dropped afterwards), so it
runs next to `make run`. Progress goes to stderr; stdout carries only the JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from effect_sink import Sink
from stack_env import StackEnv, drop_everything

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
        "SELECT id, state->'activities'->'nap'->>'claimed_by' AS server FROM instances "
        "WHERE id = ANY($1::uuid[]) AND state->'activities'->'nap'->>'status' = 'RUNNING'",
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


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--scenarios", default="throughput,failover")
    args = parser.parse_args(argv)
    scenarios = {
        "throughput": lambda: throughput(args.processes, args.steps),
        "failover": lambda: failover(args.kills),
    }
    for scenario in args.scenarios.split(","):
        if scenario not in scenarios:
            parser.error(f"unknown scenario {scenario!r}; known: {', '.join(scenarios)}")
        print(json.dumps(await scenarios[scenario]()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
