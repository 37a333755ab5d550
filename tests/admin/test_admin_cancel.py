"""Cancelling an instance: recorded once with who asked, sent to the scheduler and broadcast to
every worker in one transaction; the answer waits for the scheduler to record it, and the
instance shows what the cancel still waits for.

No scheduler runs here: the tests write the state documents it would write."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from admin_support import (
    Broadcasts,
    as_principal,
    assert_problem,
    body_of,
    create_definition,
    done,
    drain,
    insert_instance,
    running,
    unique,
)
from aio_pika.abc import AbstractQueue

from paceline_admin import cancelling
from paceline_contracts.messages import ActivityError
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.state import ActivityState, CancelRequest
from paceline_infra import outbox

JSON = {"Content-Type": "application/json"}
STEPS = {
    "steps": [
        {"id": "first", "type": "noop"},
        {"id": "second", "type": "noop"},
        {"id": "third", "type": "noop"},
    ]
}


async def instance(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    status: InstanceStatus = InstanceStatus.RUNNING,
    activities: dict[str, ActivityState] | None = None,
    **extra: Any,
) -> tuple[str, str]:
    """An instance as the scheduler left it: `first` done, `second` running on worker-3."""
    name = unique("cancel")
    await create_definition(client, name, STEPS)
    if activities is None:
        activities = {"first": done(), "second": running("worker-3", attempt=2)}
    return await insert_instance(pool, name, activities, status, **extra)


def cancel_url(instance_id: str) -> str:
    return f"/v1/instances/{instance_id}/cancel"


async def requests_of(pool: asyncpg.Pool, instance_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT by, reason, requested_at FROM cancel_requests WHERE instance_id = $1",
        uuid.UUID(instance_id),
    )
    return rows


async def record_as_the_scheduler(
    pool: asyncpg.Pool,
    instance_id: str,
    status: InstanceStatus,
    activities: dict[str, ActivityState],
    by: str,
) -> None:
    """What the scheduler writes when it records the cancel."""
    cancel = CancelRequest(by=by, reason="from the command", requested_at=datetime.now(UTC))
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE instances SET status = $2,"
            " state = jsonb_set(jsonb_set(state, '{status}', to_jsonb($2::text)),"
            " '{cancel}', $3::jsonb) WHERE id = $1",
            uuid.UUID(instance_id),
            status.value,
            cancel.model_dump(mode="json"),
        )
        await conn.executemany(
            "INSERT INTO activities (instance_id, step, status, state)"
            " VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT (instance_id, step)"
            " DO UPDATE SET status = excluded.status, state = excluded.state",
            [
                (uuid.UUID(instance_id), step, a.status.value, a.model_dump(mode="json"))
                for step, a in activities.items()
            ],
        )


async def test_cancel_records_who_asked_and_sends_the_command_and_the_broadcast(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    broadcasts: Broadcasts,
) -> None:
    instance_id, trace_id = await instance(client, pool)
    response = await client.post(
        cancel_url(instance_id),
        json={"reason": "wrong host"},
        headers=as_principal("alice@example.com"),
    )
    assert response.status_code == 202, response.text
    answer = response.json()
    [row] = await requests_of(pool, instance_id)
    assert (row["by"], row["reason"]) == ("alice@example.com", "wrong host")
    assert answer == {
        "id": instance_id,
        "status": "RUNNING",  # no scheduler recorded it within the wait
        "cancel": {
            "by": "alice@example.com",
            "reason": "wrong host",
            "requested_at": answer["cancel"]["requested_at"],
        },
        "waiting_for": [],
        "cancel_requested": True,
    }
    assert datetime.fromisoformat(answer["cancel"]["requested_at"]) == row["requested_at"]

    [message] = await drain(commands)
    assert body_of(message) == {
        "type": "instance.cancel",
        "v": 1,
        "instance_id": instance_id,
        "reason": "wrong host",
        "by": "alice@example.com",
    }
    # The cancel is a span in the instance's own trace.
    assert str(message.headers["traceparent"]).split("-")[1] == trace_id
    [(broadcast, raw)] = await broadcasts(instance_id)
    assert (broadcast.by, broadcast.at) == ("alice@example.com", row["requested_at"])
    assert raw.type == "instance.cancelled"
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0  # both flushed


async def test_the_admin_token_s_principal_is_admin(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id, _ = await instance(client, pool, InstanceStatus.PENDING, {})
    response = await client.post(cancel_url(instance_id))  # no body at all
    assert response.status_code == 202, response.text
    cancel = response.json()["cancel"]
    assert (cancel["by"], cancel["reason"]) == ("admin", "cancelled by an operator")
    [row] = await requests_of(pool, instance_id)
    assert row["by"] == "admin"
    [message] = await drain(commands)
    assert body_of(message)["by"] == "admin"


async def test_the_command_and_the_broadcast_commit_with_the_request(
    client: httpx.AsyncClient, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_id, _ = await instance(client, pool)

    async def no_flush(*_: Any) -> None:  # as if the admin died right after the commit
        return None

    with monkeypatch.context() as patch:
        patch.setattr(outbox, "flush", no_flush)
        response = await client.post(cancel_url(instance_id), headers=as_principal("bob"))
    assert response.status_code == 202, response.text
    [row] = await requests_of(pool, instance_id)
    staged = await pool.fetch(
        "SELECT id, queue, message_type, body FROM outbox WHERE position($1 in body) > 0",
        instance_id.encode(),
    )
    await pool.execute("DELETE FROM outbox WHERE id = ANY($1::uuid[])", [r["id"] for r in staged])
    by_queue = {r["queue"]: (r["message_type"], orjson.loads(r["body"])) for r in staged}
    assert sorted(by_queue) == ["cancellations", "commands"]
    assert by_queue["commands"][0] == "instance.cancel"
    assert by_queue["commands"][1]["by"] == "bob"
    kind, broadcast = by_queue["cancellations"]
    assert (kind, broadcast["by"]) == ("instance.cancelled", "bob")
    assert datetime.fromisoformat(broadcast["at"]) == row["requested_at"]


async def test_a_request_that_cannot_stage_its_messages_is_not_recorded(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    instance_id, _ = await instance(client, pool)
    staged = outbox.stage

    async def broken_stage(*_: Any) -> None:
        raise asyncpg.exceptions.ConnectionDoesNotExistError("the connection was lost")

    with monkeypatch.context() as patch:
        patch.setattr(outbox, "stage", broken_stage)
        assert_problem(await client.post(cancel_url(instance_id)), 503)
    assert outbox.stage is staged
    assert await requests_of(pool, instance_id) == []  # rolled back with the messages
    assert await drain(commands, settle_s=0.05) == []
    # Asked again, it is recorded and sent.
    assert (await client.post(cancel_url(instance_id))).status_code == 202
    assert len(await requests_of(pool, instance_id)) == 1
    assert len(await drain(commands)) == 1


async def test_a_repeat_answers_as_the_first_cancel_did(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    broadcasts: Broadcasts,
) -> None:
    instance_id, _ = await instance(client, pool)
    first = await client.post(
        cancel_url(instance_id), json={"reason": "first"}, headers=as_principal("ann")
    )
    assert first.status_code == 202, first.text
    again = await client.post(
        cancel_url(instance_id), json={"reason": "second"}, headers=as_principal("bo")
    )
    assert again.status_code == 202, again.text
    assert again.json() == first.json()
    assert again.json()["cancel"]["by"] == "ann"

    # Once the scheduler has recorded it, a repeat shows the current status, same request.
    await record_as_the_scheduler(
        pool, instance_id, InstanceStatus.CANCELLING, {"second": running("worker-3", 2)}, "ann"
    )
    later = await client.post(cancel_url(instance_id), headers=as_principal("cy"))
    assert later.status_code == 202, later.text
    # ...and what it still waits for: the attempt granted before the cancel was recorded.
    waiting = [{"step": "second", "attempt": 2, "server": "worker-3"}]
    assert later.json() == {**first.json(), "status": "CANCELLING", "waiting_for": waiting}
    assert len(await requests_of(pool, instance_id)) == 1
    assert len(await drain(commands)) == 1  # one command, one broadcast for all three
    assert len(await broadcasts(instance_id)) == 1


async def test_concurrent_first_cancels_record_one(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    broadcasts: Broadcasts,
) -> None:
    instance_id, _ = await instance(client, pool)
    operators = [f"operator-{i}" for i in range(5)]
    answers = await asyncio.gather(
        *(
            client.post(
                cancel_url(instance_id),
                json={"reason": f"asked by {who}"},
                headers=as_principal(who),
            )
            for who in operators
        )
    )
    assert [a.status_code for a in answers] == [202] * 5, [a.text for a in answers]
    [row] = await requests_of(pool, instance_id)
    assert row["by"] in operators
    expected = {
        "by": row["by"],
        "reason": f"asked by {row['by']}",
        "requested_at": row["requested_at"],
    }
    for answer in answers:
        cancel = answer.json()["cancel"]
        assert {**cancel, "requested_at": datetime.fromisoformat(cancel["requested_at"])} == (
            expected
        )
    sent = [body_of(m) for m in await drain(commands)]
    assert [(c["type"], c["by"]) for c in sent] == [("instance.cancel", row["by"])]
    assert [b.by for b, _ in await broadcasts(instance_id)] == [row["by"]]


@pytest.mark.parametrize("status", [InstanceStatus.COMPLETED, InstanceStatus.FAILED])
async def test_cancelling_an_ended_instance_is_409_with_the_reason(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    status: InstanceStatus,
) -> None:
    error = ActivityError(kind="exit_code", message="add-device exited with 3")
    instance_id, _ = await instance(
        client,
        pool,
        status,
        {"first": done()},
        error=error if status is InstanceStatus.FAILED else None,
    )
    problem = assert_problem(await client.post(cancel_url(instance_id)), 409)
    assert problem["type"] == "urn:paceline:problem:instance-ended"
    assert f"has already ended: {status.value}" in problem["detail"]
    if status is InstanceStatus.FAILED:
        assert "exit_code: add-device exited with 3" in problem["detail"]
    assert await requests_of(pool, instance_id) == []
    assert await drain(commands, settle_s=0.05) == []


async def test_an_instance_cancelled_without_a_request_answers_as_cancelled(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    engine = CancelRequest(by="old-admin", reason="by an older version", requested_at=at)
    cancelled, _ = await instance(client, pool, InstanceStatus.CANCELLED, {}, cancel=engine)
    response = await client.post(cancel_url(cancelled), headers=as_principal("dan"))
    assert response.status_code == 202, response.text
    assert response.json() == {
        "id": cancelled,
        "status": "CANCELLED",
        "cancel": {"by": "old-admin", "reason": "by an older version", "requested_at": at_z(at)},
        "waiting_for": [],
        "cancel_requested": True,
    }
    bare, _ = await instance(client, pool, InstanceStatus.CANCELLED, {})
    response = await client.post(cancel_url(bare))
    assert response.status_code == 202, response.text
    assert (response.json()["status"], response.json()["cancel"]) == ("CANCELLED", None)
    assert await requests_of(pool, cancelled) == await requests_of(pool, bare) == []
    assert await drain(commands, settle_s=0.05) == []


def at_z(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def test_the_answer_waits_for_the_scheduler_to_record_the_cancel(
    client: httpx.AsyncClient, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cancelling, "RECORD_WAIT_S", 3.0)
    instance_id, _ = await instance(client, pool)

    async def scheduler() -> float:
        """Records the cancel 0.3 s after the request is committed."""
        while not await requests_of(pool, instance_id):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        await record_as_the_scheduler(
            pool, instance_id, InstanceStatus.CANCELLING, {"second": running("w", 2)}, "eve"
        )
        return asyncio.get_running_loop().time()

    loop = asyncio.get_running_loop()
    started = loop.time()
    response, recorded_at = await asyncio.gather(
        client.post(cancel_url(instance_id), headers=as_principal("eve")),
        scheduler(),
    )
    answered = loop.time()
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "CANCELLING"
    assert answered >= recorded_at and answered - started < 2.5

    # Not recorded in time: it answers anyway, after the wait, with the current status.
    monkeypatch.setattr(cancelling, "RECORD_WAIT_S", 0.6)
    other, _ = await instance(client, pool)
    started = loop.time()
    response = await client.post(cancel_url(other))
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "RUNNING"
    assert loop.time() - started >= 0.6


async def test_a_cancelling_instance_shows_what_the_cancel_waits_for(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    instance_id, _ = await instance(
        client,
        pool,
        activities={
            "first": done(),
            "second": running("worker-3", attempt=2),
            "third": running("worker-4"),
        },
    )
    assert (await client.get(f"/v1/instances/{instance_id}")).json()["cancel"] is None
    answer = await client.post(
        cancel_url(instance_id), json={"reason": "stop"}, headers=as_principal("fay")
    )
    assert answer.status_code == 202, answer.text
    first = answer.json()["cancel"]

    async def cancel_shown() -> dict[str, Any]:
        detail = (await client.get(f"/v1/instances/{instance_id}")).json()
        shown: dict[str, Any] = detail["cancel"]
        return shown

    # Not recorded by the scheduler yet: nothing known to wait for.
    assert await cancel_shown() == {**first, "recorded": False, "waiting_for": []}

    stopped = running("worker-4").model_copy(
        update={"status": ActivityStatus.CANCELLED, "finished_at": datetime.now(UTC)}
    )
    await record_as_the_scheduler(
        pool,
        instance_id,
        InstanceStatus.CANCELLING,
        {"first": done(), "second": running("worker-3", attempt=2), "third": stopped},
        "fay",
    )
    detail = (await client.get(f"/v1/instances/{instance_id}")).json()
    assert detail["status"] == "CANCELLING"
    # The first request as answered (not the engine's copy), with what it waits for.
    assert detail["cancel"] == {
        **first,
        "recorded": True,
        "waiting_for": [{"step": "second", "attempt": 2, "server": "worker-3"}],
    }

    await record_as_the_scheduler(
        pool,
        instance_id,
        InstanceStatus.CANCELLED,
        {"first": done(), "second": stopped, "third": stopped},
        "fay",
    )
    assert await cancel_shown() == {**first, "recorded": True, "waiting_for": []}


async def test_an_engine_recorded_cancel_is_shown_without_a_request(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    at = datetime.now(UTC) - timedelta(seconds=3)
    engine = CancelRequest(by="worker-seen", reason="a worker stopped it", requested_at=at)
    instance_id, _ = await instance(
        client, pool, InstanceStatus.CANCELLING, {"second": running("w-9", 4)}, cancel=engine
    )
    cancel = (await client.get(f"/v1/instances/{instance_id}")).json()["cancel"]
    assert cancel == {
        "by": "worker-seen",
        "reason": "a worker stopped it",
        "requested_at": cancel["requested_at"],
        "recorded": True,
        "waiting_for": [{"step": "second", "attempt": 4, "server": "w-9"}],
    }
    assert datetime.fromisoformat(cancel["requested_at"]) == at


async def test_bad_cancel_bodies_are_refused_and_record_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id, _ = await instance(client, pool)
    url = cancel_url(instance_id)
    for body in ({"reason": ""}, {"reason": "x" * 1001}, {"why": "x"}, {"reason": 3}, [1]):
        assert_problem(await client.post(url, json=body), 422)
    broken = await client.post(url, content=b'{"reason": ', headers=JSON)
    assert_problem(broken, 400)
    assert await requests_of(pool, instance_id) == []
    assert await drain(commands, settle_s=0.05) == []


async def test_a_cancel_overtaken_by_the_instance_s_own_end_is_409(
    client: httpx.AsyncClient, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance completed before the scheduler could apply the cancel: nothing was
    cancelled, so the answer (and any repeat) is 409, not a 202 showing COMPLETED."""
    monkeypatch.setattr(cancelling, "RECORD_WAIT_S", 5.0)
    instance_id, _ = await instance(client, pool)

    async def complete_meanwhile() -> None:
        await asyncio.sleep(0.3)
        await pool.execute(
            "UPDATE instances SET status = 'COMPLETED' WHERE id = $1", uuid.UUID(instance_id)
        )

    answer, _ = await asyncio.gather(
        client.post(cancel_url(instance_id), headers=as_principal("ann")),
        complete_meanwhile(),
    )
    problem = assert_problem(answer, 409)
    assert problem["type"].endswith("instance-ended")
    assert "ended COMPLETED before the cancel asked by ann" in problem["detail"]
    assert "nothing was cancelled" in problem["detail"]
    again = assert_problem(await client.post(cancel_url(instance_id)), 409)
    assert "before the cancel asked by ann" in again["detail"]
