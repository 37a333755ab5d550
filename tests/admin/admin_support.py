"""Helpers for the admin API tests (fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from paceline_contracts.messages import HEARTBEAT, ActivityError, InstanceCancelled, ServerHeartbeat
from paceline_contracts.states import ActivityStatus, InstanceStatus, ServerKind, ServerStatus
from paceline_engine.state import ActivityState, CancelRequest, Flag, InstanceState

TOKEN = "test-token-" + secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
"""The token of the principal `admin` (PACELINE_ADMIN_TOKEN), which `client` sends."""
OPERATORS = (
    "alice@example.com", "alice@ops", "alice", "ann", "bo", "bob", "carol", "cy", "dan", "dave",
    "erin", "eve", "fay", "fred", "gil", "hal", "ivy", "jo", "kay", "kim", "lee", "max", "ned",
    "ola", *(f"operator-{i}" for i in range(5)),
)  # fmt: skip
TOKENS = {name: f"{name}-token-{secrets.token_hex(16)}" for name in OPERATORS}
"""Principals of their own (PACELINE_ADMIN_TOKENS), for the tests that tell who asked."""


def as_principal(name: str) -> dict[str, str]:
    """The header that makes a request the principal `name`'s (who asked is the token's)."""
    return {"Authorization": f"Bearer {TOKENS[name]}"}


HEARTBEAT_S = 0.5
"""How often the admin apps and processes of these tests heartbeat (PACELINE_SERVER_HEARTBEAT_S)."""

SIMPLE = {
    "inputs": {"host": {"type": "string"}, "count": {"type": "integer", "default": 1}},
    "steps": [
        {"id": "first", "type": "noop", "with": {"host": "${inputs.host}"}},
        {"id": "second", "type": "sleep", "with": {"seconds": 0}},
    ],
}


Broadcasts = Callable[[str], Awaitable[list[tuple[InstanceCancelled, AbstractIncomingMessage]]]]
"""The `broadcasts` fixture: an instance's cancellation broadcasts on the stream."""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def drain(queue: AbstractQueue, settle_s: float = 0.2) -> list[AbstractIncomingMessage]:
    """Every message in the queue, waiting briefly for stragglers."""
    messages: list[AbstractIncomingMessage] = []
    deadline = asyncio.get_running_loop().time() + settle_s
    while True:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            messages.append(message)
            continue
        if asyncio.get_running_loop().time() > deadline:
            return messages
        await asyncio.sleep(0.02)


def body_of(message: AbstractIncomingMessage) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(message.body)
    return body


async def create_definition(
    client: httpx.AsyncClient, name: str, definition: dict[str, Any] | None = None
) -> dict[str, Any]:
    response = await client.post("/v1/definitions", json={"name": name, **(definition or SIMPLE)})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["title"] and problem["detail"] and problem["type"]
    return problem


def held(server: str, attempt: int, since: datetime, **fields: Any) -> ActivityState:
    """An activity whose `attempt` `server` claimed and started at `since`."""
    return ActivityState(
        attempt=attempt,
        server_id=server,
        started_at=since,
        claimed_by=server,
        claimed_at=since,
        **fields,
    )


def flagged(
    at: datetime,
    *,
    server: str = "worker-1",
    attempt: int = 1,
    kind: str = "redelivered",
    activity_type: str = "noop",
) -> ActivityState:
    """A non-restartable activity whose attempt `server` held when it went down."""
    since = at - timedelta(seconds=30)
    reason = f"attempt {attempt} held by {server} since {since.isoformat()} was redelivered"
    return held(
        server,
        attempt,
        since,
        type=activity_type,
        status=ActivityStatus.INTERRUPTED,
        restartable=False,
        reason=reason,
        interruptions=1,
        flag=Flag(
            kind=kind,
            reason=reason,
            attempt=attempt,
            server_id=server,
            held_since=since,
            flagged_at=at,
        ),
    )


