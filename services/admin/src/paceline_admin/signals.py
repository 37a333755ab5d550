"""Signals: `POST /v1/instances/{id}/signals/{name}` and `GET /v1/instances/{id}/signals`.

A signal is recorded (a `signals` row, BUFFERED) with its deliver command in the outbox, in one
transaction, and the answer comes only after that commit. The scheduler then delivers it to a
`wait` step for its name, keeps it buffered until the process reaches one, or keeps it as late
(no wait will take it); the answer waits a moment for that decision and says it, or BUFFERED
when no scheduler has decided yet (one will: the command is durable).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import asyncpg
import orjson
from fastapi import APIRouter, Body, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from paceline_admin import sending
from paceline_admin.auth import Authorized, require_token
from paceline_admin.documents import as_json_document, digest
from paceline_admin.instances import IdempotencyKey, IdParam, not_found
from paceline_admin.problems import ApiError, ProblemItem, problem_responses, summarize
from paceline_admin.resources import Broker, BrokerConnection, Db
from paceline_admin.schemas import refer
from paceline_contracts.messages import DeliverSignal
from paceline_contracts.queues import Queue
from paceline_contracts.states import InstanceStatus
from paceline_infra import db, outbox
from paceline_infra.outbox import OutboxMessage
from paceline_infra.telemetry import in_instance

log = logging.getLogger(__name__)

DECISION_WAIT_S = 2.0
"""How long the answer waits for the scheduler to decide the signal's fate."""
DECISION_POLL_S = 0.05
MAX_PAYLOAD_BYTES = 16 * 1024
"""A signal's payload, as JSON. Buffered signals live in their instance's small document (at
most `MAX_BUFFERED_SIGNALS` of them), so this bounds it."""

SignalName = Annotated[
    str,
    Path(
        description="The signal's name, as `wait.signal` spells it.",
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.:-]+$",
    ),
]

router = APIRouter(
    prefix="/v1/instances",
    tags=["signals"],
    dependencies=[Depends(require_token)],
    responses=problem_responses(401, 422, 500, 503),
)


class SignalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    payload: Annotated[
        dict[str, Any],
        refer(
            "JsonObject",
            "What the wait's `when` and the next steps see; at most "
            f"{MAX_PAYLOAD_BYTES // 1024} KiB as JSON.",
        ),
    ] = Field(default_factory=dict)


class SignalAccepted(BaseModel):
    signal_id: UUID
    status: str = Field(
        description="DELIVERED (it ended a wait), BUFFERED (kept until the process reaches a "
        "wait for it, or not decided yet), or LATE (no wait will take it)."
    )


class SignalView(BaseModel):
    signal_id: UUID
    name: str
    payload: dict[str, Any]
    by: str
    status: str
    step: str | None = Field(description="The wait it ended, when DELIVERED.")
    reason: str | None
    received_at: datetime
    decided_at: datetime | None = Field(description="When the scheduler applied it.")


class SignalList(BaseModel):
    items: list[SignalView] = Field(description="Oldest first.")


