"""Checkpointed approvals (issue 9, section 3) with services as real processes: a scheduler
SIGKILLed right after it created an approval (one approval, announced once or more, never two),
a decision while no scheduler runs, a timeout that decides, an escalation that adds an approver.

One stack for the module, with principals and groups of its own; tests that stop its scheduler
start it again before they end."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from stack_env import StackEnv, drop_everything, read_stream

from integration.conftest import wait_ready
from integration.harness import TEST_VARIABLES, log_tail, wait_final, wait_for
from paceline_contracts.messages import ApprovalRequested, DecideApproval
from paceline_contracts.queues import Queue, Stream, exchange_name, stream_name
from stack import Stack

pytestmark = pytest.mark.integration

PRINCIPALS = ("ops-alice", "ops-bob", "ops-carol", "ops-dan")
GROUPS = "netops=ops-alice,ops-bob; leads=ops-carol"
SCHEDULER = "scheduler-1"


class Env:
    """The module's stack: its names, its processes, a client as `admin`, and the database."""

    def __init__(self, env: StackEnv, stack: Stack, api: httpx.AsyncClient) -> None:
        self.env = env
        self.stack = stack
        self.api = api

    def as_(self, principal: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env.token_of(principal)}"}

    def restart_scheduler(self) -> None:
        if not self.stack.services[SCHEDULER].alive():
            self.stack.start(SCHEDULER)


@pytest.fixture(scope="module")
async def stack_env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    env = StackEnv.fresh("plappr", principals=PRINCIPALS)
    stack = Stack(
        env={**env.variables(), **TEST_VARIABLES, "PACELINE_GROUPS": GROUPS},
        log_dir=tmp_path_factory.mktemp("approval-logs"),
    )
    stack.migrate()
    try:
        stack.add("scheduler")
        stack.add("activity-worker")
        stack.add("reporting")
        stack.add("admin")
        await wait_ready(env, stack)
        async with httpx.AsyncClient(
            base_url=env.base_url, headers={"Authorization": f"Bearer {env.token}"}, timeout=30
        ) as api:
            yield Env(env, stack, api)
    finally:
        stack.stop_all(timeout=30)
        if not os.environ.get("PACELINE_KEEP_TEST_DATA"):
            await drop_everything(env)
            await drop_streams(env)


async def drop_streams(env: StackEnv) -> None:
    """The namespace's streams, which drop_everything leaves."""
    connection = await aio_pika.connect(env.amqp_url)
    try:
        channel = await connection.channel()
        for stream in Stream:
            await channel.queue_delete(stream_name(env.namespace, stream))
    finally:
        await connection.close()


@pytest.fixture
async def s(stack_env: Env) -> AsyncIterator[Env]:
    """The module's stack, with its scheduler running again after the test."""
    stack_env.restart_scheduler()
    yield stack_env
    stack_env.restart_scheduler()


@pytest.fixture
async def db(stack_env: Env) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(stack_env.env.database_url)
    yield conn
    await conn.close()


# --- helpers -------------------------------------------------------------------------------------


def gate(**approval: Any) -> list[dict[str, Any]]:
    """An approval step `ok`, then a condition on its decision: `add` when approved, else
    `skip`."""
    spec = {"title": "Add ${inputs.host}?", "approvers": ["group:netops"], **approval}
    return [
        {"id": "ok", "type": "approval", "with": spec},
        {
            "id": "chosen",
            "if": "steps.ok.output.decision == 'approve'",
            "then": [
                {"id": "add", "type": "noop", "with": {"by": "${steps.ok.output.decided_by}"}}
            ],
            "else": [{"id": "skip", "type": "noop"}],
        },
    ]


async def define(api: httpx.AsyncClient, steps: list[dict[str, Any]]) -> str:
    name = f"approval-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "inputs": {"host": {"type": "string"}}, "steps": steps}
    created = await api.post("/v1/definitions", json=body)
    assert created.status_code == 201, created.text
    return name


async def start(api: httpx.AsyncClient, definition: str, host: str = "sw1") -> str:
    started = await api.post(
        "/v1/instances", json={"definition": definition, "inputs": {"host": host}}
    )
    assert started.status_code == 202, started.text
    return str(started.json()["id"])


