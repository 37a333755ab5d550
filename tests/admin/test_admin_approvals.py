"""Approvals: `GET /v1/approvals`, `GET /v1/approvals/{id}` and `POST /v1/approvals/{id}/decision`.

No scheduler runs here: each test inserts the approval row as the scheduler writes it when a
process reaches an `approval` step (migration 0007; its id is the scheduler's, derived from the
instance, the step and the attempt), on an instance row of its own. A decision is checked on
the API's answer, on the rows (`approvals`, `approval_decisions`) and on the `DecideApproval`
command it leaves in the commands queue for the scheduler.

The tests run an app of their own, on the session's database and namespace, whose principals
are the session's (`admin_support.TOKENS`) with groups (`GROUPS`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from admin_support import (
    AUTH,
    HEARTBEAT_S,
    TOKEN,
    TOKENS,
    as_principal,
    assert_problem,
    body_of,
    create_definition,
    drain,
    insert_instance,
    unique,
)
from aio_pika.abc import AbstractChannel, AbstractQueue
from fastapi import FastAPI

from paceline_admin.app import create_app
from paceline_admin.settings import AdminSettings
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.state import ActivityState, ApprovalState, Waiting
from paceline_scheduler.approval_store import approval_id as approval_id_of

GROUPS = "netops=alice,bob; leads=carol; reviewers=ivy,jo,kay"
STEP = "ok"
GATE = {
    "inputs": {"host": {"type": "string", "default": "sw1"}},
    "steps": [
        {
            "id": STEP,
            "type": "approval",
            "with": {"title": "Add ${inputs.host}?", "approvers": ["group:netops"]},
        },
        {"id": "after", "type": "noop", "with": {"chosen": "${steps.ok.output.decision}"}},
    ],
}


@pytest.fixture(scope="module")
async def grouped_app(
    settings: AdminSettings, broker: AbstractChannel, app: FastAPI
) -> AsyncIterator[FastAPI]:
    """An admin app with the session's principals, and groups of them."""
    grouped = AdminSettings(
        database_url=settings.database_url,
        namespace=settings.namespace,
        amqp_url=settings.amqp_url,
        admin_token=TOKEN,
        admin_tokens=",".join(f"{name}={token}" for name, token in TOKENS.items()),
        groups=GROUPS,
        server_heartbeat_s=HEARTBEAT_S,
    )
    application = create_app(grouped)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def api(grouped_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the grouped app, as `admin`; `as_principal(name)` headers make a request
    another principal's."""
    transport = httpx.ASGITransport(app=grouped_app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://admin", headers=AUTH
    ) as client:
        yield client


@pytest.fixture(scope="module")
async def gate(api: httpx.AsyncClient) -> str:
    """A definition with an approval step, for the instances of the tests."""
    name = unique("approvals")
    await create_definition(api, name, GATE)
    return name


def waiting_approval(approvers: list[str], required: int) -> ActivityState:
    """The approval step's activity as the scheduler writes it when it asks for the approval."""
    return ActivityState(
        type="approval",
        status=ActivityStatus.WAITING,
        attempt=1,
        restartable=True,
        started_at=datetime.now(UTC) - timedelta(seconds=5),
        waiting=Waiting(kind="approval", due_at=None),
        approval=ApprovalState(
            approvers=approvers,
            required=required,
            choices=["approve", "reject"],
            on_timeout="reject",
        ),
    )


async def insert_approval(
    pool: asyncpg.Pool,
    definition: str,
    *,
    approvers: list[str] | None = None,
    required: int = 1,
    forbid_requester: bool = True,
    requester: str = "dan",
    choices: list[str] | None = None,
    status: str = "PENDING",
    decision: str | None = None,
    decided_by: list[str] | None = None,
    created_at: datetime | None = None,
    listed_as: str | None = None,
) -> str:
    """An instance WAITING at its approval step, and the approval as the scheduler writes it
    (migration 0007); the approval's id. `listed_as` overrides the approval's `definition`
    column (the instance is always of `definition`, which must exist)."""
    approvers = approvers if approvers is not None else ["group:netops"]
    instance_id, _ = await insert_instance(
        pool,
        definition,
        {STEP: waiting_approval(approvers, required)},
        InstanceStatus.WAITING,
    )
    key = approval_id_of(uuid.UUID(instance_id), STEP, 1)
    await pool.execute(
        """
        INSERT INTO approvals (id, instance_id, step, attempt, definition, title, details,
            approvers, required, forbid_requester, requester, choices, status, decision,
            decided_by, due_at, created_at, decided_at)
        VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
            coalesce($16, now()), CASE WHEN $12 = 'PENDING' THEN NULL ELSE now() END)
        """,
        key,
        uuid.UUID(instance_id),
        STEP,
        listed_as or definition,
        "Add sw1?",
        {"lookup": {"rack": 7}},
        approvers,
        required,
        forbid_requester,
        requester,
        choices or ["approve", "reject"],
        status,
        decision,
        decided_by or [],
        datetime.now(UTC) + timedelta(hours=24),
        created_at,
    )
    return str(key)


async def decide(
    api: httpx.AsyncClient,
    approval_id: str,
    who: str,
    decision: str = "approve",
    comment: str | None = None,
    key: str | None = None,
) -> httpx.Response:
    headers = as_principal(who) if who != "admin" else dict(AUTH)
    if key is not None:
        headers["Idempotency-Key"] = key
    body: dict[str, Any] = {"decision": decision}
    if comment is not None:
        body["comment"] = comment
    return await api.post(f"/v1/approvals/{approval_id}/decision", json=body, headers=headers)


async def row_of(pool: asyncpg.Pool, approval_id: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM approvals WHERE id = $1", uuid.UUID(approval_id))
    assert row is not None
    return row


async def choices_of(pool: asyncpg.Pool, approval_id: str) -> list[tuple[str, str]]:
    rows = await pool.fetch(
        "SELECT by, decision FROM approval_decisions WHERE approval_id = $1"
        " ORDER BY decided_at, by",
        uuid.UUID(approval_id),
    )
    return [(r["by"], r["decision"]) for r in rows]


async def decide_commands(commands: AbstractQueue) -> list[dict[str, Any]]:
    """Every command in the queue, all of which must be DecideApproval."""
    bodies = [body_of(m) for m in await drain(commands)]
    assert all(b["type"] == "approval.decide" for b in bodies), bodies
    return bodies


# --- deciding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("approvers", "who"),
    [(["dan", "eve"], "eve"), (["group:netops", "carol"], "bob")],
    ids=["direct", "group"],
)
async def test_an_approver_decides(
    api: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    gate: str,
    approvers: list[str],
    who: str,
) -> None:
    approval_id = await insert_approval(pool, gate, approvers=approvers, requester="fay")
    response = await decide(api, approval_id, who, "approve", "looks right")
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["id"] == approval_id
    assert (view["status"], view["decision"], view["decided_by"]) == ("DECIDED", "approve", [who])
    assert view["decided_at"] is not None
    [choice] = view["decisions"]
    assert (choice["by"], choice["decision"], choice["comment"]) == (who, "approve", "looks right")

    row = await row_of(pool, approval_id)
    assert (row["status"], row["decision"], row["decided_by"]) == ("DECIDED", "approve", [who])
    assert row["decided_at"] is not None
    assert await choices_of(pool, approval_id) == [(who, "approve")]

    [command] = await decide_commands(commands)
    assert command["approval_id"] == approval_id
    assert command["instance_id"] == str(row["instance_id"])
    assert (command["step"], command["attempt"]) == (STEP, 1)
    assert (command["by"], command["decision"], command["comment"]) == (
        who,
        "approve",
        "looks right",
    )
    assert datetime.fromisoformat(command["decided_at"]) == row["decided_at"]


async def test_a_quorum_needs_distinct_deciders(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    approval_id = await insert_approval(pool, gate, approvers=["group:netops", "carol"], required=2)
    first = await decide(api, approval_id, "alice", "approve", "one")
    assert first.status_code == 200, first.text
    assert (first.json()["status"], first.json()["decision"]) == ("PENDING", None)
    assert first.json()["decided_by"] == []
    assert [c["by"] for c in first.json()["decisions"]] == ["alice"]
    assert (await row_of(pool, approval_id))["status"] == "PENDING"

    second = await decide(api, approval_id, "carol", "approve", "two")
    assert second.status_code == 200, second.text
    view = second.json()
    assert (view["status"], view["decision"]) == ("DECIDED", "approve")
    assert view["decided_by"] == ["alice", "carol"]
    row = await row_of(pool, approval_id)
    assert (row["status"], row["decided_by"]) == ("DECIDED", ["alice", "carol"])
    # Every choice is a command: the scheduler counts them as the admin did.
    sent = await decide_commands(commands)
    assert [(c["by"], c["decision"]) for c in sent] == [("alice", "approve"), ("carol", "approve")]

    # A third approver finds it decided.
    late = await decide(api, approval_id, "bob", "approve")
    problem = assert_problem(late, 409)
    assert problem["type"].endswith("approval-closed")
    assert "alice, carol" in problem["detail"]


async def test_one_rejection_decides_at_once(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    approval_id = await insert_approval(
        pool, gate, approvers=["group:netops", "group:leads"], required=3
    )
    assert (await decide(api, approval_id, "alice", "approve")).json()["status"] == "PENDING"
    response = await decide(api, approval_id, "carol", "reject", "not today")
    assert response.status_code == 200, response.text
    view = response.json()
    assert (view["status"], view["decision"], view["decided_by"]) == (
        "DECIDED",
        "reject",
        ["carol"],
    )
    assert [(c["by"], c["decision"]) for c in view["decisions"]] == [
        ("alice", "approve"),
        ("carol", "reject"),
    ]
    assert len(await decide_commands(commands)) == 2


async def test_any_choice_but_the_first_decides_at_once(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    approval_id = await insert_approval(
        pool, gate, required=2, choices=["go", "defer", "abort"], approvers=["group:netops"]
    )
    response = await decide(api, approval_id, "bob", "defer")
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["decision"]) == ("DECIDED", "defer")
    await drain(commands)


async def test_a_caller_who_is_not_an_approver_is_refused(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    approval_id = await insert_approval(pool, gate, approvers=["group:netops", "carol"])
    for who in ("eve", "ivy", "admin"):  # not listed; in another group; admin is no exception
        response = await decide(api, approval_id, who)
        problem = assert_problem(response, 403)
        assert problem["type"].endswith("not-an-approver")
        assert who in problem["detail"] and "group:netops" in problem["detail"]
    assert (await row_of(pool, approval_id))["status"] == "PENDING"
    assert await choices_of(pool, approval_id) == []
    assert await drain(commands) == []


@pytest.mark.parametrize("approvers", [["dan", "eve"], ["group:netops"]], ids=["direct", "group"])
async def test_the_requester_may_not_decide_when_forbid_requester(
    api: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    gate: str,
    approvers: list[str],
) -> None:
    requester = approvers[0] if approvers[0] != "group:netops" else "alice"
    approval_id = await insert_approval(pool, gate, approvers=approvers, requester=requester)
    response = await decide(api, approval_id, requester)
    problem = assert_problem(response, 403)
    assert problem["type"].endswith("requester-may-not-decide")
    assert requester in problem["detail"]
    assert await choices_of(pool, approval_id) == []
    assert await drain(commands) == []


async def test_the_requester_may_decide_without_forbid_requester(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    approval_id = await insert_approval(
        pool, gate, approvers=["dan"], requester="dan", forbid_requester=False
    )
    response = await decide(api, approval_id, "dan")
    assert response.status_code == 200, response.text
    assert response.json()["decided_by"] == ["dan"]
    assert len(await decide_commands(commands)) == 1


async def test_a_decided_approval_names_who_decided(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    approval_id = await insert_approval(pool, gate, approvers=["group:netops", "eve"])
    assert (await decide(api, approval_id, "alice", "reject")).status_code == 200
    await drain(commands)
    for who in ("eve", "bob"):
        response = await decide(api, approval_id, who, "approve")
        problem = assert_problem(response, 409)
        assert problem["type"].endswith("approval-closed")
        assert "alice" in problem["detail"] and "'reject'" in problem["detail"], problem
    assert await choices_of(pool, approval_id) == [("alice", "reject")]
    assert await drain(commands) == []


@pytest.mark.parametrize(
    ("status", "decision", "said"),
    [
        ("EXPIRED", "reject", "expired: its timeout decided 'reject'"),
        ("EXPIRED", None, "expired: the step failed"),
        ("CANCELLED", None, "cancelled"),
        ("DECIDED", "approve", "decided ('approve') by carol"),
    ],
)
async def test_a_closed_approval_takes_no_decision(
    api: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    gate: str,
    status: str,
    decision: str | None,
    said: str,
) -> None:
    approval_id = await insert_approval(
        pool,
        gate,
        status=status,
        decision=decision,
        decided_by=["carol"] if status == "DECIDED" else [],
    )
    response = await decide(api, approval_id, "alice", "approve")
    problem = assert_problem(response, 409)
    assert problem["type"].endswith("approval-closed")
    assert said in problem["detail"], problem
    row = await row_of(pool, approval_id)
    assert (row["status"], row["decision"]) == (status, decision)
    assert await choices_of(pool, approval_id) == []
    assert await drain(commands) == []


async def test_a_principal_decides_once(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    approval_id = await insert_approval(pool, gate, approvers=["group:netops"], required=2)
    assert (await decide(api, approval_id, "alice", "approve")).status_code == 200
    # Neither the same choice again (it would count twice toward the quorum) nor another one.
    for decision in ("approve", "reject"):
        response = await decide(api, approval_id, "alice", decision)
        problem = assert_problem(response, 409)
        assert problem["type"].endswith("already-decided")
        assert "alice already chose 'approve'" in problem["detail"], problem
    row = await row_of(pool, approval_id)
    assert (row["status"], row["decided_by"]) == ("PENDING", [])
    assert await choices_of(pool, approval_id) == [("alice", "approve")]
    assert len(await decide_commands(commands)) == 1


async def test_a_second_decision_by_the_decider_is_409(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    approval_id = await insert_approval(pool, gate, approvers=["group:netops"])
    assert (await decide(api, approval_id, "bob", "approve")).status_code == 200
    problem = assert_problem(await decide(api, approval_id, "bob", "approve"), 409)
    assert "bob" in problem["detail"]
    assert len(await decide_commands(commands)) == 1


# --- idempotency ------------------------------------------------------------------------------


async def test_a_retry_with_its_idempotency_key_answers_as_the_first(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    approval_id = await insert_approval(pool, gate, approvers=["group:netops"])
    key = unique("key")
    first = await decide(api, approval_id, "alice", "approve", "ok by me", key=key)
    assert first.status_code == 200, first.text
    for _ in range(2):
        again = await decide(api, approval_id, "alice", "approve", "ok by me", key=key)
        assert again.status_code == 200, again.text
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert await choices_of(pool, approval_id) == [("alice", "approve")]
    assert len(await decide_commands(commands)) == 1, "a retry sends nothing more"


@pytest.mark.parametrize(
    ("decision", "comment"),
    [("reject", "ok by me"), ("approve", "changed my mind"), ("approve", None)],
)
async def test_an_idempotency_key_reused_for_another_decision_is_refused(
    api: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    gate: str,
    decision: str,
    comment: str | None,
) -> None:
    approval_id = await insert_approval(pool, gate, approvers=["group:netops"], required=2)
    key = unique("key")
    assert (await decide(api, approval_id, "alice", "approve", "ok by me", key=key)).is_success
    response = await decide(api, approval_id, "alice", decision, comment, key=key)
    problem = assert_problem(response, 422)
    assert problem["type"].endswith("idempotency-key-reused")
    assert await choices_of(pool, approval_id) == [("alice", "approve")]
    assert len(await decide_commands(commands)) == 1


async def test_the_same_idempotency_key_from_two_principals_is_two_decisions(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    """A key is the caller's own: another principal's request with the same key is not a retry
    of the first, and must not fail with a 500 on the table's unique key."""
    approval_id = await insert_approval(pool, gate, approvers=["group:netops"], required=2)
    key = unique("key")
    assert (await decide(api, approval_id, "alice", "approve", key=key)).status_code == 200
    response = await decide(api, approval_id, "bob", "approve", key=key)
    assert response.status_code != 500, response.text
    await drain(commands)


# --- requests that do not fit ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"decision": "maybe"},
        {"decision": "Approve"},
        {"decision": ""},
        {},
        {"decision": "approve", "extra": 1},
        {"decision": "approve", "comment": "x" * 2001},
    ],
    ids=["unknown", "case", "empty", "missing", "extra-field", "long-comment"],
)
async def test_a_decision_that_does_not_fit_is_422(
    api: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    gate: str,
    body: dict[str, Any],
) -> None:
    approval_id = await insert_approval(pool, gate, approvers=["group:netops"])
    response = await api.post(
        f"/v1/approvals/{approval_id}/decision", json=body, headers=as_principal("alice")
    )
    problem = assert_problem(response, 422)
    assert problem["type"].endswith("invalid-request")
    if body.get("decision") in ("maybe", "Approve"):
        assert "not one of the choices (approve, reject)" in problem["detail"]
    assert await choices_of(pool, approval_id) == []
    assert (await row_of(pool, approval_id))["status"] == "PENDING"
    assert await drain(commands) == []


async def test_an_unknown_approval_is_404(api: httpx.AsyncClient, commands: AbstractQueue) -> None:
    missing = uuid.uuid4()
    problem = assert_problem(await api.get(f"/v1/approvals/{missing}"), 404)
    assert problem["type"].endswith("not-found") and str(missing) in problem["detail"]
    problem = assert_problem(await decide(api, str(missing), "alice"), 404)
    assert problem["type"].endswith("not-found")
    assert await drain(commands) == []
    assert_problem(await api.get("/v1/approvals/not-a-uuid"), 422)
    assert_problem(await decide(api, "not-a-uuid", "alice"), 422)


# --- reading ------------------------------------------------------------------------------------


async def test_get_one_shows_the_approval_and_every_choice(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    approval_id = await insert_approval(
        pool, gate, approvers=["group:netops", "carol"], required=3, requester="fay"
    )
    await decide(api, approval_id, "alice", "approve", "first")
    await decide(api, approval_id, "carol", "approve")
    await drain(commands)
    response = await api.get(f"/v1/approvals/{approval_id}", headers=as_principal("eve"))
    assert response.status_code == 200, response.text
    view = response.json()
    row = await row_of(pool, approval_id)
    assert view["instance_id"] == str(row["instance_id"])
    assert (view["definition"], view["step"], view["attempt"]) == (gate, STEP, 1)
    assert (view["title"], view["details"]) == ("Add sw1?", {"lookup": {"rack": 7}})
    assert view["approvers"] == ["group:netops", "carol"]
    assert (view["required"], view["forbid_requester"], view["requester"]) == (3, True, "fay")
    assert view["choices"] == ["approve", "reject"]
    assert (view["status"], view["decision"], view["decided_by"]) == ("PENDING", None, [])
    assert (view["escalation_level"], view["decided_at"]) == (0, None)
    assert view["due_at"] is not None and view["created_at"] is not None
    decisions = view["decisions"]
    assert [(d["by"], d["decision"], d["comment"]) for d in decisions] == [
        ("alice", "approve", "first"),
        ("carol", "approve", None),
    ]
    assert all(d["decided_at"] for d in decisions)


async def test_the_list_filters_by_status_approver_and_definition(
    api: httpx.AsyncClient, pool: asyncpg.Pool, gate: str
) -> None:
    listed = unique("listed")
    other = unique("other")
    base = datetime.now(UTC) - timedelta(minutes=10)

    def at(n: int) -> datetime:
        return base + timedelta(seconds=n)

    netops = await insert_approval(
        pool, gate, approvers=["group:netops"], created_at=at(1), listed_as=listed
    )
    carol = await insert_approval(
        pool, gate, approvers=["carol", "eve"], created_at=at(2), listed_as=listed
    )
    decided = await insert_approval(
        pool,
        gate,
        approvers=["dan", "group:leads"],
        status="DECIDED",
        decision="approve",
        decided_by=["dan"],
        created_at=at(3),
        listed_as=listed,
    )
    expired = await insert_approval(
        pool, gate, approvers=["group:netops"], status="EXPIRED", created_at=at(4), listed_as=listed
    )
    elsewhere = await insert_approval(
        pool, gate, approvers=["group:netops"], created_at=at(5), listed_as=other
    )

    async def ids(**query: Any) -> list[str]:
        response = await api.get("/v1/approvals", params={"limit": 500, **query})
        assert response.status_code == 200, response.text
        assert response.json()["next_cursor"] is None
        return [item["id"] for item in response.json()["items"]]

    assert await ids(definition=listed) == [netops, carol, decided, expired]
    assert await ids(definition=other) == [elsewhere]
    assert await ids(definition=listed, status="PENDING") == [netops, carol]
    assert await ids(definition=listed, status="decided") == [decided]
    assert await ids(definition=listed, status="EXPIRED") == [expired]
    assert await ids(definition=listed, status="CANCELLED") == []
    # An approver: named, or a member of a group named.
    assert await ids(definition=listed, approver="alice") == [netops, expired]
    assert await ids(definition=listed, approver="bob", status="PENDING") == [netops]
    assert await ids(definition=listed, approver="eve") == [carol]
    assert await ids(definition=listed, approver="carol") == [carol, decided]  # leads: decided
    assert await ids(definition=listed, approver="dan", status="PENDING") == []
    assert await ids(definition=listed, approver="nobody-at-all") == []
    # Across definitions.
    everywhere = await ids(approver="bob", status="PENDING")
    assert netops in everywhere and elsewhere in everywhere
    assert carol not in everywhere and expired not in everywhere
    # Every item is a whole view.
    [item] = (await api.get("/v1/approvals", params={"definition": other})).json()["items"]
    assert item["definition"] == other and item["decisions"] == []

    problem = assert_problem(await api.get("/v1/approvals", params={"status": "WAITING"}), 422)
    assert problem["type"].endswith("invalid-request")


async def test_the_list_pages_with_a_cursor(
    api: httpx.AsyncClient, pool: asyncpg.Pool, gate: str
) -> None:
    listed = unique("paged")
    same = datetime.now(UTC) - timedelta(minutes=5)
    # Three share a creation time: the id breaks the tie, and no page repeats or skips one.
    made = [
        await insert_approval(
            pool, gate, created_at=same if i < 3 else same + timedelta(seconds=i), listed_as=listed
        )
        for i in range(5)
    ]
    expected = sorted(made[:3], key=uuid.UUID) + made[3:]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"definition": listed, "limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        response = await api.get("/v1/approvals", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        pages += 1
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == expected

    for bad in ("not-a-cursor", "W10", "WyJ4IiwieSJd"):  # garbage, [], ["x","y"]
        problem = assert_problem(
            await api.get("/v1/approvals", params={"definition": listed, "cursor": bad}), 422
        )
        assert problem["type"].endswith("invalid-request")
    assert_problem(await api.get("/v1/approvals", params={"limit": 0}), 422)


# --- races --------------------------------------------------------------------------------------


async def test_two_concurrent_decisions_one_wins(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    for _ in range(5):
        approval_id = await insert_approval(pool, gate, approvers=["group:netops"])
        answers = await asyncio.gather(
            decide(api, approval_id, "alice", "approve"),
            decide(api, approval_id, "bob", "reject"),
        )
        assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
        won = next(a for a in answers if a.status_code == 200).json()
        lost = assert_problem(next(a for a in answers if a.status_code == 409), 409)
        assert lost["type"].endswith("approval-closed")
        [winner] = won["decided_by"]
        assert winner in lost["detail"], (won, lost)
        row = await row_of(pool, approval_id)
        assert (row["status"], row["decided_by"], row["decision"]) == (
            "DECIDED",
            [winner],
            won["decision"],
        )
        assert await choices_of(pool, approval_id) == [(winner, won["decision"])]
        [command] = await decide_commands(commands)
        assert command["by"] == winner


async def test_concurrent_votes_reach_a_quorum_once(
    api: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue, gate: str
) -> None:
    approval_id = await insert_approval(pool, gate, approvers=["group:reviewers"], required=2)
    answers = await asyncio.gather(
        *(decide(api, approval_id, who, "approve") for who in ("ivy", "jo", "kay"))
    )
    codes = sorted(a.status_code for a in answers)
    # The row lock orders them: two votes make the quorum, the third finds it decided.
    assert codes == [200, 200, 409], [a.text for a in answers]
    row = await row_of(pool, approval_id)
    assert row["status"] == "DECIDED" and len(row["decided_by"]) == 2
    voted = {who for who, a in zip(("ivy", "jo", "kay"), answers, strict=True) if a.is_success}
    assert set(row["decided_by"]) == voted
    assert {by for by, _ in await choices_of(pool, approval_id)} == voted
    assert len(await decide_commands(commands)) == 2
