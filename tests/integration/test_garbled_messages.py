"""A garbled message on any queue is dead-lettered with its reason; the consumer goes on."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import aio_pika
import httpx
import pytest
from stack_env import AMQP_URL, StackEnv

from integration.harness import wait_final
from paceline_contracts.messages import ActivityResult
from paceline_contracts.queues import Queue, dead_queue_name, exchange_name
from paceline_contracts.states import ActivityStatus
from stack import Stack

pytestmark = pytest.mark.integration

GARBAGE = {
    "not json": b"\x00\xffthis is not json{",
    "unknown type": b'{"type": "instance.explode", "v": 1, "instance_id": "x"}',
    "future version": b'{"type": "instance.start", "v": 99, "instance_id":'
    b' "6f9619ff-8b86-d011-b42d-00c04fc964ff"}',
    "wrong shape": b"[1, 2, 3]",
}


async def _take_dead_letters(
    channel: aio_pika.abc.AbstractChannel, name: str, count: int
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    queue = await channel.declare_queue(name, passive=True)
    taken = []
    for _ in range(200):
        message = await queue.get(fail=False, no_ack=False)
        if message is None:
            if len(taken) >= count:
                break
            await asyncio.sleep(0.1)
            continue
        await message.ack()
        taken.append(message)
    return taken


@pytest.mark.parametrize("queue", list(Queue), ids=lambda q: q.value)
async def test_garbled_messages_are_dead_lettered_with_a_reason(
    queue: Queue, env: StackEnv, stack: Stack, api: httpx.AsyncClient
) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name(env.namespace))
        for label, body in GARBAGE.items():
            await exchange.publish(
                aio_pika.Message(body, message_id=label, delivery_mode=2), routing_key=queue.value
            )
        dead = await _take_dead_letters(
            channel, dead_queue_name(env.namespace, queue), len(GARBAGE)
        )
    finally:
        await connection.close()

    by_id = {m.message_id: m for m in dead}
    assert set(by_id) == set(GARBAGE), "every garbled message is kept, none twice"
    for label, body in GARBAGE.items():
        message = by_id[label]
        assert message.body == body, "dead-lettered as it was sent"
        reason = str(message.headers["x-paceline-reason"])
        assert reason.startswith("not a valid"), reason
        assert message.headers["x-paceline-queue"] == queue.value

    # The consumers are still there and still work.
    assert all(s.alive() for s in stack.services.values())
    flow = {
        "name": f"after-garbage-{queue.value}",
        "steps": [{"id": "x", "type": "noop", "with": {"ok": True}}],
    }
    assert (await api.post("/v1/definitions", json=flow)).status_code == 201
    r = await api.post("/v1/instances", json={"definition": flow["name"]})
    instance = (await wait_final(api, [r.json()["id"]]))[r.json()["id"]]
    assert instance["status"] == "COMPLETED"


async def test_a_message_the_scheduler_cannot_apply_fails_its_instance_with_the_reason(
    env: StackEnv, stack: Stack, api: httpx.AsyncClient
) -> None:
    # A well-formed result whose output PostgreSQL cannot store (a NUL in a string): its batch
    # fails whatever is tried, so it is dead-lettered. The instance must not wait for ever for
    # what it would have done: it fails, and says why.
    flow = {
        "name": "unappliable",
        "steps": [{"id": "nap", "type": "sleep", "with": {"seconds": 30}}],
    }
    assert (await api.post("/v1/definitions", json=flow)).status_code == 201
    instance_id = (await api.post("/v1/instances", json={"definition": "unappliable"})).json()["id"]
    for _ in range(100):
        detail = (await api.get(f"/v1/instances/{instance_id}")).json()
        if detail["activities"] and detail["activities"][0]["status"] == "RUNNING":
            break
        await asyncio.sleep(0.1)
    now = datetime.now(UTC)
    result = ActivityResult(
        instance_id=uuid.UUID(instance_id),
        step="nap",
        attempt=1,
        status=ActivityStatus.COMPLETED,
        output={"text": "nul \u0000 here"},
        server_id="a-test",
        started_at=now,
        finished_at=now,
    )
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(exchange_name(env.namespace))
        await exchange.publish(
            aio_pika.Message(result.model_dump_json().encode(), delivery_mode=2),
            routing_key=Queue.RESULTS.value,
        )
        [dead] = await _take_dead_letters(channel, dead_queue_name(env.namespace, Queue.RESULTS), 1)
    finally:
        await connection.close()
    assert "could not apply" in str(dead.headers["x-paceline-reason"])
    instance = (await wait_final(api, [instance_id]))[instance_id]
    assert instance["status"] == "FAILED"
    assert instance["error"]["kind"] == "internal"
    assert "activity.result message could not be applied" in instance["error"]["message"]
    assert "results.dead" in instance["error"]["message"]
    assert all(s.alive() for s in stack.services.values())