async def instance(api: httpx.AsyncClient, instance_id: str) -> dict[str, Any]:
    r = await api.get(f"/v1/instances/{instance_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def wait_asked(s: Env, instance_id: str, timeout: float = 30) -> dict[str, Any]:
    """Wait until the instance waits for its approval; returns the approval (GET)."""

    async def waiting() -> dict[str, Any] | None:
        body = await instance(s.api, instance_id)
        assert body["status"] not in ("COMPLETED", "FAILED", "CANCELLED"), body
        if body["status"] != "WAITING":
            return None
        [wait] = body["waiting_for"]
        assert (wait["kind"], wait["step"]) == ("approval", "ok"), wait
        found = await s.api.get("/v1/approvals", params={"definition": body["definition"]})
        items = [a for a in found.json()["items"] if a["instance_id"] == instance_id]
        # Created with the WAITING step, in one transaction: the wait names it at once.
        assert [wait["approval_id"]] == [a["id"] for a in items], (wait, items)
        assert wait["since"] is not None
        return items[0] if items else None

    return dict(await wait_for(waiting, timeout, f"{instance_id} to wait for its approval"))


async def decide(
    s: Env, approval_id: str, who: str, decision: str = "approve", comment: str | None = None
) -> httpx.Response:
    return await s.api.post(
        f"/v1/approvals/{approval_id}/decision",
        json={"decision": decision, "comment": comment},
        headers=s.as_(who),
    )


def step_of(body: dict[str, Any], step: str) -> dict[str, Any] | None:
    return next((a for a in body["activities"] if a["step"] == step), None)


async def history(api: httpx.AsyncClient, instance_id: str) -> list[dict[str, Any]]:
    r = await api.get(f"/v1/instances/{instance_id}/history")
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def announcements(env: StackEnv) -> list[ApprovalRequested]:
    """Every `approval.requested` on the namespace's `approvals` stream, read from its start."""
    messages = await read_stream(env.amqp_url, env.namespace, Stream.APPROVALS)
    return [ApprovalRequested.model_validate_json(m.body) for m in messages]


async def check_completed(
    s: Env, instance_id: str, decision: str, decided_by: list[str], via: str
) -> dict[str, Any]:
    """The instance COMPLETED, its approval step's output as given, the condition's branch
    taken accordingly; returns the approval step's output."""
    body = (await wait_final(s.api, [instance_id], timeout=60))[instance_id]
    assert body["status"] == "COMPLETED", body
    ok = step_of(body, "ok")
    assert ok is not None and ok["status"] == "COMPLETED", ok
    output = dict(ok["output"])
    assert (output["decision"], output["decided_by"], output["via"]) == (
        decision,
        decided_by,
        via,
    ), output
    ran, not_ran = ("add", "skip") if decision == "approve" else ("skip", "add")
    taken = step_of(body, ran)
    assert taken is not None and taken["status"] == "COMPLETED", body["activities"]
    assert step_of(body, not_ran) is None, body["activities"]
    return output


# --- a. a scheduler SIGKILLed right after it created an approval ---------------------------------

ROUNDS = 8
PER_ROUND = 3


async def strike_after_creation(
    s: Env, db: asyncpg.Connection, definition: str, first: int
) -> tuple[list[str], int]:
    """Start PER_ROUND instances and SIGKILL the scheduler as soon as the first of their
    approvals is committed, then start it again; the instances, and how many of their
    announcements were still in the outbox (committed, not known to be published) at the kill."""
    ids = [await start(s.api, definition, host=f"sw{first + i}") for i in range(PER_ROUND)]
    keys = [uuid.UUID(i) for i in ids]

    async def created() -> bool:
        found = await db.fetchval(
            "SELECT count(*) FROM approvals WHERE instance_id = ANY($1::uuid[])", keys
        )
        return bool(found)

    await wait_for(created, 30, "an approval row", interval=0.005)
    s.stack.kill(SCHEDULER)
    unsent = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE message_type = 'approval.requested'"
        " AND (convert_from(body, 'UTF8')::jsonb ->> 'instance_id')::uuid = ANY($1::uuid[])",
        keys,
    )
    s.stack.start(SCHEDULER)
    return ids, int(unsent)


