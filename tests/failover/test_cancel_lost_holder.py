"""A cancel waits for what runs; when the worker that holds it is lost meanwhile (frozen: the
broker gives its message to another worker, which knows of the cancel and drops it), the cancel
ends, but the instance must not claim that nothing ran: the holder may have started it."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from effect_sink import Sink

from failover.conftest import (
    StackFactory,
    assert_work_queues_empty,
    effect_path,
    history,
    post_command,
    service_of,
    start_flow,
    step_of,
    wait_running,
    wait_status,
)
from integration.harness import wait_for

pytestmark = pytest.mark.integration


async def test_a_cancel_whose_holder_is_lost_says_the_outcome_is_unknown(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api = await make_stack()
    path = effect_path()
    # Non-restartable: a POST 20 s from now, unless its worker stops it first.
    script = f"sleep 20; {post_command(effects.url + path)}"
    instance_id = await start_flow(
        api,
        "lost",
        [{"id": "run", "type": "shell.command", "with": {"argv": ["sh", "-c", script]}}],
    )
    holder = (await wait_running(api, instance_id, "run"))["claimed_by"]
    started = time.monotonic()
    worker = service_of(stack, holder)
    os.kill(worker.pid, signal.SIGSTOP)  # frozen: it can neither stop the shell nor report
    try:
        answer = await api.post(f"/v1/instances/{instance_id}/cancel")
        assert answer.status_code == 202, answer.text
        assert answer.json()["status"] == "CANCELLING"
        waiting = (await api.get(f"/v1/instances/{instance_id}")).json()["cancel"]["waiting_for"]
        assert [(w["step"], w["server"]) for w in waiting] == [("run", holder)]
        # About three AMQP heartbeats later the broker gives up on the frozen worker, and the
        # other worker, told of the cancel, drops the message without starting it.
        body = await wait_status(api, instance_id, "CANCELLED", timeout=60)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    run = step_of(body, "run")
    assert run["status"] == "CANCELLED"
    assert f"its holder {holder} lost attempt 1" in run["reason"], run
    assert "outcome unknown" in run["reason"], run
    assert "before it started" not in run["reason"], run
    assert run["error"]["outcome_unknown"] is True, run
    assert run["server"] == holder, "the server shown is the one that may have run it"

    # Resumed, the holder hears of the cancel and stops its shell: the POST never comes, and
    # its own report (it had started) is recorded.
    async def holder_reported() -> bool:
        return any(
            h["kind"] == "activity_cancelled"
            and h["reason"].startswith(f"attempt 1 was stopped by {holder}")
            for h in await history(api, instance_id)
        )

    await wait_for(holder_reported, 60, "the resumed holder to report its stop")
    assert "after it had started" in next(
        h["reason"]
        for h in await history(api, instance_id)
        if h["reason"].startswith(f"attempt 1 was stopped by {holder}")
    )
    await asyncio.sleep(max(0.0, started + 22 - time.monotonic()))  # past the script's 20 s
    assert effects.count(path) == 0, "the cancelled shell command still POSTed"
    await assert_work_queues_empty(stack)
