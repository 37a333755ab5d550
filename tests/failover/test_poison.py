"""A message that takes its worker down is charged to its cause: suspects run alone, in an
isolated runner, before anything is charged; the poison is quarantined, its neighbours complete
(DESIGN.md, "Crashes are charged to their cause")."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from stack_env import queue_depths

from failover.conftest import (
    StackFactory,
    assert_work_queues_empty,
    define_and_start,
    history,
    poison_flow,
    reviving,
    wait_status,
)
from integration.harness import wait_final
from paceline_contracts.queues import Queue, dead_queue_name

pytestmark = pytest.mark.integration


async def test_poison_is_quarantined_and_its_neighbours_complete(
    make_stack: StackFactory,
) -> None:
    # One worker, restarted when it dies (as `make run` does): every healthy activity shares
    # each crash with the poison.
    stack, api = await make_stack(workers=[{}])
    async with reviving(stack):
        healthy_flow = {
            "name": f"fine-{uuid.uuid4().hex[:6]}",
            "steps": [{"id": "nap", "type": "sleep", "with": {"seconds": 3}}],
        }
        assert (await api.post("/v1/definitions", json=healthy_flow)).status_code == 201
        healthy = []
        for _ in range(5):
            r = await api.post("/v1/instances", json={"definition": healthy_flow["name"]})
            assert r.status_code == 202, r.text
            healthy.append(r.json()["id"])
        await asyncio.sleep(0.5)  # the sleeps are running when the poison takes the worker
        poison = await define_and_start(api, poison_flow())
        flagged = await wait_status(api, poison, "FLAGGED", timeout=120)
        done = await wait_final(api, healthy, timeout=120)

    assert {b["status"] for b in done.values()} == {"COMPLETED"}, done
    for body in done.values():
        (nap,) = body["activities"]
        assert nap["flag"] is None and nap["status"] == "COMPLETED"

    boom = next(a for a in flagged["activities"] if a["step"] == "boom")
    assert boom["status"] == "INTERRUPTED"
    assert boom["flag"]["kind"] == "crash_budget"
    reason = boom["flag"]["reason"]
    assert "crash budget exhausted" in reason
    # The reason names the crashes: each attempt, where, alone or not.
    assert reason.count("alone, in an isolated runner") == 3, reason
    assert "among others" in reason, reason
    # Two worker deaths made it a suspect; then its isolated runner died three times, charged.
    assert sum(s.restarts for s in stack.of_kind("activity-worker")) == 2
    kinds = [h["kind"] for h in await history(api, poison)]
    assert kinds.count("isolated") == 1, kinds
    assert kinds.count("activity_interrupted") == 3, kinds
    assert kinds.count("flagged") == 1, kinds

    # Nothing was dead-lettered behind the engine's back.
    namespace = stack.env["PACELINE_NAMESPACE"]
    depths = await queue_depths(namespace)
    for q in (Queue.ACTIVITIES, Queue.SUSPECTS):
        assert depths.get(dead_queue_name(namespace, q), 0) == 0, depths
    await assert_work_queues_empty(stack)
