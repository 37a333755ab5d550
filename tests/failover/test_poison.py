"""A message that takes its worker down on every delivery is quarantined, not looped."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from stack_env import AMQP_URL

from failover.conftest import (
    StackFactory,
    assert_work_queues_empty,
    define_and_start,
    history,
    revive_until,
    wait_status,
)
from paceline_contracts.queues import Queue, dead_queue_name

pytestmark = pytest.mark.integration


async def test_poison_activity_is_quarantined_after_the_crash_budget(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack()
    reviving = asyncio.Event()
    supervisor = asyncio.create_task(revive_until(stack, reviving))
    try:
        poison = await define_and_start(
            api,
            {
                "name": f"poison-{uuid.uuid4().hex[:6]}",
                "steps": [
                    # Kills the worker that runs it: its parent process.
                    {
                        "id": "boom",
                        "type": "shell.command",
                        "restartable": True,
                        "with": {"argv": ["sh", "-c", "kill -9 $PPID; sleep 5"]},
                    },
                ],
            },
        )
        flagged = await wait_status(api, poison, "FLAGGED", timeout=90)
        healthy = await define_and_start(
            api,
            {
                "name": f"fine-{uuid.uuid4().hex[:6]}",
                "steps": [{"id": "ok", "type": "noop", "with": {"fine": True}}],
            },
        )
        await wait_status(api, healthy, "COMPLETED")
    finally:
        reviving.set()
        await supervisor

    boom = next(a for a in flagged["activities"] if a["step"] == "boom")
    assert boom["status"] == "INTERRUPTED"
    assert boom["flag"]["kind"] == "crash_budget"
    assert "crash budget exhausted" in boom["flag"]["reason"]
    # Three deliveries crashed a worker each; the fourth was quarantined.
    assert sum(s.restarts for s in stack.of_kind("activity-worker")) == 3
    events = await history(api, poison)
    kinds = [h["kind"] for h in events]
    assert kinds.count("restarted") == 2, [(h["kind"], h["reason"]) for h in events]
    assert kinds.count("flagged") == 1, events

    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        dead = await channel.declare_queue(
            dead_queue_name(stack.env["PACELINE_NAMESPACE"], Queue.ACTIVITIES), passive=True
        )
        message = await dead.get(timeout=5)
        await message.ack()
        assert "crash budget exhausted" in str(message.headers["x-paceline-reason"])
        assert str(poison) in message.body.decode()
    finally:
        await connection.close()
    await assert_work_queues_empty(stack)
