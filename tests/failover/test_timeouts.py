"""A hung activity past its step timeout is handled by its restartability."""

from __future__ import annotations

import signal
import uuid

import pytest

from failover.conftest import (
    StackFactory,
    assert_work_queues_empty,
    define_and_start,
    history,
    service_of,
    wait_running,
    wait_status,
)

pytestmark = pytest.mark.integration


async def test_restartable_hung_activity_gets_new_attempts_then_times_out(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack()
    instance_id = await define_and_start(
        api,
        {
            "name": f"slow-{uuid.uuid4().hex[:6]}",
            "steps": [{"id": "hang", "type": "sleep", "with": {"seconds": 60}, "timeout": "1s"}],
        },
    )
    done = await wait_status(api, instance_id, "FAILED", timeout=60)
    hang = done["activities"][0]
    # The crash budget (3) bounds the new attempts a time-out earns.
    assert hang["status"] == "TIMED_OUT"
    assert hang["attempts"] == 3
    kinds = [h["kind"] for h in await history(api, instance_id)]
    assert kinds.count("activity_timed_out") == 3
    assert kinds.count("retry_scheduled") == 2
    await assert_work_queues_empty(stack)


async def test_non_restartable_hung_activity_is_flagged(make_stack: StackFactory) -> None:
    stack, api = await make_stack()
    instance_id = await define_and_start(
        api,
        {
            "name": f"stuck-{uuid.uuid4().hex[:6]}",
            "steps": [
                {
                    "id": "hang",
                    "type": "shell.command",
                    "with": {"argv": ["sleep", "60"]},
                    "timeout": "1s",
                }
            ],
        },
    )
    flagged = await wait_status(api, instance_id, "FLAGGED", timeout=30)
    hang = flagged["activities"][0]
    assert hang["status"] == "INTERRUPTED"
    assert hang["attempts"] == 1
    assert hang["flag"]["kind"] == "timeout"
    assert "not restartable" in hang["flag"]["reason"]
    await assert_work_queues_empty(stack)


async def test_scheduler_times_out_an_attempt_whose_worker_hangs(
    make_stack: StackFactory,
) -> None:
    # The worker freezes, so only the scheduler's own timer (timeout + 2 s grace) can notice
    # before the heartbeats do: the restartable attempt is fenced and runs again elsewhere.
    # The sleep is long enough that the freeze always lands while it runs. A prefetch of one:
    # holding attempt 1, the frozen worker cannot be handed attempt 2 as well (it would wait,
    # unstarted and so without a deadline, until the broker's 60 s heartbeats gave up on it).
    hung = {"PACELINE_AMQP_HEARTBEAT_S": "60", "PACELINE_WORKER_CONCURRENCY": "1"}
    stack, api = await make_stack(workers=[hung, {}])
    frozen = stack.of_kind("activity-worker")[0]
    other = stack.of_kind("activity-worker")[1]
    stack.signal(other.name, signal.SIGSTOP)  # so the first attempt lands on `frozen`
    try:
        instance_id = await define_and_start(
            api,
            {
                "name": f"hung-{uuid.uuid4().hex[:6]}",
                "steps": [{"id": "nap", "type": "sleep", "with": {"seconds": 8}, "timeout": "10s"}],
            },
        )
        held = await wait_running(api, instance_id, "nap")
        assert service_of(stack, held["claimed_by"]).name == frozen.name
    finally:
        stack.signal(other.name, signal.SIGCONT)
    stack.signal(frozen.name, signal.SIGSTOP)
    try:
        done = await wait_status(api, instance_id, "COMPLETED", timeout=60)
    finally:
        stack.signal(frozen.name, signal.SIGCONT)
    nap = done["activities"][0]
    assert nap["attempts"] == 2
    assert service_of(stack, nap["server"]).name == other.name
    events = await history(api, instance_id)
    timed_out = [h for h in events if h["kind"] == "activity_timed_out"]
    assert len(timed_out) == 1
    assert "sent no result within its timeout" in timed_out[0]["reason"]