async def test_a_scheduler_killed_after_creating_an_approval_creates_no_second(
    s: Env, db: asyncpg.Connection
) -> None:
    definition = await define(s.api, gate())
    ids: list[str] = []
    struck_between = 0
    # Strike until one kill fell between an approval's commit and its announcement's publish
    # (the other instances of a round are wherever they are: before, during, after).
    for _ in range(ROUNDS):
        started, unsent = await strike_after_creation(s, db, definition, len(ids))
        ids += started
        struck_between += unsent
        await asyncio.gather(*(wait_asked(s, i, timeout=60) for i in started))
        if struck_between:
            break
    assert struck_between, f"no kill of {ROUNDS} fell before an announcement was published"

    keys = [uuid.UUID(i) for i in ids]
    approvals = {i: await wait_asked(s, i) for i in ids}
    rows = await db.fetch(
        "SELECT id, instance_id, step, attempt, status FROM approvals"
        " WHERE instance_id = ANY($1::uuid[])",
        keys,
    )
    assert len(rows) == len(ids), rows  # one each, never two
    assert {str(r["instance_id"]) for r in rows} == set(ids)
    assert {(r["step"], r["attempt"], r["status"]) for r in rows} == {("ok", 1, "PENDING")}
    by_row = {str(r["instance_id"]): str(r["id"]) for r in rows}
    for instance_id, approval in approvals.items():
        assert approval["id"] == by_row[instance_id]
        assert approval["title"] == f"Add sw{ids.index(instance_id)}?"
        events = await history(s.api, instance_id)
        requested = [e for e in events if e["kind"] == "approval_requested"]
        assert len(requested) == 1, requested

    # Announced once or more each, and only for the approvals that exist.
    async def every_one_announced() -> list[ApprovalRequested] | None:
        found = [a for a in await announcements(s.env) if str(a.instance_id) in by_row]
        return found if {str(a.instance_id) for a in found} == set(ids) else None

    announced = await wait_for(every_one_announced, 30, "every approval's announcement")
    for a in announced:
        assert str(a.approval_id) == by_row[str(a.instance_id)], a
        assert (a.definition, a.step, a.attempt) == (definition, "ok", 1)
        assert a.approvers == ["group:netops"] and a.required == 1
        assert a.choices == ["approve", "reject"]

    # And each still decides, once.
    for approval in approvals.values():
        assert (await decide(s, approval["id"], "ops-alice", "approve")).status_code == 200
    for instance_id in ids:
        await check_completed(s, instance_id, "approve", ["ops-alice"], "api")
    decided = await db.fetchval(
        "SELECT count(*) FROM approvals WHERE instance_id = ANY($1::uuid[]) AND status = 'DECIDED'",
        keys,
    )
    assert decided == len(ids)
    assert s.stack.services[SCHEDULER].alive(), log_tail(s.stack.services[SCHEDULER].log_path)


# --- b. a decision while no scheduler runs -------------------------------------------------------


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_a_decision_while_no_scheduler_runs_is_applied_when_one_does(
    s: Env, db: asyncpg.Connection, how: str
) -> None:
    definition = await define(s.api, gate(approvers=["group:netops", "ops-carol"], required=2))
    instance_id = await start(s.api, definition)
    approval = await wait_asked(s, instance_id)

    if how == "sigterm":
        assert s.stack.stop(SCHEDULER, timeout=30) == 0
    else:
        s.stack.kill(SCHEDULER)
    first = await decide(s, approval["id"], "ops-bob", "approve", "fine by me")
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "PENDING"
    second = await decide(s, approval["id"], "ops-carol", "approve")
    assert second.status_code == 200, second.text
    assert (second.json()["status"], second.json()["decided_by"]) == (
        "DECIDED",
        ["ops-bob", "ops-carol"],
    )
    # Recorded, not applied: no scheduler runs.
    await asyncio.sleep(1.0)
    body = await instance(s.api, instance_id)
    assert body["status"] == "WAITING", body
    again = await decide(s, approval["id"], "ops-alice", "reject")
    assert again.status_code == 409, again.text

    s.stack.start(SCHEDULER)
    output = await check_completed(s, instance_id, "approve", ["ops-bob", "ops-carol"], "api")
    assert output["comment"] is None  # the deciding choice's comment
    assert output["escalation_level"] == 0 and output["decided_at"]
    row = await db.fetchrow(
        "SELECT status, decided_by FROM approvals WHERE id = $1", uuid.UUID(approval["id"])
    )
    assert (row["status"], row["decided_by"]) == ("DECIDED", ["ops-bob", "ops-carol"])
    events = await history(s.api, instance_id)
    assert len([e for e in events if e["kind"] == "approval_vote"]) == 1
    assert len([e for e in events if e["kind"] == "approval_decided"]) == 1


# --- c. a timeout decides ------------------------------------------------------------------------


