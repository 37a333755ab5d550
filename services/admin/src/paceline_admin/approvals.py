"""Approvals: `GET /v1/approvals`, `GET /v1/approvals/{id}`, `POST /v1/approvals/{id}/decision`.

The scheduler creates an approval (once per attempt) when a process reaches an `approval` step.
A decision is recorded here, after checking who may decide, in one transaction that locks the
approval row: the choice (one per decider), the approval's outcome when this choice decides it
(the first choice needs `required` distinct deciders; any other decides at once), and the
command that tells the scheduler. The scheduler's timeout takes the same lock, so a decision
and a timeout never both win; and a decision is accepted while no scheduler runs.
"""

from __future__ import annotations

import logging
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from paceline_admin import sending
from paceline_admin.auth import Authorized, require_token
from paceline_admin.filters import chosen, one_of
from paceline_admin.instances import IdempotencyKey
from paceline_admin.paging import (
    TIME_ID_CURSOR,
    Limit,
    cursor_id,
    cursor_parts,
    cursor_query,
    cursor_time,
    encode_cursor,
)
from paceline_admin.params import Text
from paceline_admin.principals import Principals
from paceline_admin.problems import ApiError, ProblemItem, problem_responses
from paceline_admin.resources import Broker, BrokerConnection, Db
from paceline_contracts.messages import DecideApproval
from paceline_contracts.queues import Queue
from paceline_infra import outbox
from paceline_infra.outbox import OutboxMessage
from paceline_infra.telemetry import in_instance

log = logging.getLogger(__name__)


class ApprovalStatus(StrEnum):
    PENDING = "PENDING"
    DECIDED = "DECIDED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


StatusFilter = Annotated[
    Annotated[str, one_of(ApprovalStatus)] | None, Query(description="Only this status.")
]

ApprovalId = Annotated[UUID, Path(description="The approval id.")]

router = APIRouter(
    prefix="/v1/approvals",
    tags=["approvals"],
    dependencies=[Depends(require_token)],
    responses=problem_responses(401, 422, 500, 503),
)


class Choice(BaseModel):
    by: str
    decision: str
    comment: str | None
    decided_at: datetime


class ApprovalView(BaseModel):
    id: UUID
    instance_id: UUID
    definition: str
    step: str
    attempt: int
    title: str
    details: Any
    approvers: list[str] = Field(description="Principals and `group:<name>`, escalations included.")
    required: int
    forbid_requester: bool
    requester: str = Field(description="Who started the instance.")
    choices: list[str]
    status: str = Field(description="PENDING, DECIDED, EXPIRED (its timeout decided) or CANCELLED.")
    decision: str | None
    decided_by: list[str]
    escalation_level: int
    due_at: datetime | None
    created_at: datetime
    decided_at: datetime | None
    decisions: list[Choice] = Field(description="Every decider's choice, oldest first.")


class ApprovalPage(BaseModel):
    items: list[ApprovalView] = Field(description="Oldest first.")
    next_cursor: str | None


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    decision: str = Field(
        min_length=1, max_length=200, pattern=r"^[^\x00]+$", description="One of the `choices`."
    )
    comment: str | None = Field(default=None, max_length=2000, pattern=r"^[^\x00]*$")


_COLUMNS = """
    a.id, a.instance_id, a.definition, a.step, a.attempt, a.title, a.details, a.approvers,
    a.required, a.forbid_requester, a.requester, a.choices, a.status, a.decision, a.decided_by,
    a.escalation_level, a.due_at, a.created_at, a.decided_at
"""


_ONE = f"SELECT {_COLUMNS} FROM approvals a WHERE a.id = $1"  # noqa: S608 (constants only)


async def _decisions(
    conn: asyncpg.Pool | asyncpg.Connection, ids: list[UUID]
) -> dict[UUID, list[Choice]]:
    rows = await conn.fetch(
        "SELECT approval_id, by, decision, comment, decided_at FROM approval_decisions"
        " WHERE approval_id = ANY($1::uuid[]) ORDER BY decided_at, by",
        ids,
    )
    found: dict[UUID, list[Choice]] = {i: [] for i in ids}
    for r in rows:
        found[r["approval_id"]].append(
            Choice(
                by=r["by"], decision=r["decision"], comment=r["comment"], decided_at=r["decided_at"]
            )
        )
    return found


