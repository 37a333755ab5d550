"""`make bench`: what a stack does on this machine, as one JSON object a line (CONTRACT.md).

    python deploy/bench.py [--processes 2000] [--steps 5] [--kills 20]
                           [--scaling-steps 5,50,500] [--scaling-activities 2000]
                           [--scaling-in-flight N]
                           [--waiting-instances 100000] [--due-timers 10000]
                           [--waiting-settle-s 30]
                           [--trigger-schedules 1000] [--trigger-seconds 60]
                           [--trigger-events 10000]
                           [--scenarios throughput,failover,scaling,triggers]

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
triggers    schedules and events (deploy/bench_triggers.py has the details): --trigger-schedules
            schedules (default 1,000) firing every second for --trigger-seconds (60), one noop
            each: fire_lateness_p50/p99/max_ms from the fire ledger (instance created minus the
            fire's due instant), fires against fires_expected, fires_started_per_s, and
            instances_per_s (running them); then --trigger-events (10,000) events posted 64 at a
            time, each starting one instance: events_accepted_per_s, event_answer_p50/p99_ms.

Each scenario runs a stack of its own (own namespace and databases, dropped afterwards), so it
runs next to `make run`. Progress goes to stderr; stdout carries only the JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from typing import Any

import asyncpg
from bench_common import define, percentile, running_stack, say, start_many, wait_ended
from bench_scaling import scaling
from bench_triggers import triggers
from bench_waiting import waiting
from chaos_api import Api
from effect_sink import Sink

from stack import Stack


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
    parser.add_argument("--trigger-schedules", type=int, default=1000)
    parser.add_argument("--trigger-seconds", type=int, default=60)
    parser.add_argument("--trigger-events", type=int, default=10_000)
    parser.add_argument("--scenarios", default="throughput,failover,scaling,triggers")
    args = parser.parse_args(argv)
    sizes = sorted(int(n) for n in args.scaling_steps.split(","))
    scenarios = {
        "throughput": lambda: throughput(args.processes, args.steps),
        "failover": lambda: failover(args.kills),
        "scaling": lambda: scaling(sizes, args.scaling_activities, args.scaling_in_flight),
        "waiting": lambda: waiting(args.waiting_instances, args.due_timers, args.waiting_settle_s),
        "triggers": lambda: triggers(
            args.trigger_schedules, args.trigger_seconds, args.trigger_events
        ),
    }
    for scenario in args.scenarios.split(","):
        if scenario not in scenarios:
            parser.error(f"unknown scenario {scenario!r}; known: {', '.join(scenarios)}")
        print(json.dumps(await scenarios[scenario]()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
