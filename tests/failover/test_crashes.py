"""The failover rule under real crashes (DESIGN.md, "The rule, precisely"): SIGKILL."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from effect_sink import Sink
from stack_env import queue_depths

from failover.conftest import (
    StackFactory,
    activity,
    assert_work_queues_empty,
    busy_single_slot_worker,
    define_and_start,
    history,
    post_flow,
    service_of,
    wait_running,
    wait_status,
)
from integration.harness import wait_for
from paceline_contracts.queues import Queue, queue_name

pytestmark = pytest.mark.integration


def _name() -> str:
    return f"f-{uuid.uuid4().hex[:8]}"


async def test_killed_worker_restartable_sleep_completes_on_the_survivor(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack()
    definition = {
        "name": _name(),
        "steps": [
            {"id": "nap", "type": "sleep", "with": {"seconds": 3}},
            {"id": "after", "type": "noop", "with": {"slept": "${steps.nap.output.slept}"}},
        ],
    }
    instance_id = await define_and_start(api, definition)
    held = await wait_running(api, instance_id, "nap")
    dead = held["claimed_by"]
    stack.kill(service_of(stack, dead).name)

    done = await wait_status(api, instance_id, "COMPLETED")
    nap = next(a for a in done["activities"] if a["step"] == "nap")
    assert nap["attempts"] == 2
    assert nap["restartable"] is True
    assert nap["server"] != dead
    events = await history(api, instance_id)
    redelivered = [h for h in events if h["kind"] == "redelivered"]
    assert len(redelivered) == 1
    assert dead in redelivered[0]["reason"]
    assert redelivered[0]["data"]["server"] == dead
    assert [h["kind"] for h in events].count("restarted") == 1
    await assert_work_queues_empty(stack)


async def _flagged_post(
    make_stack: StackFactory,
    effects: Sink,
) -> tuple[object, object, str, str, str]:
    stack, api = await make_stack()
    key = uuid.uuid4().hex[:8]
    instance_id = await define_and_start(api, post_flow(_name(), effects, hold=20), {"key": key})
    held = await wait_running(api, instance_id, "push")
    await wait_for(lambda: effects.count(f"/effect/{key}") == 1, 10, "the POST to arrive")
    dead = held["claimed_by"]
    stack.kill(service_of(stack, dead).name)
    flagged = await wait_status(api, instance_id, "FLAGGED")
    push = next(a for a in flagged["activities"] if a["step"] == "push")
    assert push["status"] == "INTERRUPTED"
    assert push["restartable"] is False
    assert push["flag"]["kind"] == "redelivered"
    assert dead in push["flag"]["reason"]
    assert "attempt 1" in push["flag"]["reason"]
    flags = (await api.get("/v1/flags")).json()["items"]
    assert [(f["instance_id"], f["step"]) for f in flags] == [(instance_id, "push")]
    # The survivor did not run it: the side effect happened once.
    await asyncio.sleep(1)
    assert effects.count(f"/effect/{key}") == 1
    return stack, api, instance_id, key, dead


async def test_killed_worker_non_restartable_post_is_flagged_then_retried(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api, instance_id, key, _ = await _flagged_post(make_stack, effects)
    r = await api.post(
        f"/v1/instances/{instance_id}/activities/push/resolve", json={"action": "retry"}
    )
    assert r.status_code == 202, r.text
    # The operator's retry may repeat the effect: that is the operator's decision. The hold
    # is in the URL, so the retry waits too; then it completes.
    done = await wait_status(api, instance_id, "COMPLETED", timeout=60)
    assert effects.count(f"/effect/{key}") == 2
    push = next(a for a in done["activities"] if a["step"] == "push")
    assert push["attempts"] == 2
    assert push["output"]["json"]["count"] == 2
    kinds = [h["kind"] for h in await history(api, instance_id)]
    assert kinds.index("flagged") < kinds.index("resolved") < kinds.index("instance_completed")
    await assert_work_queues_empty(stack)  # type: ignore[arg-type]


async def test_killed_worker_non_restartable_post_is_flagged_then_skipped(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api, instance_id, key, _ = await _flagged_post(make_stack, effects)
    r = await api.post(
        f"/v1/instances/{instance_id}/activities/push/resolve",
        json={"action": "skip", "output": {"status": 201}},
    )
    assert r.status_code == 202, r.text
    done = await wait_status(api, instance_id, "COMPLETED")
    steps = {a["step"]: a for a in done["activities"]}
    assert steps["push"]["status"] == "SKIPPED"
    assert steps["after"]["output"] == {"pushed": 201}, "later steps see the operator's output"
    assert effects.count(f"/effect/{key}") == 1
    await assert_work_queues_empty(stack)  # type: ignore[arg-type]


async def test_killed_worker_non_restartable_post_is_flagged_then_failed(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api, instance_id, key, _ = await _flagged_post(make_stack, effects)
    r = await api.post(
        f"/v1/instances/{instance_id}/activities/push/resolve", json={"action": "fail"}
    )
    assert r.status_code == 202, r.text
    done = await wait_status(api, instance_id, "FAILED")
    assert done["error"]["kind"] == "operator"
    assert {a["step"] for a in done["activities"]} == {"push"}
    assert effects.count(f"/effect/{key}") == 1
    await assert_work_queues_empty(stack)  # type: ignore[arg-type]


async def test_prefetched_only_non_restartable_runs_on_the_survivor_unflagged(
    make_stack: StackFactory, effects: Sink
) -> None:
    # One worker that runs one activity at a time but holds two messages.
    stack, api, busy, holder = await busy_single_slot_worker(make_stack, prefetch=2, nap_s=30)
    namespace = stack.env["PACELINE_NAMESPACE"]
    key = uuid.uuid4().hex[:8]
    waiting = await define_and_start(api, post_flow(_name(), effects, hold=0), {"key": key})

    async def held_unacked() -> bool:
        # Both messages are with the worker: none ready in the queue.
        depths = await queue_depths(namespace)
        return (
            depths.get(queue_name(namespace, Queue.ACTIVITIES)) == 2
            and (await activity(api, waiting, "push")).get("status") == "SCHEDULED"
        )

    await wait_for(held_unacked, 15, "the second message to be prefetched")
    await asyncio.sleep(0.5)
    assert effects.count(f"/effect/{key}") == 0
    stack.kill(service_of(stack, holder).name)
    stack.add("activity-worker")  # the survivor

    done = await wait_status(api, waiting, "COMPLETED")
    push = next(a for a in done["activities"] if a["step"] == "push")
    assert push["attempts"] == 1
    assert push["flag"] is None
    assert effects.count(f"/effect/{key}") == 1
    kinds = [h["kind"] for h in await history(api, waiting)]
    assert "flagged" not in kinds
    claimed = [h for h in await history(api, waiting) if h["kind"] == "claimed"]
    assert "never started before" in claimed[0]["reason"]
    # The busy one was restartable: it restarts on the survivor.
    nap = await wait_running(api, busy, "nap")
    assert nap["attempts"] == 2
    await api.post(f"/v1/instances/{busy}/cancel")
    await wait_status(api, busy, "CANCELLED")
