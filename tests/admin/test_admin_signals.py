"""Signals: `POST /v1/instances/{id}/signals/{name}` records the signal (who sent it is the
token's principal) with its deliver command in the outbox, in one transaction, and answers once
that is committed, with the fate the scheduler decided or BUFFERED; `GET .../signals` lists
them; `GET /v1/instances/{id}` shows the `wait` steps in progress as `waiting_for`.

No scheduler runs here: a signal's fate stays BUFFERED unless a test writes the decision as the
scheduler would (the `signals` row's status and `decided_at`)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from admin_support import (
    AUTH,
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

from paceline_admin import signals
from paceline_admin.app import create_app
from paceline_admin.settings import AdminSettings
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.state import ActivityState, Waiting

WAITS = {
    "inputs": {"host": {"type": "string", "default": "db-1"}},
    "steps": [
        {"id": "settle", "wait": {"for": "10m"}},
        {
            "id": "ready",
            "wait": {
                "signal": "device_ready",
                "timeout": "2h",
                "on_timeout": "fail",
                "when": "signal.payload.host == inputs.host",
            },
        },
        {
            "id": "go",
            "parallel": [[{"id": "forever", "wait": {"signal": "go", "timeout": "none"}}]],
        },
        {"id": "after", "type": "noop", "with": {"by": "${steps.ready.output.signal.by}"}},
    ],
}
DECISION_WAIT_S = 0.1


@pytest.fixture(autouse=True)
def quick_decision_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """No scheduler decides here: the answer waits for a decision briefly, not 2 s (a test
    that decides as the scheduler would sets its own)."""
    monkeypatch.setattr(signals, "DECISION_WAIT_S", DECISION_WAIT_S)


def now() -> datetime:
    return datetime.now(UTC)


def waiting(kind: str, due_at: datetime | None, signal: str | None = None) -> ActivityState:
    """A `wait` step's activity as the scheduler writes it when the wait starts."""
    return ActivityState(
        type="wait",
        status=ActivityStatus.WAITING,
        attempt=1,
        restartable=True,
        started_at=now() - timedelta(seconds=5),
        waiting=Waiting(kind=kind, due_at=due_at, signal=signal),
    )


async def instance(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    status: InstanceStatus = InstanceStatus.WAITING,
    activities: dict[str, ActivityState] | None = None,
) -> str:
    """An instance of a definition with waits, as the scheduler left it: `settle` done and
    `ready` waiting for its signal (unless `activities` says otherwise)."""
    name = unique("signals")
    await create_definition(client, name, WAITS)
    if activities is None:
        activities = {
            "settle": done(),
            "ready": waiting("signal", now() + timedelta(hours=2), "device_ready"),
        }
    instance_id, _ = await insert_instance(pool, name, activities, status)
    return instance_id


def signal_url(instance_id: str, name: str = "device_ready") -> str:
    return f"/v1/instances/{instance_id}/signals/{name}"


async def rows_of(pool: asyncpg.Pool, instance_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT * FROM signals WHERE instance_id = $1 ORDER BY received_at, id",
        uuid.UUID(instance_id),
    )
    return rows


async def outbox_mentions(pool: asyncpg.Pool, instance_id: str) -> int:
    """Outbox messages of the instance that the relay has still to send."""
    bodies = await pool.fetch("SELECT body FROM outbox WHERE message_type = 'signal.deliver'")
    return sum(instance_id in bytes(b["body"]).decode() for b in bodies)


async def decide(pool: asyncpg.Pool, signal_id: uuid.UUID, status: str, step: str | None) -> None:
    """What the scheduler writes when it applies the signal."""
    await pool.execute(
        "UPDATE signals SET status = $2, step = $3, reason = 'decided by the test',"
        " decided_at = now() WHERE id = $1",
        signal_id,
        status,
        step,
    )


# --- sending -----------------------------------------------------------------------------------


