"""Reading instances (one, a filtered page, history) and cancelling them."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
from admin_support import assert_problem, body_of, create_definition, drain, unique
from aio_pika.abc import AbstractQueue

THREE_STEPS = {
    "steps": [
        {"id": "zeta_first", "type": "noop"},
        {"id": "b", "type": "sleep", "with": {"seconds": 1}},
        {"id": "a_third", "type": "noop"},
    ]
}


async def start(client: httpx.AsyncClient, name: str, **inputs: Any) -> str:
    response = await client.post("/v1/instances", json={"definition": name, "inputs": inputs})
    assert response.status_code == 202, response.text
    instance_id: str = response.json()["id"]
    return instance_id


async def test_one_instance_shows_its_activities_in_definition_order(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = unique("detail")
    await create_definition(client, name, THREE_STEPS)
    instance_id = await start(client, name)
    state = {
        "status": "RUNNING",
        "inputs": {},
        "started_at": "2030-01-02T03:04:05Z",
    }
    activities = {
            "a_third": {"type": "noop", "status": "SCHEDULED", "attempt": 1, "restartable": True},
            "zeta_first": {
                "type": "noop", "status": "COMPLETED", "attempt": 1, "restartable": True,
                "server_id": "worker-1", "started_at": "2030-01-02T03:04:06Z",
                "finished_at": "2030-01-02T03:04:07Z", "output": {"x": 1},
            },
            "b": {
                "type": "sleep", "status": "INTERRUPTED", "attempt": 2, "restartable": False,
                "server_id": "worker-2", "error": {"kind": "lost", "message": "server died"},
                "reason": "worker-2 was lost during attempt 2", "isolated": True,
                "crashes": [
                    {"attempt": 1, "server_id": "worker-1", "since": "2030-01-02T03:04:05Z",
                     "detected_at": "2030-01-02T03:04:09Z", "alone": False},
                    {"attempt": 2, "server_id": None, "detected_at": "2030-01-02T03:05:00Z",
                     "alone": True},
                ],
            },
    }  # fmt: skip
    await pool.execute(
        "UPDATE instances SET status = 'FLAGGED', state = $2::jsonb WHERE id = $1",
        uuid.UUID(instance_id), state,
    )  # fmt: skip
    # Rows without a position, as carried over from the single-document layout.
    await pool.executemany(
        "INSERT INTO activities (instance_id, step, status, state) VALUES ($1, $2, $3, $4::jsonb)",
        [(uuid.UUID(instance_id), k, v["status"], v) for k, v in activities.items()],
    )
    detail = (await client.get(f"/v1/instances/{instance_id}")).json()
    assert detail["status"] == "FLAGGED"  # the row's column, not the document's
    assert detail["started_at"].startswith("2030-01-02T03:04:05")
    assert detail["outputs"] is None, "outputs once it completes"
    assert (detail["activity_count"], detail["activities_truncated"]) == (3, False)
    assert detail["inputs"] == {}
    assert detail["started_by"] == "admin"
    assert [a["step"] for a in detail["activities"]] == ["zeta_first", "b", "a_third"]
    first, second, third = detail["activities"]
    assert first["server"] == "worker-1"
    assert first["output"] == {"x": 1}
    assert first["started_at"].startswith("2030-01-02T03:04:06")
    assert second == {
        "step": "b", "type": "sleep", "status": "INTERRUPTED", "restartable": False,
        "attempts": 2, "server": "worker-2", "started_at": None, "finished_at": None,
        "output": None,
        "error": {"kind": "lost", "message": "server died", "outcome_unknown": False},
        "reason": "worker-2 was lost during attempt 2",
        "claimed_by": None, "interruptions": 0, "flag": None, "isolated": True,
        "crashes": [
            {"attempt": 1, "server_id": "worker-1", "since": "2030-01-02T03:04:05Z",
             "detected_at": "2030-01-02T03:04:09Z", "alone": False},
            {"attempt": 2, "server_id": None, "since": None,
             "detected_at": "2030-01-02T03:05:00Z", "alone": True},
        ],
    }  # fmt: skip
    assert (first["isolated"], first["crashes"]) == (False, [])
    assert detail["cancel"] is None
    assert third["status"] == "SCHEDULED"


async def test_unknown_and_malformed_ids(client: httpx.AsyncClient) -> None:
    unknown = uuid.uuid4()
    for suffix in ("", "/history"):
        assert_problem(await client.get(f"/v1/instances/{unknown}{suffix}"), 404)
        assert_problem(await client.get(f"/v1/instances/not-a-uuid{suffix}"), 422)
    assert_problem(await client.post(f"/v1/instances/{unknown}/cancel"), 404)
    assert_problem(await client.post("/v1/instances/12345/cancel"), 422)


async def test_list_filters_and_pages_newest_first(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = unique("list")
    await create_definition(client, name, THREE_STEPS)
    ids = [await start(client, name) for _ in range(7)]
    pages: list[list[str]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"definition": name, "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/v1/instances", params=params)).json()
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == ids[::-1]
    item = page["items"][0]
    assert "activities" not in item
    assert (item["definition"], item["status"], item["started_how"]) == (name, "PENDING", "api")

    await pool.execute(
        "UPDATE instances SET status = 'RUNNING' WHERE id = ANY($1::uuid[])", ids[:2]
    )
    await pool.execute("UPDATE instances SET status = 'FAILED' WHERE id = $1", uuid.UUID(ids[2]))

    async def listed(**params: Any) -> list[str]:
        response = await client.get("/v1/instances", params={"definition": name, **params})
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert await listed(status="RUNNING") == [ids[1], ids[0]]
    assert await listed(status="running,failed") == [ids[2], ids[1], ids[0]]
    assert await listed(status=["FAILED", "PENDING"]) == [ids[6], ids[5], ids[4], ids[3], ids[2]]
    assert await listed(status="COMPLETED") == []
    assert await listed(definition=unique("other")) == []
    bad = await client.get("/v1/instances", params={"status": ["DONE", "RUNNING", "nope"]})
    assert len(assert_problem(bad, 422)["errors"]) == 2
    assert_problem(await client.get("/v1/instances", params={"cursor": "bm90IGpzb24"}), 422)
    assert_problem(await client.get("/v1/instances", params={"limit": 0}), 422)


async def test_cancel_sends_the_command_unless_the_instance_has_ended(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = unique("cancel")
    await create_definition(client, name, THREE_STEPS)
    running, ended = await start(client, name), await start(client, name)
    await pool.execute("UPDATE instances SET status = 'RUNNING' WHERE id = $1", uuid.UUID(running))
    await pool.execute("UPDATE instances SET status = 'COMPLETED' WHERE id = $1", uuid.UUID(ended))
    await drain(commands)  # the two start commands

    response = await client.post(f"/v1/instances/{running}/cancel")
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer == {
        "id": running,
        "status": "RUNNING",
        "cancel": {
            "by": "admin",
            "reason": "cancelled by an operator",
            "requested_at": answer["cancel"]["requested_at"],
        },
        "waiting_for": [],
        "cancel_requested": True,
    }
    [message] = await drain(commands)
    command = body_of(message)
    assert (command["type"], command["instance_id"]) == ("instance.cancel", running)
    assert command["by"] == "admin"
    assert str(message.headers["traceparent"]).startswith("00-")
    assert uuid.UUID(message.message_id)

    problem = assert_problem(await client.post(f"/v1/instances/{ended}/cancel"), 409)
    assert "COMPLETED" in problem["detail"]
    assert await drain(commands, settle_s=0.05) == []


# As the engine records a redelivery: which server held the attempt, and who got it next.
SERVERS = {"server": "worker-2", "since": "2030-01-02T03:04:05Z", "to": "worker-3", "delivery": 2}


async def test_history_lists_events_in_order(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    name = unique("history")
    await create_definition(client, name, THREE_STEPS)
    instance_id = await start(client, name)
    assert (await client.get(f"/v1/instances/{instance_id}/history")).json() == {
        "items": [],
        "next_cursor": None,
    }
    await pool.executemany(
        "INSERT INTO history (instance_id, kind, step, attempt, reason, data)"
        " VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
        [
            (uuid.UUID(instance_id), "instance.started", None, None, "started", {}),
            (uuid.UUID(instance_id), "activity.flagged", "b", 2, "worker-2 lost", SERVERS),
        ],
    )
    events = (await client.get(f"/v1/instances/{instance_id}/history")).json()["items"]
    assert [(e["kind"], e["step"], e["attempt"], e["reason"], e["data"]) for e in events] == [
        ("instance.started", None, None, "started", {}),
        ("activity.flagged", "b", 2, "worker-2 lost", SERVERS),
    ]
    assert events[0]["id"] < events[1]["id"] and events[0]["at"]


async def test_the_history_pages_in_order(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    name = unique("paged-history")
    await create_definition(client, name, THREE_STEPS)
    instance_id = await start(client, name)
    await pool.executemany(
        "INSERT INTO history (instance_id, kind, step, reason) VALUES ($1, 'dispatched', $2, $3)",
        [(uuid.UUID(instance_id), f"s{i}", f"event {i}") for i in range(5)],
    )
    url = f"/v1/instances/{instance_id}/history"
    everything = (await client.get(url)).json()
    assert everything["next_cursor"] is None
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(url, params=params)).json()
        assert len(page["items"]) <= 2
        seen += [e["id"] for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [e["id"] for e in everything["items"]]
    assert len(seen) >= 5
    assert_problem(await client.get(url, params={"cursor": "not-a-cursor"}), 422)
