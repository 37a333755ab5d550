"""Events: `POST /v1/events` and `GET /v1/events/{event_id}` (issue 11).

An event is recorded with its deduplication and every instance its subscribers start, and
their start commands, in one transaction (paceline_starts.intake); the answer comes only after
that commit, and the commands are published right after it (the scheduler's outbox relay
publishes whatever the flush did not). The `events.in` queue takes the same events; the
scheduler consumes it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Depends, Header, Path, Response

from paceline_admin import sending
from paceline_admin.auth import Authorized, require_token
from paceline_admin.documents import as_json_document
from paceline_admin.event_models import EventAccepted, EventRequest, EventView
from paceline_admin.problems import ApiError, ProblemItem, problem_responses, summarize
from paceline_admin.resources import Broker, BrokerConnection, Db
from paceline_starts import intake
from paceline_starts.intake import ReceivedVia

log = logging.getLogger(__name__)

API = ReceivedVia.API
ATTEMPTS = 3
"""Tries of an event's transaction that lost a deadlock (asyncpg.TransactionRollbackError)."""

EventIdParam = Annotated[UUID, Path(description="Paceline's id of the event (`event_id`).")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[\x20-\x7e]+$",
        description="Makes retries safe: the same event sent again with this key starts nothing "
        "and answers as the first did (`duplicate: true`); the key with another event is "
        "refused (422). Without it, the event's `source` and `id` are its key.",
    ),
]

router = APIRouter(
    prefix="/v1/events",
    tags=["events"],
    dependencies=[Depends(require_token)],
    responses=problem_responses(401, 422, 500, 503),
)


def _data(data: Any) -> Any:
    """The data as the database stores it; 422 with the problems when it cannot be stored or
    is larger than `intake.MAX_DATA_BYTES` of JSON."""
    document, problems = as_json_document(data, "body.data")
    if not problems and (why := intake.data_problem(document)):
        problems = [ProblemItem(path="body.data", message=why)]
    if problems:
        raise ApiError(
            422,
            summarize(problems, "the event"),
            kind="invalid-request",
            title="Invalid request",
            errors=problems,
        )
    return document


async def _accept(
    pool: asyncpg.Pool, event: intake.Event, key: str | None, principal: str
) -> intake.Accepted:
    """The event recorded in a transaction of its own. One that lost a deadlock to another
    writer of the same keys (the scheduler applies several events in one transaction) is
    undone whole, and tried again."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await intake.accept_event(
                    conn, event, idempotency_key=key, received_by=principal, received_via=API
                )
        except asyncpg.TransactionRollbackError as exc:
            if attempt == ATTEMPTS:
                raise
            log.warning("event %s: %s; trying again", event.type, exc)
    raise AssertionError("unreachable")


@router.post(
    "",
    status_code=202,
    response_model=EventAccepted,
    responses=problem_responses(400, 413),
)
async def post_event(
    body: EventRequest,
    principal: Authorized,
    pool: Db,
    publisher: Broker,
    connection: BrokerConnection,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Record an event and start an instance for each trigger it satisfies, in one
    transaction; answered once it is committed. A repeat (the same `Idempotency-Key`, or the
    same `source` and `id`) answers the first answer with `duplicate: true` and the header
    `Idempotent-Replayed: true`; an event no definition subscribes to is recorded all the same
    (`no_subscriber: true`)."""
    event = intake.Event(type=body.type, id=body.id, source=body.source, data=_data(body.data))
    sending.require_broker(connection, "event")
    try:
        accepted = await _accept(pool, event, idempotency_key, principal)
    except intake.IdempotencyKeyReused as exc:
        raise ApiError(
            422,
            f"{exc}: send the same event again, or another key",
            kind="idempotency-key-reused",
            title="Idempotency-Key reused",
        ) from exc
    if accepted.messages:
        what = f"event {accepted.event_id}: {len(accepted.messages)} start command(s)"
        await sending.flush(pool, publisher, accepted.messages, what)
    response.headers["Location"] = f"/v1/events/{accepted.event_id}"
    if accepted.duplicate:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        log.info(
            "event %s (%s) from %s: %d instance(s) started",
            accepted.event_id,
            event.type,
            principal,
            len(accepted.messages),
        )
    return accepted.answer


@router.get("/{event_id}", response_model=EventView, responses=problem_responses(404))
async def get_event(event_id: EventIdParam, pool: Db) -> Any:
    """An event as recorded, and what it started: each trigger's outcome as first answered,
    with the current status of each instance."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(
            """
            SELECT id, type, event_id, source, data, received_by, received_via, received_at,
                   answer
            FROM events WHERE id = $1
            """,
            event_id,
        )
        if row is None:
            raise ApiError(404, f"event {event_id} does not exist", kind="not-found")
        starts = list(row["answer"].get("instances", []))
        ids = [UUID(s["instance_id"]) for s in starts if s.get("instance_id")]
        statuses = {
            str(r["id"]): r["status"]
            for r in await conn.fetch(
                "SELECT id, status FROM instances WHERE id = ANY($1::uuid[])", ids
            )
        }
    return {
        "event_id": row["id"],
        "type": row["type"],
        "id": row["event_id"],
        "source": row["source"],
        "data": row["data"],
        "received_by": row["received_by"],
        "received_via": row["received_via"],
        "received_at": row["received_at"],
        "no_subscriber": bool(row["answer"].get("no_subscriber", not starts)),
        "instances": [{**s, "status": statuses.get(s.get("instance_id") or "")} for s in starts],
    }
