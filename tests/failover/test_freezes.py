"""Frozen workers (SIGSTOP): found by heartbeats, and their late results kept, not applied
twice."""

from __future__ import annotations

import signal
import time
import uuid

import pytest
from effect_sink import Sink

from failover.conftest import (
    StackFactory,
    assert_work_queues_empty,
    define_and_start,
    history,
    post_flow,
    service_of,
    wait_running,
    wait_status,
)
from integration.harness import wait_for

pytestmark = pytest.mark.integration


async def test_frozen_worker_restartable_work_moves_and_its_late_result_is_kept(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack()
    instance_id = await define_and_start(
        api,
        {
            "name": f"nap-{uuid.uuid4().hex[:6]}",
            "steps": [{"id": "nap", "type": "sleep", "with": {"seconds": 4}}],
        },
    )
    frozen_id = (await wait_running(api, instance_id, "nap"))["claimed_by"]
    frozen = service_of(stack, frozen_id)
    stack.signal(frozen.name, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        done = await wait_status(api, instance_id, "COMPLETED", timeout=60)
        moved_after = time.monotonic() - frozen_at
    finally:
        stack.signal(frozen.name, signal.SIGCONT)
    nap = next(a for a in done["activities"] if a["step"] == "nap")
    assert nap["attempts"] == 2
    assert nap["server"] != frozen_id
    # Heartbeats are 2 s: a few of them, plus the 4 s sleep on the survivor.
    assert moved_after < 30

    async def late_result_recorded() -> list[dict] | None:
        late = [h for h in await history(api, instance_id) if h["kind"] == "late_result"]
        return late or None

    late = await wait_for(late_result_recorded, 30, "the frozen worker's late result")
    assert frozen_id in late[0]["reason"]
    assert late[0]["attempt"] == 1
    after = (await api.get(f"/v1/instances/{instance_id}")).json()
    assert after["status"] == "COMPLETED"
    assert [a["attempts"] for a in after["activities"]] == [2], "not applied twice"
    kinds = [h["kind"] for h in await history(api, instance_id)]
    assert kinds.count("activity_completed") == 1
    assert kinds.count("instance_completed") == 1
    assert frozen.alive(), "the frozen worker came back and carries on"
    await assert_work_queues_empty(stack)


async def test_flag_resolves_itself_when_the_original_worker_reports_success(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api = await make_stack()
    key = uuid.uuid4().hex[:8]
    # The server holds the POST for 12 s: long enough to freeze its caller mid-request and
    # for the broker to give up on it.
    definition = post_flow(f"blip-{uuid.uuid4().hex[:6]}", effects, hold=12, then_noop=False)
    instance_id = await define_and_start(api, definition, {"key": key})
    frozen_id = (await wait_running(api, instance_id, "push"))["claimed_by"]
    await wait_for(lambda: effects.count(f"/effect/{key}") == 1, 10, "the POST to arrive")
    frozen = service_of(stack, frozen_id)
    stack.signal(frozen.name, signal.SIGSTOP)
    try:
        flagged = await wait_status(api, instance_id, "FLAGGED", timeout=40)
    finally:
        stack.signal(frozen.name, signal.SIGCONT)
    push = next(a for a in flagged["activities"] if a["step"] == "push")
    assert push["flag"]["kind"] == "redelivered"
    assert frozen_id in push["flag"]["reason"]

    done = await wait_status(api, instance_id, "COMPLETED", timeout=60)
    push = next(a for a in done["activities"] if a["step"] == "push")
    assert push["attempts"] == 1
    assert push["server"] == frozen_id
    assert push["output"]["status"] == 200
    assert effects.count(f"/effect/{key}") == 1, "never run twice"
    resolved = [h for h in await history(api, instance_id) if h["kind"] == "resolved"]
    assert len(resolved) == 1
    assert "resolves itself" in resolved[0]["reason"]
    await assert_work_queues_empty(stack)


async def test_a_delivery_read_after_its_connection_died_is_not_run(
    make_stack: StackFactory, effects: Sink
) -> None:
    # The only worker is frozen as a restartable POST is sent: the broker pushes it into the
    # frozen worker's socket, gives up on the worker after a few missed heartbeats, and hands
    # it to a second worker, which runs it. Woken, the first worker reads the stale copy: it
    # must not run it again (a restartable step may run twice, but never for nothing).
    stack, api = await make_stack(workers=[{}])
    (frozen,) = stack.of_kind("activity-worker")
    key = uuid.uuid4().hex[:8]
    definition = {
        "name": f"stale-{uuid.uuid4().hex[:6]}",
        "steps": [
            {
                "id": "push",
                "type": "http.request",
                "restartable": True,
                "with": {"method": "POST", "url": f"{effects.url}/effect/{key}"},
            }
        ],
    }
    stack.signal(frozen.name, signal.SIGSTOP)
    try:
        instance_id = await define_and_start(api, definition)
        survivor = stack.add("activity-worker")
        done = await wait_status(api, instance_id, "COMPLETED", timeout=60)
        assert service_of(stack, done["activities"][0]["server"]).name == survivor.name
    finally:
        stack.signal(frozen.name, signal.SIGCONT)
    assert effects.count(f"/effect/{key}") == 1

    def stale_copy_handled() -> bool:
        dropped = "its delivery's channel closed" in frozen.log_path.read_text(errors="replace")
        return dropped or effects.count(f"/effect/{key}") > 1

    await wait_for(stale_copy_handled, 30, "the woken worker to drop its stale copy")
    assert effects.count(f"/effect/{key}") == 1, "the stale copy ran"
    assert frozen.alive(), "the woken worker carries on"
    await assert_work_queues_empty(stack)