async def _views(
    conn: asyncpg.Pool | asyncpg.Connection, rows: list[asyncpg.Record]
) -> list[ApprovalView]:
    choices = await _decisions(conn, [r["id"] for r in rows])
    return [ApprovalView(**dict(r), decisions=choices[r["id"]]) for r in rows]


def _principals(request: Request) -> Principals:
    principals: Principals = request.app.state.settings.principals
    return principals


@router.get("", response_model=ApprovalPage)
async def list_approvals(
    request: Request,
    pool: Db,
    limit: Limit = 50,
    cursor: Annotated[str | None, cursor_query(TIME_ID_CURSOR)] = None,
    status: StatusFilter = None,
    approver: Annotated[
        str | None,
        Query(description="Only those this principal may decide (directly or by a group)."),
        Text,
    ] = None,
    definition: Annotated[str | None, Query(description="Only this definition."), Text] = None,
) -> ApprovalPage:
    """Approvals, oldest first, a page at a time."""
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    where: list[str] = []
    if status is not None:
        (wanted,) = chosen(status, ApprovalStatus, "status")
        where.append(f"a.status = {arg(wanted)}")
    if approver is not None:
        who = [approver, *(f"group:{g}" for g in _principals(request).groups_of(approver))]
        where.append(f"a.approvers && {arg(who)}::text[]")
    if definition is not None:
        where.append(f"a.definition = {arg(definition)}")
    if cursor:
        at, last = cursor_parts(cursor, 2)
        key = (cursor_time(at), cursor_id(last))
        where.append(f"(a.created_at, a.id) > ({arg(key[0])}::timestamptz, {arg(key[1])}::uuid)")
    # Only placeholders are interpolated; every value travels as a parameter.
    sql = (
        f"SELECT {_COLUMNS} FROM approvals a"  # noqa: S608 (placeholders only)
        f"{' WHERE ' + ' AND '.join(where) if where else ''}"
        f" ORDER BY a.created_at, a.id LIMIT {arg(limit + 1)}"
    )
    rows = await pool.fetch(sql, *args)
    items = await _views(pool, rows[:limit])
    last_item = items[-1] if items else None
    return ApprovalPage(
        items=items,
        next_cursor=(
            encode_cursor(last_item.created_at, last_item.id)
            if last_item is not None and len(rows) > limit
            else None
        ),
    )


def _invalid(path: str, message: str) -> ApiError:
    """422 as every invalid request is answered: with the problem at its path."""
    return ApiError(
        422,
        message,
        kind="invalid-request",
        title="Invalid request",
        errors=[ProblemItem(path=path, message=message)],
    )


def _not_found(approval_id: UUID) -> ApiError:
    return ApiError(404, f"approval {approval_id} does not exist", kind="not-found")


@router.get("/{approval_id}", response_model=ApprovalView, responses=problem_responses(404))
async def get_approval(approval_id: ApprovalId, pool: Db) -> ApprovalView:
    row = await pool.fetchrow(_ONE, approval_id)
    if row is None:
        raise _not_found(approval_id)
    [view] = await _views(pool, [row])
    return view


