"""The server registry: list (with LOST derived from silence), drain through each server's own
control queue, and remove servers that are gone. No scheduler runs here: the tests insert the
registry rows it would write from heartbeats, and play the servers' control queues."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from admin_support import as_principal, assert_problem, drain, insert_server, next_heartbeat
from aio_pika.abc import AbstractChannel, AbstractQueue
from fastapi import FastAPI

from paceline_contracts.messages import DRAIN
from paceline_contracts.queues import control_exchange_name, control_queue_name
from paceline_contracts.states import ServerKind, ServerStatus

pytestmark = pytest.mark.usefixtures("no_servers")

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def listed(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/servers", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["truncated"] is False
    items: list[dict[str, Any]] = body["items"]
    return items


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [i["id"] for i in items]


@pytest.fixture
async def registry(pool: asyncpg.Pool) -> dict[str, str]:
    """One server of each shape, by what it is."""
    return {
        "draining": await insert_server(
            pool,
            status=ServerStatus.DRAINING,
            started_at=at(0),
            in_flight=[
                {"instance_id": str(uuid.UUID(int=1)), "step": "push", "attempt": 2},
                {"instance_id": str(uuid.UUID(int=2)), "step": "probe", "attempt": 1},
            ],
        ),
        "active": await insert_server(pool, started_at=at(1)),
        # Silent for longer than PACELINE_SERVER_LOST_AFTER_S (20 s): LOST, whatever it said.
        "lost": await insert_server(pool, silent_s=60, started_at=at(2)),
        "lost_draining": await insert_server(
            pool, kind=ServerKind.REPORTING, status=ServerStatus.DRAINING, silent_s=60
        ),
        # DRAINED stays DRAINED however long ago it said so: it stopped on purpose.
        "drained": await insert_server(
            pool, kind=ServerKind.SCHEDULER, status=ServerStatus.DRAINED, silent_s=3600
        ),
    }


async def test_servers_lists_every_server_with_its_status_by_kind_then_start(
    client: httpx.AsyncClient, registry: dict[str, str]
) -> None:
    items = await listed(client)
    assert ids(items) == [
        registry["draining"],  # activity-worker, by start time
        registry["active"],
        registry["lost"],
        registry["lost_draining"],  # reporting
        registry["drained"],  # scheduler
    ]
    assert [i["status"] for i in items] == ["DRAINING", "ACTIVE", "LOST", "LOST", "DRAINED"]
    first = items[0]
    assert first == {
        "id": registry["draining"],
        "kind": "activity-worker",
        "host": "test-host",
        "pid": 4242,
        "status": "DRAINING",
        "started_at": first["started_at"],
        "last_heartbeat": first["last_heartbeat"],
        "in_flight": [
            {"instance_id": str(uuid.UUID(int=1)), "step": "push", "attempt": 2},
            {"instance_id": str(uuid.UUID(int=2)), "step": "probe", "attempt": 1},
        ],
    }
    assert datetime.fromisoformat(first["started_at"]) == at(0)
    age = datetime.now(UTC) - datetime.fromisoformat(first["last_heartbeat"])
    assert timedelta(0) <= age < timedelta(seconds=10)
    assert all(i["in_flight"] == [] for i in items[1:])


async def test_servers_filter_by_kind_and_status(
    client: httpx.AsyncClient, registry: dict[str, str]
) -> None:
    assert ids(await listed(client, kind="scheduler")) == [registry["drained"]]
    assert len(await listed(client, kind="Activity-Worker,reporting")) == 4
    assert await listed(client, kind="admin") == []
    assert ids(await listed(client, status="LOST")) == [registry["lost"], registry["lost_draining"]]
    both = await listed(client, params=None, status=["lost", "drained"])
    assert set(ids(both)) == {registry["lost"], registry["lost_draining"], registry["drained"]}
    assert ids(await listed(client, kind="activity-worker", status="ACTIVE,DRAINING")) == [
        registry["draining"],
        registry["active"],
    ]


async def test_unknown_kinds_and_statuses_are_422_listing_the_known_ones(
    client: httpx.AsyncClient,
) -> None:
    problem = assert_problem(await client.get("/v1/servers", params={"kind": "robot,admin"}), 422)
    assert problem["errors"] == [
        {
            "path": "query.kind",
            "message": "'robot' is not one of scheduler, activity-worker, reporting, admin",
        }
    ]
    problem = assert_problem(
        await client.get("/v1/servers", params={"status": ["GONE", "active", "idle"]}), 422
    )
    assert [e["message"] for e in problem["errors"]] == [
        "'GONE' is not one of ACTIVE, DRAINING, DRAINED, LOST",
        "'idle' is not one of ACTIVE, DRAINING, DRAINED, LOST",
    ]
    assert "ACTIVE, DRAINING, DRAINED, LOST" in problem["detail"]


async def test_malformed_in_flight_entries_are_left_out_not_a_500(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    good = {"instance_id": str(uuid.UUID(int=3)), "step": "a", "attempt": 1}
    server = await insert_server(pool, in_flight=[{"step": "no instance"}, good, "junk"])
    (item,) = await listed(client)
    assert (item["id"], item["in_flight"]) == (server, [good])


async def test_the_admin_reports_itself_as_a_server(
    app: FastAPI, heartbeats: AbstractQueue
) -> None:
    identity = app.state.identity
    await heartbeats.purge()
    beat = await next_heartbeat(heartbeats, lambda b: b.server_id == identity.id)
    assert beat.kind is ServerKind.ADMIN
    assert beat.status is ServerStatus.ACTIVE
    assert (beat.host, beat.pid, beat.started_at) == (
        identity.host,
        os.getpid(),
        identity.started_at,
    )
    assert beat.in_flight == ()
    # One id for the process's app: its next heartbeat has the same one.
    again = await next_heartbeat(heartbeats, lambda b: b.pid == os.getpid() and b.at > beat.at)
    assert again.server_id == identity.id


@pytest.fixture
async def connected(broker: AbstractChannel, app: FastAPI, namespace: str) -> AsyncIterator[Any]:
    """Plays live servers: a control queue bound to the control exchange with the server's id
    as the routing key, exclusive to this connection, as `Presence.open` declares it."""
    queues: list[AbstractQueue] = []

    async def connect(server_id: str) -> AbstractQueue:
        exchange = await broker.get_exchange(control_exchange_name(namespace))
        queue = await broker.declare_queue(
            control_queue_name(namespace, server_id), exclusive=True, auto_delete=True
        )
        await queue.bind(exchange, routing_key=server_id)
        queues.append(queue)
        return queue

    yield connect
    for queue in queues:
        await queue.delete(if_unused=False, if_empty=False)


async def test_drain_sends_a_drain_to_the_server_s_own_queue(
    client: httpx.AsyncClient, pool: asyncpg.Pool, connected: Any
) -> None:
    server = await insert_server(pool)
    other = await insert_server(pool)
    queue, other_queue = await connected(server), await connected(other)

    response = await client.post(f"/v1/servers/{server}/drain")
    assert response.status_code == 202, response.text
    assert response.json() == {"id": server, "status": "ACTIVE", "drain_requested": True}
    (message,) = await drain(queue)
    assert message.type == "server.drain"
    assert message.headers.get("traceparent")
    command = DRAIN.validate_json(message.body)
    assert (command.server_id, command.by) == (server, "admin")
    assert await drain(other_queue) == []


async def test_drain_of_a_draining_server_is_sent_again_with_the_operator(
    client: httpx.AsyncClient, pool: asyncpg.Pool, connected: Any
) -> None:
    server = await insert_server(pool, status=ServerStatus.DRAINING)
    queue = await connected(server)
    response = await client.post(f"/v1/servers/{server}/drain", headers=as_principal("alice@ops"))
    assert response.status_code == 202, response.text
    assert response.json() == {"id": server, "status": "DRAINING", "drain_requested": True}
    (message,) = await drain(queue)
    assert DRAIN.validate_json(message.body).by == "alice@ops"


async def test_drain_of_a_server_without_a_control_queue_is_409_not_connected(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    server = await insert_server(pool)
    problem = assert_problem(await client.post(f"/v1/servers/{server}/drain"), 409)
    assert "not connected" in problem["detail"]
    assert problem["type"].endswith("server-not-connected")
    # The API still works after a returned message (the channel stays usable).
    assert_problem(await client.post(f"/v1/servers/{server}/drain"), 409)


@pytest.mark.parametrize(
    ("status", "silent_s", "shown"),
    [(ServerStatus.DRAINED, 0, "DRAINED"), (ServerStatus.ACTIVE, 60, "LOST")],
)
async def test_drain_of_a_drained_or_lost_server_is_409_and_sends_nothing(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    connected: Any,
    status: ServerStatus,
    silent_s: float,
    shown: str,
) -> None:
    server = await insert_server(pool, status=status, silent_s=silent_s)
    queue = await connected(server)
    problem = assert_problem(await client.post(f"/v1/servers/{server}/drain"), 409)
    assert shown in problem["detail"]
    assert "nothing to drain" in problem["detail"]
    assert await drain(queue) == []


async def test_unknown_servers_are_404(client: httpx.AsyncClient) -> None:
    for response in (
        await client.post("/v1/servers/no-such-server/drain"),
        await client.delete("/v1/servers/no-such-server"),
    ):
        problem = assert_problem(response, 404)
        assert "no-such-server" in problem["detail"]
    assert_problem(await client.post("/v1/servers/%00/drain"), 422)
    assert_problem(await client.delete("/v1/servers/" + "x" * 201), 422)


@pytest.mark.parametrize("status", [ServerStatus.ACTIVE, ServerStatus.DRAINING])
async def test_delete_of_an_active_or_draining_server_is_409(
    client: httpx.AsyncClient, pool: asyncpg.Pool, status: ServerStatus
) -> None:
    server = await insert_server(pool, status=status)
    problem = assert_problem(await client.delete(f"/v1/servers/{server}"), 409)
    assert "drain it first" in problem["detail"]
    assert status.value in problem["detail"]
    assert ids(await listed(client)) == [server]


@pytest.mark.parametrize(
    ("status", "silent_s"),
    [
        (ServerStatus.DRAINED, 0),
        (ServerStatus.ACTIVE, 60),
        (ServerStatus.DRAINING, 60),
    ],
)
async def test_delete_removes_a_drained_or_lost_server(
    client: httpx.AsyncClient, pool: asyncpg.Pool, status: ServerStatus, silent_s: float
) -> None:
    server = await insert_server(pool, status=status, silent_s=silent_s)
    kept = await insert_server(pool)
    response = await client.delete(f"/v1/servers/{server}")
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert ids(await listed(client)) == [kept]
    assert await pool.fetchval("SELECT count(*) FROM servers WHERE id = $1", server) == 0
    assert_problem(await client.delete(f"/v1/servers/{server}"), 404)


async def test_the_server_routes_are_documented(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    listing = schema["paths"]["/v1/servers"]["get"]
    assert listing["security"] == [{"AdminToken": []}]
    assert {p["name"] for p in listing["parameters"]} == {"kind", "status"}
    drain_op = schema["paths"]["/v1/servers/{server_id}/drain"]["post"]
    assert {"202", "401", "404", "409", "422", "503"} <= set(drain_op["responses"])
    assert "application/problem+json" in drain_op["responses"]["409"]["content"]
    remove = schema["paths"]["/v1/servers/{server_id}"]["delete"]
    assert {"204", "404", "409"} <= set(remove["responses"])
    view = schema["components"]["schemas"]["ServerView"]["properties"]
    assert "LOST" in view["status"]["description"]
    assert view["in_flight"]["description"]