def done(status: ActivityStatus = ActivityStatus.COMPLETED) -> ActivityState:
    return ActivityState(type="noop", status=status, attempt=1, restartable=True, output={})


def running(server: str, attempt: int = 1, *, restartable: bool = False) -> ActivityState:
    """An activity `server` claimed and runs."""
    since = datetime.now(UTC) - timedelta(seconds=5)
    return held(
        server,
        attempt,
        since,
        type="noop",
        status=ActivityStatus.RUNNING,
        message_attempt=attempt,
        restartable=restartable,
    )


async def insert_instance(
    pool: asyncpg.Pool,
    definition: str,
    activities: dict[str, ActivityState],
    status: InstanceStatus = InstanceStatus.FLAGGED,
    *,
    cancel: CancelRequest | None = None,
    error: ActivityError | None = None,
) -> tuple[str, str]:
    """An instance row as the scheduler would have written it; its id and trace id."""
    instance_id, trace_id = uuid.uuid4(), secrets.token_hex(16)
    counts = Counter(a.status.value for a in activities.values())
    state = InstanceState(status=status, counts=dict(counts), cancel=cancel, error=error)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO instances (id, definition, version, status, state, trace_id, traceparent,"
            " started_by, started_how) VALUES ($1, $2, 1, $3, $4::jsonb, $5, $6, 'tests', 'api')",
            instance_id,
            definition,
            status.value,
            state.document(),
            trace_id,
            f"00-{trace_id}-{secrets.token_hex(8)}-01",
        )
        await conn.executemany(
            # No position, as rows carried over from the single-document layout have: the
            # admin orders them by the definition.
            "INSERT INTO activities (instance_id, step, status, state)"
            " VALUES ($1, $2, $3, $4::jsonb)",
            [
                (instance_id, step, a.status.value, a.model_dump(mode="json"))
                for step, a in activities.items()
            ],
        )
    return str(instance_id), trace_id


async def insert_server(
    pool: asyncpg.Pool,
    *,
    kind: ServerKind = ServerKind.ACTIVITY_WORKER,
    status: ServerStatus = ServerStatus.ACTIVE,
    silent_s: float = 0.0,
    started_at: datetime | None = None,
    in_flight: Sequence[Any] = (),
    server_id: str | None = None,
) -> str:
    """A registry row as the scheduler writes it from a heartbeat `silent_s` seconds ago."""
    server_id = server_id or unique(kind.value)
    await pool.execute(
        "INSERT INTO servers (id, kind, host, pid, started_at, status, last_heartbeat,"
        " reported_at, in_flight)"
        " VALUES ($1, $2, 'test-host', 4242, coalesce($3, now() - interval '1 hour'), $4,"
        " now() - make_interval(secs => $5::float8), now() - make_interval(secs => $5::float8),"
        " $6::jsonb)",
        server_id,
        kind.value,
        started_at,
        status.value,
        silent_s,
        list(in_flight),
    )
    return server_id


async def insert_from(pool: asyncpg.Pool, beat: ServerHeartbeat) -> None:
    """The row the scheduler's registry writes for a heartbeat."""
    await pool.execute(
        "INSERT INTO servers (id, kind, host, pid, started_at, status, last_heartbeat,"
        " reported_at, in_flight)"
        " VALUES ($1, $2, $3, $4, $5, $6, now(), $7, $8::jsonb)",
        beat.server_id,
        beat.kind.value,
        beat.host,
        beat.pid,
        beat.started_at,
        beat.status.value,
        beat.at,
        [f.model_dump(mode="json") for f in beat.in_flight],
    )


async def next_heartbeat(
    queue: AbstractQueue, wanted: Callable[[ServerHeartbeat], bool], timeout_s: float = 10.0
) -> ServerHeartbeat:
    """The next heartbeat on the servers queue that is `wanted` (others are taken and dropped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.02)
            continue
        beat = HEARTBEAT.validate_json(message.body)
        if wanted(beat):
            return beat
    raise AssertionError(f"no such heartbeat within {timeout_s}s")
