"""Starting instances (outbox, command, idempotency) and refusing bad starts."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
from admin_support import as_principal, assert_problem, body_of, create_definition, drain, unique
from aio_pika.abc import AbstractQueue

from paceline_engine.state import InstanceState


async def test_start_records_a_pending_instance_and_sends_its_command(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = unique("start")
    await create_definition(client, name)
    response = await client.post(
        "/v1/instances", json={"definition": name, "inputs": {"host": "db1"}}
    )
    assert response.status_code == 202, response.text
    started = response.json()
    assert started["status"] == "PENDING"
    assert (started["definition"], started["version"]) == (name, 1)
    assert len(started["trace_id"]) == 32 and int(started["trace_id"], 16) != 0
    assert response.headers["location"] == f"/v1/instances/{started['id']}"

    row = await pool.fetchrow("SELECT * FROM instances WHERE id = $1", uuid.UUID(started["id"]))
    assert row["status"] == "PENDING"
    assert (row["definition"], row["version"]) == (name, 1)
    assert row["state"] == InstanceState(inputs={"host": "db1", "count": 1}).document()
    assert (row["started_by"], row["started_how"]) == ("admin", "api")
    assert row["trace_id"] == started["trace_id"]
    assert row["traceparent"].split("-")[1] == started["trace_id"]
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0  # flushed after commit

    [message] = await drain(commands)
    assert body_of(message) == {"type": "instance.start", "v": 1, "instance_id": started["id"]}
    # In the instance's trace: carried by its own producer span, a child of the stored root.
    sent = message.headers["traceparent"].split("-")
    assert sent[1] == started["trace_id"]
    assert sent[2] != row["traceparent"].split("-")[2]


async def test_started_by_names_the_caller_and_a_version_can_be_chosen(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = unique("who")
    await create_definition(client, name)
    await create_definition(client, name)
    older = await client.post(
        "/v1/instances",
        json={"definition": name, "version": 1, "inputs": {"host": "h"}},
        headers=as_principal("alice@example.com"),
    )
    latest = await client.post("/v1/instances", json={"definition": name, "inputs": {"host": "h"}})
    assert (older.json()["version"], latest.json()["version"]) == (1, 2)
    started_by = await pool.fetchval(
        "SELECT started_by FROM instances WHERE id = $1", uuid.UUID(older.json()["id"])
    )
    assert started_by == "alice@example.com"


async def test_bad_inputs_are_refused_with_every_problem(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = unique("inputs")
    await create_definition(client, name)
    response = await client.post(
        "/v1/instances",
        json={"definition": name, "inputs": {"count": "three", "extra": 1, "nul": "a\x00b"}},
    )
    problem = assert_problem(response, 422)
    paths = {e["path"] for e in problem["errors"]}
    assert paths == {"inputs.host", "inputs.count", "inputs.extra", "inputs.nul"}
    assert await pool.fetchval("SELECT count(*) FROM instances WHERE definition = $1", name) == 0
    assert await drain(commands, settle_s=0.05) == []


async def test_unknown_definitions_and_versions_are_404(client: httpx.AsyncClient) -> None:
    name = unique("known")
    await create_definition(client, name)
    unknown = await client.post("/v1/instances", json={"definition": unique("nope")})
    assert "does not exist" in assert_problem(unknown, 404)["detail"]
    no_version = await client.post(
        "/v1/instances", json={"definition": name, "version": 7, "inputs": {"host": "h"}}
    )
    assert "version 7" in assert_problem(no_version, 404)["detail"]


async def test_a_malformed_start_body_is_refused(client: httpx.AsyncClient) -> None:
    extra = await client.post(
        "/v1/instances", json={"definition": "x", "inputs": {}, "surprise": 1, "also": 2}
    )
    assert {e["path"] for e in assert_problem(extra, 422)["errors"]} == {"surprise", "also"}
    broken = await client.post(
        "/v1/instances", content=b'{"definition": ', headers={"Content-Type": "application/json"}
    )
    assert "not valid JSON" in assert_problem(broken, 400)["detail"]
    wrong_types = await client.post("/v1/instances", json={"definition": 5, "inputs": []})
    assert {e["path"] for e in assert_problem(wrong_types, 422)["errors"]} == {
        "definition",
        "inputs",
    }


async def test_an_idempotency_key_makes_a_retry_return_the_same_instance(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = unique("idem")
    await create_definition(client, name)
    key = {"Idempotency-Key": unique("key")}
    request = {"definition": name, "inputs": {"host": "h"}}
    first = await client.post("/v1/instances", json=request, headers=key)
    await pool.execute(
        "UPDATE instances SET status = 'RUNNING' WHERE id = $1", uuid.UUID(first.json()["id"])
    )
    await create_definition(client, name)  # a newer version must not change what a retry is
    retry = await client.post("/v1/instances", json=request, headers=key)
    assert (first.status_code, retry.status_code) == (202, 202)
    assert retry.json()["id"] == first.json()["id"]
    assert retry.json()["status"] == "RUNNING"  # the current status
    assert retry.json()["version"] == 1
    assert retry.headers["idempotent-replayed"] == "true"
    assert await pool.fetchval("SELECT count(*) FROM instances WHERE definition = $1", name) == 1
    assert len(await drain(commands)) == 1


async def test_concurrent_requests_with_one_key_make_one_instance(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = unique("idem-race")
    await create_definition(client, name)
    key = {"Idempotency-Key": unique("key")}
    request = {"definition": name, "inputs": {"host": "h"}}
    responses = await asyncio.gather(
        *(client.post("/v1/instances", json=request, headers=key) for _ in range(6))
    )
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert await pool.fetchval("SELECT count(*) FROM instances WHERE definition = $1", name) == 1
    assert len(await drain(commands)) == 1


async def test_a_key_reused_for_another_request_is_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = unique("reuse")
    await create_definition(client, name)
    key = {"Idempotency-Key": unique("key")}
    await client.post(
        "/v1/instances", json={"definition": name, "inputs": {"host": "a"}}, headers=key
    )
    other_inputs = await client.post(
        "/v1/instances", json={"definition": name, "inputs": {"host": "b"}}, headers=key
    )
    problem = assert_problem(other_inputs, 422)
    assert "different request" in problem["detail"]
    assert problem["type"].endswith("idempotency-key-reused")
    other_version = await client.post(
        "/v1/instances",
        json={"definition": name, "version": 2, "inputs": {"host": "a"}},
        headers=key,
    )
    assert_problem(other_version, 422)
    assert await pool.fetchval("SELECT count(*) FROM instances WHERE definition = $1", name) == 1
    bad_key = await client.post(
        "/v1/instances",
        json={"definition": name, "inputs": {"host": "a"}},
        headers={"Idempotency-Key": "k" * 201},
    )
    assert_problem(bad_key, 422)


async def test_a_start_is_typed_as_strictly_as_its_schema_says(
    client: httpx.AsyncClient, commands: AbstractQueue
) -> None:
    name = unique("strict")
    await create_definition(client, name)
    for version in (True, "1", 1.5, 0, 2**31):
        refused = await client.post(
            "/v1/instances", json={"definition": name, "version": version, "inputs": {"host": "h"}}
        )
        assert [e["path"] for e in assert_problem(refused, 422)["errors"]] == ["version"]
    for inputs in ([], "host=h", None):
        refused = await client.post("/v1/instances", json={"definition": name, "inputs": inputs})
        assert [e["path"] for e in assert_problem(refused, 422)["errors"]] == ["inputs"]
    assert await drain(commands, settle_s=0.05) == []
    # One number in JSON (and in JSON Schema) however written: 1.0 is the version 1.
    started = await client.post(
        "/v1/instances", json={"definition": name, "version": 1.0, "inputs": {"host": "h"}}
    )
    assert started.status_code == 202, started.text
    assert started.json()["version"] == 1
