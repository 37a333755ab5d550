"""Flags tell the truth: what a flag says of its holder (alive? may it still finish?), why it
was raised (a drain's deadline), and that an operator's decision is taken once."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import httpx
import pytest
from effect_sink import Sink

from failover.conftest import (
    StackFactory,
    activity,
    as_principal,
    assert_work_queues_empty,
    close_connection_of,
    define_and_start,
    history,
    needs_rabbitmqctl,
    post_flow,
    service_of,
    sleep_until,
    wait_running,
    wait_settled,
    wait_status,
)
from integration.harness import wait_for

pytestmark = pytest.mark.integration


async def _resolve(
    api: httpx.AsyncClient, instance_id: str, step: str, body: dict, by: str | None = None
) -> httpx.Response:
    return await api.post(
        f"/v1/instances/{instance_id}/activities/{step}/resolve",
        json=body,
        headers=as_principal(api, by) if by else None,
    )


@needs_rabbitmqctl
async def test_flag_after_a_connection_blip_shows_the_holder_alive_and_resolves_by_itself(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api = await make_stack()  # two workers: the other one gets the redelivery
    key = uuid.uuid4().hex[:8]
    path = f"/effect/{key}"
    # Held long enough for the holder to reconnect and heartbeat while it still runs.
    hold = 20
    definition = post_flow(f"blip-{uuid.uuid4().hex[:6]}", effects, hold=hold, then_noop=False)
    instance_id = await define_and_start(api, definition, {"key": key})
    holder = (await wait_running(api, instance_id, "push"))["claimed_by"]
    await wait_for(lambda: effects.count(path) == 1, 10, "the POST to arrive")
    (arrived,) = effects.arrivals(path)

    await close_connection_of(holder)

    flagged = await wait_settled(api, instance_id, "FLAGGED", timeout=30)
    push = next(a for a in flagged["activities"] if a["step"] == "push")
    assert push["flag"]["kind"] == "redelivered"
    assert holder in push["flag"]["reason"]
    assert push["flag"]["server"] == holder
    # The other worker got the message back from the broker, and its claim raised the flag.
    (lost,) = [h for h in await history(api, instance_id) if h["kind"] == "redelivered"]
    assert lost["data"]["server"] == holder
    assert lost["data"]["to"] != holder
    assert service_of(stack, lost["data"]["to"]).kind == "activity-worker"

    async def holder_back() -> dict | None:
        flag = (await activity(api, instance_id, "push")).get("flag") or {}
        seen = flag.get("holder") or {}
        return seen if seen.get("may_still_finish") else None

    seen = await wait_for(holder_back, 30, "the holder to heartbeat again, still running it")
    assert time.time() < arrived + hold, "the POST ended before the test could look"
    assert seen["server_id"] == holder
    assert seen["alive_since_flag"] is True
    assert seen["lists_attempt_in_flight"] is True
    assert seen["status"] == "ACTIVE"

    r = await _resolve(api, instance_id, "push", {"action": "retry"}, by="ops-ann")
    assert r.status_code == 409, r.text
    problem = r.json()
    assert problem["type"].endswith("holder-alive"), problem
    assert '"force": true' in problem["detail"], problem
    assert holder in problem["detail"], problem

    # The original request ends: its result resolves the flag by itself.
    done = await wait_status(api, instance_id, "COMPLETED", timeout=60)
    push = next(a for a in done["activities"] if a["step"] == "push")
    assert push["status"] == "COMPLETED"
    assert push["attempts"] == 1
    assert push["server"] == holder
    assert push["flag"] is None
    assert push["output"]["status"] == 200
    assert push["reason"] is None or (
        "flag" not in push["reason"] and "may have started" not in push["reason"]
    ), push["reason"]
    assert effects.count(path) == 1, "never run twice"
    events = await history(api, instance_id)
    resolved = [h for h in events if h["kind"] == "resolved"]
    assert len(resolved) == 1, resolved
    assert "resolves itself" in resolved[0]["reason"]
    assert not any("ops-ann" in h["reason"] for h in events), "the refused retry was not applied"
    await assert_work_queues_empty(stack)


async def test_drain_deadline_flags_a_running_post_and_restarts_a_running_sleep(
    make_stack: StackFactory, effects: Sink
) -> None:
    # Both activities run on a worker whose drain gives them 2 s.
    stack, api = await make_stack(workers=[{"PACELINE_WORKER_GRACE_S": "2"}])
    (draining,) = stack.of_kind("activity-worker")
    key = uuid.uuid4().hex[:8]
    path = f"/effect/{key}"
    poster = await define_and_start(
        api, post_flow(f"cut-{uuid.uuid4().hex[:6]}", effects, hold=10), {"key": key}
    )
    sleeper = await define_and_start(
        api,
        {
            "name": f"nap-{uuid.uuid4().hex[:6]}",
            "steps": [{"id": "nap", "type": "sleep", "with": {"seconds": 10}}],
        },
    )
    holder = (await wait_running(api, poster, "push"))["claimed_by"]
    assert (await wait_running(api, sleeper, "nap"))["claimed_by"] == holder
    await wait_for(lambda: effects.count(path) == 1, 10, "the POST to arrive")
    survivor = stack.add("activity-worker")
    stack.signal(draining.name, signal.SIGTERM)

    flagged = await wait_settled(api, poster, "FLAGGED", timeout=30)
    push = next(a for a in flagged["activities"] if a["step"] == "push")
    assert push["status"] == "INTERRUPTED"
    assert push["flag"]["kind"] == "drain_deadline"
    reason = push["flag"]["reason"]
    assert holder in reason and "attempt 1" in reason, reason
    assert "the drain cut it" in reason and "grace deadline" in reason, reason

    done = await wait_settled(api, sleeper, "COMPLETED", timeout=60)
    nap = done["activities"][0]
    assert nap["status"] == "COMPLETED"
    assert nap["attempts"] == 2
    assert nap["flag"] is None
    assert service_of(stack, nap["server"]).name == survivor.name
    events = await history(api, sleeper)
    kinds = [h["kind"] for h in events]
    assert "flagged" not in kinds
    (cut,) = [h for h in events if h["kind"] == "activity_interrupted"]
    assert "the drain cut it" in cut["reason"] and cut["attempt"] == 1
    (again,) = [h for h in events if h["kind"] == "retry_scheduled"]
    assert again["attempt"] == 2 and "after the drain cut it" in again["reason"]

    await wait_for(lambda: not draining.alive(), 30, "the drained worker to exit")
    assert draining.process is not None and draining.process.returncode == 0
    (arrived,) = effects.arrivals(path)
    await sleep_until(arrived + 10 + 2)
    assert effects.count(path) == 1, "the cut POST was run again"
    assert (await api.get(f"/v1/instances/{poster}")).json()["status"] == "FLAGGED"
    await assert_work_queues_empty(stack)


async def _race(api: httpx.AsyncClient, instance_id: str, effects: Sink, path: str) -> None:
    """Send a retry (ops-ann) and a skip (ops-ben) of the flag at the same moment; check that
    exactly one applies."""
    # Two idle connections first, so that neither request waits for a TCP connect.
    await asyncio.gather(*(api.get(f"/v1/instances/{instance_id}") for _ in range(2)))
    answers = await asyncio.gather(
        _resolve(api, instance_id, "push", {"action": "retry"}, by="ops-ann"),
        _resolve(api, instance_id, "push", {"action": "skip", "output": {"ok": 1}}, by="ops-ben"),
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [202, 409], [r.text for r in answers]
    winner = next(r for r in answers if r.status_code == 202).json()
    loser = next(r for r in answers if r.status_code == 409).json()
    first = "ops-ann chose retry" if winner["action"] == "retry" else "ops-ben chose skip"
    assert loser["type"].endswith("already-resolved"), loser
    assert first in loser["detail"], loser

    done = await wait_status(api, instance_id, "COMPLETED", timeout=60)
    got = done["activities"][0]
    if winner["action"] == "retry":
        assert got["status"] == "COMPLETED" and got["attempts"] == 2
        expected_posts = 2
    else:
        assert got["status"] == "SKIPPED" and got["output"] == {"ok": 1}
        expected_posts = 1
    await asyncio.sleep(2)
    events = await history(api, instance_id)
    resolved = [h for h in events if h["kind"] == "resolved"]
    assert len(resolved) == 1, resolved
    assert resolved[0]["reason"] == first
    other = "ops-ben" if winner["action"] == "retry" else "ops-ann"
    assert not any(other in h["reason"] for h in events), events
    assert effects.count(path) == expected_posts


async def test_two_resolves_at_the_same_moment_exactly_one_applies(
    make_stack: StackFactory, first_held_effects: Sink
) -> None:
    effects = first_held_effects
    stack, api = await make_stack()
    # Three flags, each raced once: the closer the two requests, the likelier they meet in the
    # database rather than one seeing the other's committed decision.
    flagged = {}
    for _ in range(3):
        path = f"/effect/{uuid.uuid4().hex[:8]}"
        # Sent, no answer within its 1 s: flagged, outcome unknown (the worker reported it).
        push = {
            "id": "push",
            "type": "http.request",
            "with": {"method": "POST", "url": f"{effects.url}{path}?hold=4", "timeout": 1},
        }
        name = f"twice-{uuid.uuid4().hex[:6]}"
        flagged[await define_and_start(api, {"name": name, "steps": [push]})] = path
    for instance_id in flagged:
        await wait_settled(api, instance_id, "FLAGGED", timeout=60)
    for instance_id, path in flagged.items():
        await _race(api, instance_id, effects, path)
    await assert_work_queues_empty(stack)
