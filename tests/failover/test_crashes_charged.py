"""Crashes are charged to their cause (DESIGN.md): when a worker dies, what it held are
suspects, charged only for crashes while running alone; so a poison activity is quarantined
and its healthy neighbours complete, on a pool of workers that `make run` keeps restarting.
(test_poison.py covers one worker with healthy sleeps.)"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import httpx
import pytest
from effect_sink import Sink

from failover.conftest import (
    StackFactory,
    assert_work_queues_empty,
    define_and_start,
    history,
    poison_flow,
    post_flow,
    reviving,
    wait_running,
    wait_settled,
    wait_status,
)
from integration.harness import wait_for

pytestmark = pytest.mark.integration

_CRASH = re.compile(r"attempt (\d+) on (\S+) \(held since [^,]+, lost at [^,]+, (alone|among)")


async def _start_many(api: httpx.AsyncClient, definition: str, n: int) -> list[str]:
    answers = await asyncio.gather(
        *(api.post("/v1/instances", json={"definition": definition}) for _ in range(n))
    )
    for r in answers:
        assert r.status_code == 202, r.text
    return [r.json()["id"] for r in answers]


async def _settle_all(api: httpx.AsyncClient, ids: list[str], timeout: float) -> dict[str, dict]:
    """Wait until every instance has ended or is FLAGGED; returns each as the API shows it."""
    settled: dict[str, dict] = {}

    async def all_settled() -> bool:
        for instance_id in ids:
            if instance_id not in settled:
                body = (await api.get(f"/v1/instances/{instance_id}")).json()
                if body["status"] in ("COMPLETED", "FAILED", "CANCELLED", "FLAGGED"):
                    settled[instance_id] = body
        return len(settled) == len(ids)

    await wait_for(all_settled, timeout, f"{len(ids)} instances to end")
    return settled


async def _define(api: httpx.AsyncClient, definition: dict) -> None:
    r = await api.post("/v1/definitions", json=definition)
    assert r.status_code == 201, r.text


def _check_poison_flag(boom: dict) -> None:
    assert boom["status"] == "INTERRUPTED"
    flag = boom["flag"]
    assert flag["kind"] == "crash_budget", flag
    reason = flag["reason"]
    assert "crash budget exhausted" in reason, reason
    crashes = _CRASH.findall(reason)
    # Each crash is named: its attempt, the server that held it, and whether it ran alone.
    alone = [c for c in crashes if c[2] == "alone"]
    assert len(alone) == 3, reason
    assert all(server.startswith("activity-worker") for _, server, _ in crashes), reason
    assert len({attempt for attempt, _, _ in alone}) == 3, "three attempts, each charged once"


async def test_healthy_neighbours_of_a_poison_complete_unflagged_on_two_workers(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api = await make_stack()  # two workers
    async with reviving(stack):
        healthy_flow = {
            "name": f"fine-{uuid.uuid4().hex[:6]}",
            "steps": [
                {"id": "nap", "type": "sleep", "with": {"seconds": 2}},
                {"id": "read", "type": "http.request", "with": {"url": f"{effects.url}/read"}},
            ],
        }
        poisoned_flow = poison_flow()
        await _define(api, healthy_flow)
        await _define(api, poisoned_flow)
        healthy = await _start_many(api, healthy_flow["name"], 6)
        (poison,) = await _start_many(api, poisoned_flow["name"], 1)
        flagged = await wait_settled(api, poison, "FLAGGED", timeout=180)
        done = await _settle_all(api, healthy, timeout=180)

    assert sum(s.restarts for s in stack.of_kind("activity-worker")) >= 1, "no worker died"
    assert {b["status"] for b in done.values()} == {"COMPLETED"}, done
    shared = 0
    for instance_id, body in done.items():
        for a in body["activities"]:
            assert a["status"] == "COMPLETED" and a["flag"] is None, (instance_id, a)
        kinds = [h["kind"] for h in await history(api, instance_id)]
        assert "flagged" not in kinds, (instance_id, kinds)
        shared += "redelivered" in kinds
    assert shared >= 1, "no healthy activity was running when the poison took its worker down"
    assert effects.gets() >= 6

    boom = next(a for a in flagged["activities"] if a["step"] == "boom")
    _check_poison_flag(boom)
    await assert_work_queues_empty(stack)


async def test_non_restartable_neighbour_of_a_poison_is_flagged_redelivered_not_crash_budget(
    make_stack: StackFactory, effects: Sink
) -> None:
    # One worker, restarted when it dies: the POST shares the poison's first crash.
    stack, api = await make_stack(workers=[{}])
    async with reviving(stack):
        key = uuid.uuid4().hex[:8]
        path = f"/effect/{key}"
        neighbour = await define_and_start(
            api, post_flow(f"post-{uuid.uuid4().hex[:6]}", effects, hold=10), {"key": key}
        )
        holder = (await wait_running(api, neighbour, "push"))["claimed_by"]
        await wait_for(lambda: effects.count(path) == 1, 10, "the POST to arrive")
        poison = await define_and_start(api, poison_flow())
        post_flagged = await wait_settled(api, neighbour, "FLAGGED", timeout=90)
        poison_flagged = await wait_settled(api, poison, "FLAGGED", timeout=180)

    push = next(a for a in post_flagged["activities"] if a["step"] == "push")
    assert push["status"] == "INTERRUPTED"
    assert push["flag"]["kind"] == "redelivered"
    assert holder in push["flag"]["reason"]
    assert "may have started" in push["flag"]["reason"]
    _check_poison_flag(next(a for a in poison_flagged["activities"] if a["step"] == "boom"))

    # Still flagged as it was: the poison's quarantine charged nothing to it.
    body = (await api.get(f"/v1/instances/{neighbour}")).json()
    push = next(a for a in body["activities"] if a["step"] == "push")
    assert push["flag"]["kind"] == "redelivered"
    assert not push["isolated"]
    assert all(not c["alone"] for c in push["crashes"]), push["crashes"]
    events = await history(api, neighbour)
    flags = [h for h in events if h["kind"] == "flagged"]
    assert [h["data"]["flag"] for h in flags] == ["redelivered"], flags
    assert not any("crash budget" in h["reason"] for h in events), events
    (arrived,) = effects.arrivals(path)
    await asyncio.sleep(max(0.0, arrived + 10 + 2 - time.time()))
    assert effects.count(path) == 1, "the flagged POST was run again"

    r = await api.post(
        f"/v1/instances/{neighbour}/activities/push/resolve",
        json={"action": "skip", "output": {"status": 200}},
    )
    assert r.status_code == 202, r.text
    await wait_status(api, neighbour, "COMPLETED", timeout=60)
    await assert_work_queues_empty(stack)