async def test_a_signal_is_committed_with_its_sender_and_its_command_is_sent(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id = await instance(client, pool)
    loop = asyncio.get_running_loop()
    began = loop.time()
    answer = await client.post(
        signal_url(instance_id),
        json={"payload": {"host": "db-1", "rack": 7}},
        headers=as_principal("alice"),
    )
    took = loop.time() - began
    assert answer.status_code == 202, answer.text
    signal_id = uuid.UUID(answer.json()["signal_id"])
    # Nobody decided: BUFFERED, after waiting for a decision.
    assert answer.json() == {"signal_id": str(signal_id), "status": "BUFFERED"}
    assert took >= DECISION_WAIT_S

    [row] = await rows_of(pool, instance_id)
    assert row["id"] == signal_id
    assert (row["name"], row["payload"], row["by"]) == (
        "device_ready",
        {"host": "db-1", "rack": 7},
        "alice",
    )
    assert (row["status"], row["step"], row["decided_at"], row["idempotency_key"]) == (
        "BUFFERED",
        None,
        None,
        None,
    )

    [message] = await drain(commands)
    command = body_of(message)
    assert command["type"] == "signal.deliver"
    assert command["instance_id"] == instance_id
    assert command["signal_id"] == str(signal_id)
    assert (command["name"], command["payload"], command["by"]) == (
        "device_ready",
        {"host": "db-1", "rack": 7},
        "alice",
    )
    assert datetime.fromisoformat(command["received_at"]) == row["received_at"]
    # Published from the outbox: nothing of it is left for the relay.
    assert await outbox_mentions(pool, instance_id) == 0


async def test_who_sent_it_is_the_tokens_principal(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id = await instance(client, pool)
    spoofed = {**as_principal("bob"), "X-Paceline-By": "mallory"}
    bob = await client.post(signal_url(instance_id), json={"payload": {}}, headers=spoofed)
    admin = await client.post(signal_url(instance_id), json={"payload": {"by": "mallory"}})
    assert (bob.status_code, admin.status_code) == (202, 202)
    assert [r["by"] for r in await rows_of(pool, instance_id)] == ["bob", "admin"]
    assert [body_of(m)["by"] for m in await drain(commands)] == ["bob", "admin"]


async def test_a_body_is_optional_and_the_payload_defaults_to_empty(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id = await instance(client, pool)
    without_body = await client.post(signal_url(instance_id))
    empty_object = await client.post(signal_url(instance_id), json={})
    assert (without_body.status_code, empty_object.status_code) == (202, 202)
    assert [r["payload"] for r in await rows_of(pool, instance_id)] == [{}, {}]
    assert [body_of(m)["payload"] for m in await drain(commands)] == [{}, {}]


@pytest.mark.parametrize(
    "status", [InstanceStatus.PENDING, InstanceStatus.RUNNING, InstanceStatus.CANCELLING]
)
async def test_an_instance_not_waiting_yet_or_any_more_still_takes_a_signal(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, status: InstanceStatus
) -> None:
    # Before its wait the signal is buffered; while cancelling the scheduler keeps it as late.
    instance_id = await instance(client, pool, status, {})
    answer = await client.post(signal_url(instance_id), json={"payload": {"early": True}})
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "BUFFERED"
    assert len(await rows_of(pool, instance_id)) == 1
    assert len(await drain(commands)) == 1


# --- the answer reflects the scheduler's decision ----------------------------------------------


@pytest.mark.parametrize(("fate", "step"), [("DELIVERED", "ready"), ("LATE", None)])
async def test_the_answer_says_the_fate_the_scheduler_decided(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    monkeypatch: pytest.MonkeyPatch,
    fate: str,
    step: str | None,
) -> None:
    monkeypatch.setattr(signals, "DECISION_WAIT_S", 10.0)  # long: the decision must end it
    instance_id = await instance(client, pool)
    loop = asyncio.get_running_loop()
    began = loop.time()
    sending = asyncio.create_task(
        client.post(signal_url(instance_id), json={"payload": {"host": "db-1"}})
    )
    # As soon as the signal is committed, decide it as the scheduler would.
    while not (rows := await rows_of(pool, instance_id)):
        assert not sending.done(), sending.result().text
        assert loop.time() - began < 5.0, "the signal was never committed"
        await asyncio.sleep(0.01)
    [row] = rows
    await decide(pool, row["id"], fate, step)
    answer = await asyncio.wait_for(sending, timeout=5.0)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"signal_id": str(row["id"]), "status": fate}
    assert loop.time() - began < 5.0  # the decision ended the wait, not DECISION_WAIT_S
    assert len(await drain(commands)) == 1


async def test_an_undecided_signal_waits_no_longer_than_the_decision_wait(
    client: httpx.AsyncClient, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(signals, "DECISION_WAIT_S", 0.5)
    instance_id = await instance(client, pool)
    loop = asyncio.get_running_loop()
    began = loop.time()
    answer = await client.post(signal_url(instance_id), json={"payload": {}})
    took = loop.time() - began
    assert answer.json()["status"] == "BUFFERED"
    assert 0.5 <= took < 3.0, took


# --- Idempotency-Key ---------------------------------------------------------------------------


async def test_an_idempotency_key_makes_a_retry_answer_the_same_signal(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id = await instance(client, pool)
    key = {"Idempotency-Key": unique("key"), **as_principal("carol")}
    request = {"payload": {"host": "db-1", "n": [1, 2]}}
    first = await client.post(signal_url(instance_id), json=request, headers=key)
    assert first.status_code == 202, first.text
    signal_id = first.json()["signal_id"]
    assert len(await drain(commands)) == 1

    retry = await client.post(signal_url(instance_id), json=request, headers=key)
    assert retry.status_code == 202, retry.text
    assert retry.json() == {"signal_id": signal_id, "status": "BUFFERED"}
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    # The key is per instance and kept on the row; nothing more is recorded or sent.
    [row] = await rows_of(pool, instance_id)
    assert row["idempotency_key"] == key["Idempotency-Key"]
    assert await drain(commands, settle_s=0.3) == []

    # A retry after the scheduler decided answers with the decision.
    await decide(pool, uuid.UUID(signal_id), "DELIVERED", "ready")
    again = await client.post(signal_url(instance_id), json=request, headers=key)
    assert again.json() == {"signal_id": signal_id, "status": "DELIVERED"}
    assert len(await rows_of(pool, instance_id)) == 1
    assert await drain(commands, settle_s=0.1) == []


async def test_the_same_key_on_another_instance_is_another_signal(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    one, other = await instance(client, pool), await instance(client, pool)
    key = {"Idempotency-Key": unique("key")}
    first = await client.post(signal_url(one), json={"payload": {}}, headers=key)
    second = await client.post(signal_url(other), json={"payload": {}}, headers=key)
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["signal_id"] != second.json()["signal_id"]
    assert len(await drain(commands)) == 2


async def test_concurrent_requests_with_one_key_record_one_signal(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id = await instance(client, pool)
    key = {"Idempotency-Key": unique("key")}
    answers = await asyncio.gather(
        *(
            client.post(signal_url(instance_id), json={"payload": {"x": 1}}, headers=key)
            for _ in range(6)
        )
    )
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    assert len({a.json()["signal_id"] for a in answers}) == 1
    assert len(await rows_of(pool, instance_id)) == 1
    assert len(await drain(commands)) == 1


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("device_ready", {"payload": {"host": "db-2"}}),  # another payload
        ("device_ready", {"payload": {"host": "db-1", "extra": None}}),
        ("other_signal", {"payload": {"host": "db-1"}}),  # another name
    ],
)
async def test_a_key_reused_for_another_signal_is_refused(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    name: str,
    body: dict[str, Any],
) -> None:
    instance_id = await instance(client, pool)
    key = {"Idempotency-Key": unique("key")}
    first = await client.post(
        signal_url(instance_id), json={"payload": {"host": "db-1"}}, headers=key
    )
    assert first.status_code == 202, first.text
    await drain(commands)
    problem = assert_problem(
        await client.post(signal_url(instance_id, name), json=body, headers=key), 422
    )
    assert problem["type"] == "urn:paceline:problem:idempotency-key-reused"
    assert "different signal" in problem["detail"]
    assert len(await rows_of(pool, instance_id)) == 1
    assert await drain(commands, settle_s=0.1) == []


async def test_the_payload_is_compared_as_json_not_as_text(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id = await instance(client, pool)
    key = {"Idempotency-Key": unique("key"), "Content-Type": "application/json"}
    first = await client.post(
        signal_url(instance_id), content=b'{"payload": {"a": 1, "b": 2}}', headers=key
    )
    retry = await client.post(
        signal_url(instance_id), content=b'{"payload":{"b":2,"a":1}}', headers=key
    )
    assert (first.status_code, retry.status_code) == (202, 202), retry.text
    assert first.json()["signal_id"] == retry.json()["signal_id"]
    assert len(await drain(commands)) == 1


# --- refused -----------------------------------------------------------------------------------


async def test_an_unknown_instance_is_404(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    missing = uuid.uuid4()
    problem = assert_problem(await client.post(signal_url(str(missing)), json={"payload": {}}), 404)
    assert problem["type"] == "urn:paceline:problem:not-found"
    assert str(missing) in problem["detail"]
    assert_problem(await client.get(f"/v1/instances/{missing}/signals"), 404)
    assert await pool.fetchval("SELECT count(*) FROM signals WHERE instance_id = $1", missing) == 0
    assert await drain(commands, settle_s=0.1) == []
    assert_problem(await client.post(signal_url("not-a-uuid"), json={"payload": {}}), 422)


@pytest.mark.parametrize(
    "status", [InstanceStatus.COMPLETED, InstanceStatus.FAILED, InstanceStatus.CANCELLED]
)
async def test_an_ended_instance_is_409(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, status: InstanceStatus
) -> None:
    instance_id = await instance(client, pool, status, {"settle": done()})
    key = {"Idempotency-Key": unique("key")}
    answer = await client.post(signal_url(instance_id), json={"payload": {}}, headers=key)
    problem = assert_problem(answer, 409)
    assert problem["type"] == "urn:paceline:problem:instance-ended"
    assert status.value in problem["detail"]
    assert await rows_of(pool, instance_id) == []
    assert await drain(commands, settle_s=0.1) == []


async def test_a_replay_is_answered_after_the_instance_ended(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    # The first request was recorded while the instance ran: its retry answers as it did.
    instance_id = await instance(client, pool)
    key = {"Idempotency-Key": unique("key")}
    first = await client.post(signal_url(instance_id), json={"payload": {}}, headers=key)
    await pool.execute(
        "UPDATE instances SET status = 'COMPLETED' WHERE id = $1", uuid.UUID(instance_id)
    )
    retry = await client.post(signal_url(instance_id), json={"payload": {}}, headers=key)
    assert retry.status_code == 202, retry.text
    assert retry.json()["signal_id"] == first.json()["signal_id"]
    assert len(await drain(commands)) == 1


@pytest.mark.parametrize(
    "name",
    [
        "device ready",  # a space
        "x" * 201,  # too long
        "caf\u00e9",  # not ASCII
        "a/b",  # not one path segment: another route
        "semi;colon",
    ],
    ids=["space", "201-chars", "not-ascii", "slash", "semicolon"],
)
async def test_a_bad_signal_name_is_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, name: str
) -> None:
    instance_id = await instance(client, pool)
    answer = await client.post(signal_url(instance_id, name), json={"payload": {}})
    assert answer.status_code in (404, 405, 422), answer.text
    if name != "a/b":
        problem = assert_problem(answer, 422)
        assert problem["type"] == "urn:paceline:problem:invalid-request"
        assert [e["path"] for e in problem["errors"]] == ["path.name"]
    assert await rows_of(pool, instance_id) == []
    assert await drain(commands, settle_s=0.1) == []


async def test_the_longest_and_oddest_valid_names_are_taken(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id = await instance(client, pool)
    names = ["x" * 200, "a.b:c-d_E9"]
    for name in names:
        answer = await client.post(signal_url(instance_id, name), json={"payload": {}})
        assert answer.status_code == 202, answer.text
    assert [r["name"] for r in await rows_of(pool, instance_id)] == names
    assert len(await drain(commands)) == 2


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"payload": {}, "by": "mallory"}, "by"),  # an unknown field
        ({"payload": "ready"}, "payload"),  # not an object
        ({"payload": [1, 2]}, "payload"),
        ({"payload": None}, "payload"),
    ],
)
async def test_a_bad_body_is_refused(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    body: dict[str, Any],
    path: str,
) -> None:
    instance_id = await instance(client, pool)
    problem = assert_problem(await client.post(signal_url(instance_id), json=body), 422)
    assert problem["type"] == "urn:paceline:problem:invalid-request"
    assert path in [e["path"] for e in problem["errors"]], problem
    assert await rows_of(pool, instance_id) == []
    assert await drain(commands, settle_s=0.1) == []


async def test_a_malformed_body_or_key_is_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id = await instance(client, pool)
    not_json = await client.post(
        signal_url(instance_id),
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert not_json.status_code in (400, 422), not_json.text
    assert not_json.headers["content-type"] == "application/problem+json"
    long_key = await client.post(
        signal_url(instance_id), json={"payload": {}}, headers={"Idempotency-Key": "k" * 201}
    )
    assert_problem(long_key, 422)
    assert await rows_of(pool, instance_id) == []
    assert await drain(commands, settle_s=0.1) == []


@pytest.mark.parametrize(
    "payload",
    [{"text": "nul \u0000 here"}, {"big": 2**64}, {"blob": "x" * (16 * 1024)}],
    ids=["nul", "int-over-64-bits", "too-large"],
)
async def test_a_payload_that_cannot_be_stored_is_422(
    app: Any, pool: asyncpg.Pool, commands: AbstractQueue, payload: dict[str, Any]
) -> None:
    # A client of its own that does not raise the app's exceptions, as a server would not.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin", headers=AUTH) as own:
        instance_id = await instance(own, pool)
        answer = await own.post(signal_url(instance_id), json={"payload": payload})
    assert_problem(answer, 422)
    assert await rows_of(pool, instance_id) == []


# --- listing -----------------------------------------------------------------------------------


async def test_the_list_shows_every_signal_oldest_first_with_its_fate(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id = await instance(client, pool)
    assert (await client.get(f"/v1/instances/{instance_id}/signals")).json() == {"items": []}
    sent = []
    for who, name, payload in [
        ("alice", "device_ready", {"host": "db-2"}),
        ("bob", "device_ready", {"host": "db-1"}),
        ("carol", "go", {}),
    ]:
        answer = await client.post(
            signal_url(instance_id, name), json={"payload": payload}, headers=as_principal(who)
        )
        assert answer.status_code == 202, answer.text
        sent.append(uuid.UUID(answer.json()["signal_id"]))
    await decide(pool, sent[1], "DELIVERED", "ready")
    await decide(pool, sent[0], "LATE", None)
    other = await instance(client, pool)  # its signals are not listed
    await client.post(signal_url(other), json={"payload": {}})

    listed = await client.get(f"/v1/instances/{instance_id}/signals")
    assert listed.status_code == 200, listed.text
    items = listed.json()["items"]
    assert [uuid.UUID(i["signal_id"]) for i in items] == sent
    rows = {r["id"]: r for r in await rows_of(pool, instance_id)}
    for item in items:
        assert set(item) == {
            "signal_id",
            "name",
            "payload",
            "by",
            "status",
            "step",
            "reason",
            "received_at",
            "decided_at",
        }
        row = rows[uuid.UUID(item["signal_id"])]
        assert datetime.fromisoformat(item["received_at"]) == row["received_at"]
        if row["decided_at"] is None:
            assert item["decided_at"] is None
        else:
            assert datetime.fromisoformat(item["decided_at"]) == row["decided_at"]
    assert [(i["by"], i["name"], i["payload"], i["status"], i["step"]) for i in items] == [
        ("alice", "device_ready", {"host": "db-2"}, "LATE", None),
        ("bob", "device_ready", {"host": "db-1"}, "DELIVERED", "ready"),
        ("carol", "go", {}, "BUFFERED", None),
    ]
    assert [i["reason"] for i in items] == ["decided by the test", "decided by the test", None]
    assert [i["decided_at"] is not None for i in items] == [True, True, False]
    received = [datetime.fromisoformat(i["received_at"]) for i in items]
    assert received == sorted(received)
    await drain(commands)


# --- waiting_for -------------------------------------------------------------------------------


async def test_an_instance_shows_the_waits_it_is_in(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    timer_due = now() + timedelta(minutes=10)
    signal_due = now() + timedelta(hours=2)
    instance_id = await instance(
        client,
        pool,
        InstanceStatus.WAITING,
        {
            "settle": waiting("timer", timer_due),
            "ready": waiting("signal", signal_due, "device_ready"),
            "forever": waiting("signal", None, "go"),
        },
    )
    answer = await client.get(f"/v1/instances/{instance_id}")
    assert answer.status_code == 200, answer.text
    shown = answer.json()
    assert shown["status"] == "WAITING"
    # The soonest due first; one without a timeout last.
    assert [(w["kind"], w["step"], w["signal"]) for w in shown["waiting_for"]] == [
        ("timer", "settle", None),
        ("signal", "ready", "device_ready"),
        ("signal", "forever", "go"),
    ]
    keys = {"kind", "step", "since", "due_at", "signal", "approval_id"}
    assert [w.keys() for w in shown["waiting_for"]] == [keys] * 3
    # Since the step began (as written above: 5 s before now); no approval among them.
    assert all(datetime.fromisoformat(w["since"]) < now() for w in shown["waiting_for"])
    assert [w["approval_id"] for w in shown["waiting_for"]] == [None] * 3
    due = [w["due_at"] and datetime.fromisoformat(w["due_at"]) for w in shown["waiting_for"]]
    assert due == [timer_due, signal_due, None]
    activities = {a["step"]: a for a in shown["activities"]}
    assert {step: (a["type"], a["status"]) for step, a in activities.items()} == {
        "settle": ("wait", "WAITING"),
        "ready": ("wait", "WAITING"),
        "forever": ("wait", "WAITING"),
    }
    assert shown["cancel"] is None


async def test_only_waits_in_progress_are_shown(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    ended = waiting("timer", now() - timedelta(minutes=1))
    ended.status = ActivityStatus.COMPLETED
    ended.output = {"resolved_by": "timer", "waited_s": 600.0}
    instance_id = await instance(
        client,
        pool,
        InstanceStatus.RUNNING,
        {
            "settle": ended,
            "ready": waiting("signal", now() + timedelta(hours=1), "device_ready"),
            "after": running("worker-1"),
        },
    )
    shown = (await client.get(f"/v1/instances/{instance_id}")).json()
    assert shown["status"] == "RUNNING"  # something else runs too
    assert [w["step"] for w in shown["waiting_for"]] == ["ready"]
    settle = next(a for a in shown["activities"] if a["step"] == "settle")
    assert (settle["status"], settle["output"]) == (
        "COMPLETED",
        {"resolved_by": "timer", "waited_s": 600.0},
    )

    nothing = await instance(client, pool, InstanceStatus.RUNNING, {"after": running("w-2")})
    assert (await client.get(f"/v1/instances/{nothing}")).json()["waiting_for"] == []


async def test_an_ended_instance_waits_for_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    # Even with a wait row left WAITING (the view reads open activities of live instances only).
    instance_id = await instance(
        client,
        pool,
        InstanceStatus.CANCELLED,
        {"ready": waiting("signal", now() + timedelta(hours=1), "device_ready")},
    )
    assert (await client.get(f"/v1/instances/{instance_id}")).json()["waiting_for"] == []


async def test_waiting_is_a_status_filter_of_lists(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    instance_id = await instance(client, pool)
    listed = await client.get("/v1/instances", params={"status": "WAITING", "limit": 500})
    assert listed.status_code == 200, listed.text
    assert instance_id in [i["id"] for i in listed.json()["items"]]
    activities = await client.get(
        f"/v1/instances/{instance_id}/activities", params={"status": "WAITING"}
    )
    assert activities.status_code == 200, activities.text
    assert [a["step"] for a in activities.json()["items"]] == ["ready"]


# --- without the broker ------------------------------------------------------------------------


async def test_without_the_broker_a_signal_is_503_and_nothing_is_recorded(
    settings: AdminSettings, client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    instance_id = await instance(client, pool)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://admin", headers=AUTH
        ) as own:
            await app.state.resources.connection.close()
            answer = await own.post(
                signal_url(instance_id),
                json={"payload": {}},
                headers={"Idempotency-Key": unique("key")},
            )
            problem = assert_problem(answer, 503)
            assert problem["type"] == "urn:paceline:problem:broker-unavailable"
            assert "signal" in problem["detail"]
            assert answer.headers["Retry-After"] == "2"
            assert await rows_of(pool, instance_id) == []
            assert await outbox_mentions(pool, instance_id) == 0  # nothing staged
            # Reading needs no broker.
            listed = await own.get(f"/v1/instances/{instance_id}/signals")
            assert listed.json() == {"items": []}