def _storable(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as the database stores it; 422 with every problem when it cannot be
    stored, or when it is larger than MAX_PAYLOAD_BYTES (an instance may hold it while a
    wait is not reached yet)."""
    document, problems = as_json_document(payload, "body.payload")
    if not problems and len(orjson.dumps(document)) > MAX_PAYLOAD_BYTES:
        problems = [
            ProblemItem(
                path="body.payload", message=f"larger than {MAX_PAYLOAD_BYTES} bytes of JSON"
            )
        ]
    if problems:
        raise ApiError(
            422,
            summarize(problems, "the payload"),
            kind="invalid-request",
            title="Invalid request",
            errors=problems,
        )
    stored: dict[str, Any] = document
    return stored


@router.post(
    "/{instance_id}/signals/{name}",
    status_code=202,
    response_model=SignalAccepted,
    responses=problem_responses(400, 404, 409, 413),
)
async def send_signal(
    instance_id: IdParam,
    name: SignalName,
    principal: Authorized,
    pool: Db,
    publisher: Broker,
    connection: BrokerConnection,
    response: Response,
    idempotency_key: IdempotencyKey = None,
    body: Annotated[SignalRequest | None, Body()] = None,
) -> SignalAccepted:
    """Send a signal to the instance's `wait` steps for `name`. Answered once it is
    committed; a retry with the same `Idempotency-Key` answers as the first did."""
    payload = _storable((body or SignalRequest()).payload)
    request_digest = digest({"name": name, "payload": payload})
    if idempotency_key is not None:
        existing = await _by_key(pool, instance_id, idempotency_key)
        if existing is not None:
            return await _replay(pool, existing, request_digest, response)
    target = await pool.fetchrow(
        "SELECT status, traceparent FROM instances WHERE id = $1", instance_id
    )
    if target is None:
        raise not_found(instance_id)
    status = InstanceStatus(target["status"])
    if status.is_final:
        raise ApiError(
            409,
            f"instance {instance_id} has ended ({status.value}): no wait will take a signal",
            kind="instance-ended",
        )
    sending.require_broker(connection, "signal")
    signal_id = uuid.uuid4()
    with in_instance(
        f"signal {name}",
        target["traceparent"],
        {"paceline.instance_id": str(instance_id), "paceline.by": principal},
    ):
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """
                INSERT INTO signals (id, instance_id, name, payload, by, idempotency_key,
                                     request_hash, status)
                VALUES ($1, $2, $3, $4, $5, $6, $7, 'BUFFERED')
                ON CONFLICT (instance_id, idempotency_key) DO NOTHING
                RETURNING id, received_at
                """,
                signal_id,
                instance_id,
                name,
                payload,
                principal,
                idempotency_key,
                request_digest,
            )
            if row is None:  # a retry with the same key committed while this one waited
                assert idempotency_key is not None
                existing = await _by_key(conn, instance_id, idempotency_key)
                assert existing is not None
                return await _replay(pool, existing, request_digest, response)
            message = OutboxMessage.of(
                Queue.COMMANDS,
                DeliverSignal(
                    instance_id=instance_id,
                    signal_id=signal_id,
                    name=name,
                    payload=payload,
                    by=principal,
                    received_at=row["received_at"],
                ),
            )
            await outbox.stage(conn, [message])
        await sending.flush(pool, publisher, [message], f"signal {name} to {instance_id}")
        log.info("signal %s to %s sent by %s", name, instance_id, principal)
    return SignalAccepted(signal_id=signal_id, status=await _fate(pool, signal_id))


async def _by_key(
    conn: asyncpg.Pool | asyncpg.Connection, instance_id: UUID, key: str
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT id, request_hash FROM signals WHERE instance_id = $1 AND idempotency_key = $2",
        instance_id,
        key,
    )
    return row


async def _replay(
    pool: asyncpg.Pool, row: asyncpg.Record, request_digest: str, response: Response
) -> SignalAccepted:
    """The answer to a retry with the same Idempotency-Key (`Idempotent-Replayed: true`, as a
    start's); 422 when the key was used for another signal."""
    if row["request_hash"] != request_digest:
        raise ApiError(
            422,
            "this Idempotency-Key was already used for a different signal",
            kind="idempotency-key-reused",
            title="Idempotency-Key reused",
        )
    response.headers["Idempotent-Replayed"] = "true"
    return SignalAccepted(signal_id=row["id"], status=await _fate(pool, row["id"]))


async def _fate(pool: asyncpg.Pool, signal_id: UUID) -> str:
    """The signal's status once the scheduler decided it, or BUFFERED after DECISION_WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DECISION_WAIT_S
    while True:
        try:
            row = await pool.fetchrow(
                "SELECT status, decided_at FROM signals WHERE id = $1", signal_id
            )
        except db.UNAVAILABLE as exc:
            log.warning("signal %s: could not see its fate: %r", signal_id, exc)
            return "BUFFERED"
        if row is not None and row["decided_at"] is not None:
            return str(row["status"])
        if loop.time() >= deadline:
            return "BUFFERED"
        await asyncio.sleep(DECISION_POLL_S)


@router.get("/{instance_id}/signals", response_model=SignalList, responses=problem_responses(404))
async def list_signals(instance_id: IdParam, pool: Db) -> SignalList:
    """Every signal sent to the instance, oldest first, with what became of it."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        if await conn.fetchval("SELECT 1 FROM instances WHERE id = $1", instance_id) is None:
            raise not_found(instance_id)
        rows = await conn.fetch(
            "SELECT id AS signal_id, name, payload, by, status, step, reason, received_at,"
            " decided_at FROM signals WHERE instance_id = $1 ORDER BY received_at, id",
            instance_id,
        )
    return SignalList(items=[SignalView(**dict(r)) for r in rows])
