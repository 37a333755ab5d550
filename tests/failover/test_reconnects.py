"""A worker whose connection drops keeps running what it runs, and runs it once."""

from __future__ import annotations

import uuid

import pytest
from effect_sink import Sink

from failover.conftest import (
    StackFactory,
    assert_work_queues_empty,
    close_connection_of,
    define_and_start,
    history,
    needs_rabbitmqctl,
    post_flow,
    rabbitmqctl,
    wait_running,
    wait_status,
)
from integration.harness import wait_for

pytestmark = [pytest.mark.integration, needs_rabbitmqctl]


async def test_dropped_connection_does_not_stop_or_repeat_the_activity(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api = await make_stack(workers=[{}])  # one worker: the message can only come back
    key = uuid.uuid4().hex[:8]
    definition = post_flow(f"blip-{uuid.uuid4().hex[:6]}", effects, hold=6, then_noop=False)
    instance_id = await define_and_start(api, definition, {"key": key})
    worker_id = (await wait_running(api, instance_id, "push"))["claimed_by"]
    await wait_for(lambda: effects.count(f"/effect/{key}") == 1, 10, "the POST to arrive")

    await close_connection_of(worker_id)

    done = await wait_status(api, instance_id, "COMPLETED", timeout=60)
    push = done["activities"][0]
    assert push["attempts"] == 1
    assert push["server"] == worker_id
    assert push["output"]["status"] == 200, "the request was not cancelled by the drop"
    assert effects.count(f"/effect/{key}") == 1, "and it ran once"
    kinds = [h["kind"] for h in await history(api, instance_id)]
    assert "flagged" not in kinds
    assert "redelivered" not in kinds
    await assert_work_queues_empty(stack)


async def test_broker_consumer_timeout_does_not_cut_long_activities() -> None:
    # deploy/ensure-services.sh (run by `make test` and `make run`) raises it on this broker.
    setting = await rabbitmqctl("eval", "application:get_env(rabbit, consumer_timeout).")
    value = int(setting.strip().removeprefix("{ok,").removesuffix("}"))
    assert value >= 24 * 3600 * 1000