async def test_a_timeout_decides_by_on_timeout(s: Env) -> None:
    definition = await define(s.api, gate(timeout="2s", on_timeout="reject"))
    instance_id = await start(s.api, definition)
    approval = await wait_asked(s, instance_id)
    assert approval["due_at"] is not None
    body = await instance(s.api, instance_id)
    [wait] = body["waiting_for"]
    assert wait["due_at"] is not None

    output = await check_completed(s, instance_id, "reject", [], "timeout")
    assert output["comment"] is None and output["escalation_level"] == 0
    shown = (await s.api.get(f"/v1/approvals/{approval['id']}")).json()
    assert (shown["status"], shown["decision"], shown["decided_by"]) == ("EXPIRED", "reject", [])
    assert shown["decided_at"] is not None
    late = await decide(s, approval["id"], "ops-alice", "approve")
    assert late.status_code == 409, late.text
    assert late.json()["type"].endswith("approval-closed")
    assert "expired" in late.json()["detail"]
    events = await history(s.api, instance_id)
    [decided] = [e for e in events if e["kind"] == "approval_decided"]
    assert "timeout" in decided["reason"], decided


# --- d. an escalation adds an approver -----------------------------------------------------------


async def test_an_escalation_adds_an_approver(s: Env, db: asyncpg.Connection) -> None:
    definition = await define(
        s.api, gate(escalate=[{"after": "1s", "to": ["ops-carol"]}], timeout="10m")
    )
    instance_id = await start(s.api, definition)

    # As soon as the approval exists (well within its first second): ops-carol may not decide.
    async def created() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await db.fetchrow(
            "SELECT id, escalation_level FROM approvals WHERE instance_id = $1",
            uuid.UUID(instance_id),
        )
        return row

    row = await wait_for(created, 30, "the approval row", interval=0.01)
    approval_id = str(row["id"])
    early = await decide(s, approval_id, "ops-carol", "approve")
    assert early.status_code == 403, early.text
    assert early.json()["type"].endswith("not-an-approver")

    async def escalated() -> dict[str, Any] | None:
        shown = (await s.api.get(f"/v1/approvals/{approval_id}")).json()
        return shown if shown["escalation_level"] == 1 else None

    shown = await wait_for(escalated, 30, "the escalation")
    assert shown["approvers"] == ["group:netops", "ops-carol"]
    assert shown["status"] == "PENDING"
    events = await history(s.api, instance_id)
    [escalation] = [e for e in events if e["kind"] == "approval_escalated"]
    assert "ops-carol" in escalation["reason"]

    later = await decide(s, approval_id, "ops-carol", "approve", "as the lead")
    assert later.status_code == 200, later.text
    assert later.json()["decided_by"] == ["ops-carol"]
    output = await check_completed(s, instance_id, "approve", ["ops-carol"], "api")
    assert output["escalation_level"] == 1
    assert output["comment"] == "as the lead"
    listed = await s.api.get(
        "/v1/approvals", params={"approver": "ops-carol", "definition": definition}
    )
    assert [a["id"] for a in listed.json()["items"]] == [approval_id]


# --- a redelivered decision --------------------------------------------------------------------


async def test_a_redelivered_decision_is_not_a_second_vote(s: Env, db: asyncpg.Connection) -> None:
    """Commands are delivered at least once (the outbox relay may publish a flushed message
    again; a scheduler may crash after its commit, before its ack): the same choice delivered
    twice is one vote."""
    definition = await define(s.api, gate(required=2))
    instance_id = await start(s.api, definition)
    approval = await wait_asked(s, instance_id)
    assert (await decide(s, approval["id"], "ops-alice", "approve")).status_code == 200
    choice = await db.fetchrow(
        "SELECT decision, comment, decided_at FROM approval_decisions WHERE approval_id = $1",
        uuid.UUID(approval["id"]),
    )
    again = DecideApproval(
        instance_id=uuid.UUID(instance_id),
        approval_id=uuid.UUID(approval["id"]),
        step="ok",
        attempt=1,
        by="ops-alice",
        decision=choice["decision"],
        comment=choice["comment"],
        decided_at=choice["decided_at"],
    )
    connection = await aio_pika.connect(s.env.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name(s.env.namespace), ensure=False)
        await exchange.publish(
            aio_pika.Message(
                again.model_dump_json().encode(),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
                message_id=str(uuid.uuid4()),
                type=again.type,
            ),
            routing_key=Queue.COMMANDS.value,
            mandatory=True,
        )
    finally:
        await connection.close()
    await asyncio.sleep(3.0)
    body = await instance(s.api, instance_id)
    row = await db.fetchrow(
        "SELECT status, decided_by FROM approvals WHERE id = $1", uuid.UUID(approval["id"])
    )
    await s.api.post(f"/v1/instances/{instance_id}/cancel", json={"reason": "test over"})
    assert body["status"] == "WAITING", (body["status"], step_of(body, "ok"))
    assert row["status"] == "PENDING", dict(row)
