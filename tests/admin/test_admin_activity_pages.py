"""Large instances: `GET /v1/instances/{id}` embeds at most 1,000 activities, and
`GET /v1/instances/{id}/activities` pages through all of them in definition order."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
from admin_support import assert_problem, create_definition, done, insert_instance, unique

from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.state import ActivityState

STEPS = 1205


async def big_instance(client: httpx.AsyncClient, pool: asyncpg.Pool) -> str:
    """An instance of a STEPS-step sequence, every step dispatched; every 100th FAILED, the
    rest COMPLETED; rows stored as the scheduler stores them (with positions), in reverse."""
    name = unique("big")
    await create_definition(
        client, name, {"steps": [{"id": f"s{i:04}", "type": "noop"} for i in range(STEPS)]}
    )
    instance_id, _ = await insert_instance(pool, name, {}, InstanceStatus.RUNNING)
    rows: list[tuple[Any, ...]] = []
    for i in reversed(range(STEPS)):
        activity: ActivityState = done(
            ActivityStatus.FAILED if i % 100 == 0 else ActivityStatus.COMPLETED
        )
        rows.append(
            (
                uuid.UUID(instance_id),
                f"s{i:04}",
                activity.status.value,
                i,
                activity.model_dump(mode="json"),
            )
        )
    await pool.executemany(
        "INSERT INTO activities (instance_id, step, status, position, state)"
        " VALUES ($1, $2, $3, $4, $5::jsonb)",
        rows,
    )
    return instance_id


async def test_the_instance_embeds_the_first_thousand_and_says_so(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    instance_id = await big_instance(client, pool)
    detail = (await client.get(f"/v1/instances/{instance_id}")).json()
    assert [a["step"] for a in detail["activities"]] == [f"s{i:04}" for i in range(1000)]
    assert (detail["activity_count"], detail["activities_truncated"]) == (STEPS, True)


async def test_pages_go_through_every_activity_in_definition_order(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    instance_id = await big_instance(client, pool)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["cursor"] = cursor
        response = await client.get(f"/v1/instances/{instance_id}/activities", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        pages += 1
        seen.extend(a["step"] for a in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == [f"s{i:04}" for i in range(STEPS)]


async def test_pages_filter_by_status(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    instance_id = await big_instance(client, pool)
    response = await client.get(
        f"/v1/instances/{instance_id}/activities", params={"status": "failed", "limit": 500}
    )
    assert response.status_code == 200, response.text
    page = response.json()
    assert [a["step"] for a in page["items"]] == [f"s{i:04}" for i in range(0, STEPS, 100)]
    assert {a["status"] for a in page["items"]} == {"FAILED"}
    assert page["next_cursor"] is None


async def test_bad_requests_are_refused_with_every_problem(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    instance_id = await big_instance(client, pool)
    url = f"/v1/instances/{instance_id}/activities"
    problem = assert_problem(await client.get(url, params={"status": "DONE,NOPE"}), 422)
    assert [e["message"] for e in problem["errors"]] == [
        "'DONE' is not one of " + ", ".join(s.value for s in ActivityStatus),
        "'NOPE' is not one of " + ", ".join(s.value for s in ActivityStatus),
    ]
    assert_problem(await client.get(url, params={"cursor": "not-a-cursor"}), 422)
    assert_problem(await client.get(url, params={"limit": 0}), 422)
    assert_problem(await client.get(f"/v1/instances/{uuid.uuid4()}/activities"), 404)


async def test_a_completed_instance_embeds_the_first_thousand_outputs_and_says_so(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    instance_id = await big_instance(client, pool)
    await pool.execute(
        "UPDATE instances SET status = 'COMPLETED' WHERE id = $1", uuid.UUID(instance_id)
    )
    detail = (await client.get(f"/v1/instances/{instance_id}")).json()
    finished = [f"s{i:04}" for i in range(STEPS) if i % 100 != 0]
    assert list(detail["outputs"]) == finished[:1000]
    assert detail["outputs_truncated"] is True