@router.post(
    "/{approval_id}/decision",
    response_model=ApprovalView,
    responses=problem_responses(400, 403, 404, 409, 413),
)
async def decide(
    approval_id: ApprovalId,
    body: DecisionRequest,
    request: Request,
    response: Response,
    principal: Authorized,
    pool: Db,
    publisher: Broker,
    connection: BrokerConnection,
    idempotency_key: IdempotencyKey = None,
) -> ApprovalView:
    """Record the caller's decision. 200 once it is committed (the scheduler applies it);
    409 naming who decided when the approval was already decided, expired or cancelled, or
    when the caller decided already; 403 when the caller may not decide."""
    sending.require_broker(connection, "decision")
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"{_ONE} FOR UPDATE",
            approval_id,
        )
        if row is None:
            raise _not_found(approval_id)
        mine = await conn.fetchrow(
            "SELECT decision, comment, idempotency_key FROM approval_decisions"
            " WHERE approval_id = $1 AND by = $2",
            approval_id,
            principal,
        )
        if mine is not None:
            if idempotency_key is not None and mine["idempotency_key"] == idempotency_key:
                if (mine["decision"], mine["comment"]) != (body.decision, body.comment):
                    raise ApiError(
                        422,
                        "this Idempotency-Key was already used for a different decision",
                        kind="idempotency-key-reused",
                        title="Idempotency-Key reused",
                    )
                [view] = await _views(conn, [row])
                response.headers["Idempotent-Replayed"] = "true"
                return view  # a retry: answered as the first
            raise ApiError(
                409,
                f"{principal} already chose {mine['decision']!r} on approval {approval_id}",
                kind="already-decided",
            )
        _check_may_decide(row, principal, body.decision, _principals(request))
        message = await _record(conn, row, principal, body, idempotency_key)
        row = await conn.fetchrow(_ONE, approval_id)
        assert row is not None
        [view] = await _views(conn, [row])
    await sending.flush(pool, publisher, [message], f"decision on approval {approval_id}")
    log.info("approval %s: %s chose %s", approval_id, principal, body.decision)
    return view


def _check_may_decide(
    row: asyncpg.Record, principal: str, decision: str, principals: Principals
) -> None:
    if row["status"] != "PENDING":
        who = ", ".join(row["decided_by"]) or "its timeout"
        what = {
            "DECIDED": f"was decided ({row['decision']!r}) by {who}",
            "EXPIRED": f"expired: {who} decided {row['decision']!r}"
            if row["decision"]
            else "expired: the step failed",
            "CANCELLED": "was cancelled with its instance",
        }[row["status"]]
        raise ApiError(409, f"approval {row['id']} {what}", kind="approval-closed")
    if not any(principals.is_member(principal, who) for who in row["approvers"]):
        raise ApiError(
            403,
            f"{principal} is not one of the approvers ({', '.join(row['approvers'])})",
            kind="not-an-approver",
        )
    if row["forbid_requester"] and principal == row["requester"]:
        raise ApiError(
            403,
            f"{principal} started this instance and may not approve it (forbid_requester)",
            kind="requester-may-not-decide",
        )
    if decision not in row["choices"]:
        choices = ", ".join(row["choices"])
        raise _invalid("body.decision", f"{decision!r} is not one of the choices ({choices})")


async def _record(
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    principal: str,
    body: DecisionRequest,
    idempotency_key: str | None,
) -> OutboxMessage:
    at = await conn.fetchval(
        "INSERT INTO approval_decisions (approval_id, by, decision, comment, idempotency_key)"
        " VALUES ($1, $2, $3, $4, $5) RETURNING decided_at",
        row["id"],
        principal,
        body.decision,
        body.comment,
        idempotency_key,
    )
    approving = row["choices"][0]
    voters = [
        r["by"]
        for r in await conn.fetch(
            "SELECT by FROM approval_decisions WHERE approval_id = $1 AND decision = $2"
            " ORDER BY decided_at, by",
            row["id"],
            approving,
        )
    ]
    if body.decision != approving or len(voters) >= row["required"]:
        await conn.execute(
            "UPDATE approvals SET status = 'DECIDED', decision = $2, decided_by = $3,"
            " decided_at = $4 WHERE id = $1",
            row["id"],
            body.decision,
            voters if body.decision == approving else [principal],
            at,
        )
    traceparent = await conn.fetchval(
        "SELECT traceparent FROM instances WHERE id = $1", row["instance_id"]
    )
    # In the instance's own trace, so that the decision shows up in it.
    with in_instance(
        "decide approval",
        traceparent,
        {
            "paceline.instance_id": str(row["instance_id"]),
            "paceline.step": row["step"],
            "paceline.by": principal,
        },
    ):
        message = OutboxMessage.of(
            Queue.COMMANDS,
            DecideApproval(
                instance_id=row["instance_id"],
                approval_id=row["id"],
                step=row["step"],
                attempt=row["attempt"],
                by=principal,
                decision=body.decision,
                comment=body.comment,
                decided_at=at,
            ),
        )
    await outbox.stage(conn, [message])
    return message
