"""The `events.in` queue, consumed by a real scheduler process: an event published there is
recorded with the instances it starts, which run to the end; a repeat starts nothing; a
malformed message, or one whose key was used for another event, is dead-lettered with its
reason and the consumer goes on."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from stack_env import AMQP_URL, StackEnv

from integration.harness import wait_final, wait_for
from paceline_contracts.queues import Queue, dead_queue_name, exchange_name
from stack import Stack

pytestmark = pytest.mark.integration


def flow(name: str, kind: str) -> dict[str, Any]:
    """Started by events of type `kind` whose site is par1; its step shows what it saw."""
    return {
        "name": name,
        "inputs": {"host": {"type": "string"}},
        "steps": [
            {
                "id": "seen",
                "type": "noop",
                "with": {
                    "host": "${inputs.host}",
                    "kind": "${trigger.kind}",
                    "event": "${trigger.event.id}",
                    "source": "${trigger.event.source}",
                },
            }
        ],
        "triggers": [
            {
                "id": "on_event",
                "event": kind,
                "when": "trigger.event.data.site == 'par1'",
                "inputs": {"host": "${trigger.event.data.host}"},
            }
        ],
    }


async def publish(
    channel: AbstractChannel,
    env: StackEnv,
    body: bytes | dict[str, Any],
    *,
    message_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> None:
    exchange = await channel.get_exchange(exchange_name(env.namespace))
    await exchange.publish(
        aio_pika.Message(
            body if isinstance(body, bytes) else json.dumps(body).encode(),
            message_id=message_id,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=Queue.EVENTS_IN.value,
    )


async def instances_of(api: httpx.AsyncClient, name: str) -> list[dict[str, Any]]:
    response = await api.get("/v1/instances", params={"definition": name})
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


async def wait_instances(api: httpx.AsyncClient, name: str, count: int) -> list[dict[str, Any]]:
    async def enough() -> list[dict[str, Any]] | None:
        found = await instances_of(api, name)
        return found if len(found) >= count else None

    return list(await wait_for(enough, 30, f"{count} instance(s) of {name}"))


async def take_dead(
    channel: AbstractChannel, env: StackEnv, ids: set[str]
) -> dict[str, AbstractIncomingMessage]:
    """The messages with these ids from events.in.dead (each acked: nothing stays there)."""
    queue = await channel.declare_queue(
        dead_queue_name(env.namespace, Queue.EVENTS_IN), passive=True
    )
    found: dict[str, AbstractIncomingMessage] = {}

    async def all_found() -> bool:
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            await message.ack()
            if message.message_id in ids:
                found[message.message_id] = message
        return found.keys() == ids

    await wait_for(all_found, 30, f"{len(ids)} dead-lettered events")
    return found


@pytest.fixture
async def channel() -> Any:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def test_an_event_on_the_queue_starts_its_instance_which_completes(
    env: StackEnv, stack: Stack, api: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    kind, name = f"device.found.{uuid.uuid4().hex[:8]}", f"on-queue-{uuid.uuid4().hex[:8]}"
    assert (await api.post("/v1/definitions", json=flow(name, kind))).status_code == 201
    event = {
        "type": kind,
        "id": "ev-1",
        "source": "inventory",
        "data": {"site": "par1", "host": "sw1"},
    }
    message_id = f"msg-{uuid.uuid4()}"

    await publish(channel, env, event, message_id=message_id)

    [summary] = await wait_instances(api, name, 1)
    instance = (await wait_final(api, [summary["id"]]))[summary["id"]]
    assert instance["status"] == "COMPLETED"
    assert instance["outputs"]["seen"] == {
        "host": "sw1",
        "kind": "event",
        "event": "ev-1",
        "source": "inventory",
    }
    assert summary["started_how"] == "event"
    assert summary["started_by"].startswith("event:")
    event_id = summary["started_by"].removeprefix("event:")
    shown = (await api.get(f"/v1/events/{event_id}")).json()
    assert shown["received_via"] == "amqp" and shown["received_by"] == "amqp:events.in"
    assert shown["type"] == kind and shown["data"] == event["data"]
    assert [(s["outcome"], s["instance_id"], s["status"]) for s in shown["instances"]] == [
        ("started", summary["id"], "COMPLETED")
    ]

    # The same message again (its message id is its key) starts nothing; so does the event
    # under an idempotency-key header that was its key before. A new one starts a second.
    await publish(channel, env, event, message_id=message_id)
    await publish(channel, env, event, headers={"idempotency-key": message_id})
    await publish(channel, env, {**event, "id": "ev-2"}, message_id=f"msg-{uuid.uuid4()}")
    await wait_instances(api, name, 2)
    await asyncio.sleep(0.5)
    assert len(await instances_of(api, name)) == 2, "a repeated event started an instance"

    # One the trigger's `when` refuses is recorded, and starts nothing.
    await publish(channel, env, {**event, "id": "ev-3", "data": {"site": "ams1", "host": "sw9"}})
    await publish(channel, env, {**event, "id": "ev-4"})
    await wait_instances(api, name, 3)
    assert all(i["status"] != "FAILED" for i in await instances_of(api, name))


async def test_garbled_events_are_dead_lettered_with_a_reason_and_the_consumer_goes_on(
    env: StackEnv, stack: Stack, api: httpx.AsyncClient, channel: AbstractChannel
) -> None:
    kind, name = f"device.found.{uuid.uuid4().hex[:8]}", f"after-garble-{uuid.uuid4().hex[:8]}"
    assert (await api.post("/v1/definitions", json=flow(name, kind))).status_code == 201
    key = f"key-{uuid.uuid4()}"
    await publish(
        channel, env, {"type": kind, "data": {"site": "x"}}, headers={"idempotency-key": key}
    )
    garbage: dict[str, tuple[bytes | dict[str, Any], dict[str, Any] | None, str]] = {
        "not-json": (b"\x00\xffnot json{", None, "not a valid event"),
        "no-type": ({"id": "1", "data": {}}, None, "type"),
        "bad-type": ({"type": "has space"}, None, "type"),
        "extra": ({"type": kind, "data": {}, "v": 1}, None, "v"),
        "nested-nul": ({"type": kind, "data": {"a": ["\u0000"]}}, None, "data.a[0]"),
        "big-int": ({"type": kind, "data": {"n": 2**70}}, None, "data.n"),
        "too-big": ({"type": kind, "data": "x" * 70_000}, None, "larger than"),
        "reused-key": (
            {"type": kind, "data": {"site": "y"}},
            {"idempotency-key": key},
            "already used",
        ),
    }
    ids = {label: f"{label}-{uuid.uuid4().hex[:8]}" for label in garbage}
    for label, (body, headers, _) in garbage.items():
        await publish(channel, env, body, message_id=ids[label], headers=headers)

    dead = await take_dead(channel, env, set(ids.values()))

    for label, (body, _, why) in garbage.items():
        message = dead[ids[label]]
        reason = str(message.headers["x-paceline-reason"])
        assert why in reason, (label, reason)
        assert message.headers["x-paceline-queue"] == "events.in"
        if isinstance(body, bytes):
            assert message.body == body, "dead-lettered as it was sent"
    assert str(dead[ids["no-type"]].headers["x-paceline-reason"]).startswith("not a valid event")

    # The consumer still works.
    assert all(s.alive() for s in stack.services.values())
    await publish(channel, env, {"type": kind, "data": {"site": "par1", "host": "h"}})
    [summary] = await wait_instances(api, name, 1)
    assert (await wait_final(api, [summary["id"]]))[summary["id"]]["status"] == "COMPLETED"
