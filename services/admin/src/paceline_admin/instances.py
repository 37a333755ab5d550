"""Routes for process instances: start, list, read, cancel, resolve a flag, history."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Response
from pydantic import ValidationError

from paceline_admin import cancelling, holders, resolving, starting
from paceline_admin import instance_store as store
from paceline_admin.activities import activity_views
from paceline_admin.auth import Authorized, require_token
from paceline_admin.filters import chosen, several_of
from paceline_admin.holders import LostAfter
from paceline_admin.instance_models import (
    CancelAccepted,
    CancelRequestBody,
    CancelView,
    HistoryEvent,
    InstanceDetail,
    InstanceHistory,
    InstancePage,
    InstanceSummary,
    ResolveAccepted,
    ResolveRequest,
    StartedInstance,
    StartInstanceRequest,
    WaitView,
)
from paceline_admin.paging import (
    EVENT_CURSOR,
    TIME_ID_CURSOR,
    Limit,
    cursor_id,
    cursor_parts,
    cursor_query,
    cursor_time,
    encode_cursor,
)
from paceline_admin.params import Text
from paceline_admin.problems import ApiError, problem_responses
from paceline_admin.resources import Broker, BrokerConnection, Db
from paceline_contracts.states import ActivityStatus, InstanceStatus

log = logging.getLogger(__name__)

HISTORY_PAGE_MAX = 10_000
"""`GET .../history` answers at most this many events a page (and this many by default)."""

MAX_EMBEDDED_ACTIVITIES = 1000
"""`GET /v1/instances/{id}` embeds at most this many activities (the first, in definition
order); `GET /v1/instances/{id}/activities` pages through all of them."""

IdParam = Annotated[UUID, Path(description="The instance id.")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[\x20-\x7e]+$",
        description="Makes retries safe: a retry with the same key and request answers with the "
        "same instance; the same key with another request is refused (422).",
    ),
]

StepParam = Annotated[str, Path(description="The step id of the activity."), Text]

StatusFilter = Annotated[
    list[Annotated[str, several_of(InstanceStatus)]] | None,
    Query(description="Only these statuses: repeat the parameter or separate them with commas."),
]

# The token is checked for every route here; `Authorized` in a signature also names who asked:
# the token's principal, recorded as `started_by` and `by` (no header can name anyone else).
router = APIRouter(
    prefix="/v1/instances",
    tags=["instances"],
    dependencies=[Depends(require_token)],
    responses=problem_responses(401, 422, 500, 503),
)


@router.post(
    "",
    status_code=202,
    response_model=StartedInstance,
    responses=problem_responses(400, 404, 409, 413),
)
async def start_instance(
    body: StartInstanceRequest,
    response: Response,
    principal: Authorized,
    pool: Db,
    publisher: Broker,
    idempotency_key: IdempotencyKey = None,
) -> StartedInstance:
    """Record a PENDING instance and send its start command; the scheduler runs it.

    An unknown definition or version is 404; inputs that do not fit the definition are 422
    with every problem in `errors`. A replayed Idempotency-Key answers 202 too, with the
    header `Idempotent-Replayed: true` and the instance's current status. The instance's
    `started_by` is the principal whose token the request carries."""
    started, replayed = await starting.start_instance(
        pool,
        publisher,
        body,
        started_by=principal,
        idempotency_key=idempotency_key,
    )
    response.headers["Location"] = f"/v1/instances/{started.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return started


def _after(cursor: str) -> tuple[datetime, UUID]:
    at, last_id = cursor_parts(cursor, 2)
    return cursor_time(at), cursor_id(last_id)


@router.get("", response_model=InstancePage)
async def list_instances(
    pool: Db,
    limit: Limit = 50,
    cursor: Annotated[str | None, cursor_query(TIME_ID_CURSOR)] = None,
    status: StatusFilter = None,
    definition: Annotated[str | None, Query(description="Only this definition."), Text] = None,
) -> InstancePage:
    """Instances, newest first, a page at a time."""
    rows = await store.page(
        pool,
        statuses=chosen(status, InstanceStatus, "status"),
        definition=definition,
        after=_after(cursor) if cursor else None,
        limit=limit + 1,
    )
    items = [InstanceSummary(**dict(r)) for r in rows[:limit]]
    last = items[-1] if items else None
    next_cursor = (
        encode_cursor(last.created_at, last.id) if last is not None and len(rows) > limit else None
    )
    return InstancePage(items=items, next_cursor=next_cursor)


def not_found(instance_id: UUID) -> ApiError:
    return ApiError(404, f"instance {instance_id} does not exist", kind="not-found")


@router.get("/{instance_id}", response_model=InstanceDetail, responses=problem_responses(404))
async def get_instance(instance_id: IdParam, pool: Db, lost_after_s: LostAfter) -> InstanceDetail:
    """The instance with its inputs, outputs and activities; for a flagged activity, the
    server that held the attempt as the registry shows it now (`flag.holder`); and its cancel,
    with what it still waits for (`cancel.waiting_for`) while the instance is CANCELLING."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        row = await store.detail(conn, instance_id)
        if row is None:
            raise not_found(instance_id)
        page = await store.activity_page(conn, instance_id, limit=MAX_EMBEDDED_ACTIVITIES + 1)
        total = len(page)
        if total > MAX_EMBEDDED_ACTIVITIES:
            total = await store.activity_count(conn, instance_id)
        status = InstanceStatus(row["status"])
        outputs, outputs_truncated = (
            await store.outputs(conn, instance_id, MAX_EMBEDDED_ACTIVITIES)
            if status is InstanceStatus.COMPLETED
            else (None, False)
        )
        running = await store.open_activities(conn, instance_id) if not status.is_final else {}
        approvals = (
            {
                (r["step"], r["attempt"]): r["id"]
                for r in await conn.fetch(
                    "SELECT step, attempt, id FROM approvals"
                    " WHERE instance_id = $1 AND status = 'PENDING'",
                    instance_id,
                )
            }
            if any(_waits_for_approval(a) for a in running.values())
            else {}
        )
    state: dict[str, Any] = row["state"] or {}
    shown = page[:MAX_EMBEDDED_ACTIVITIES]
    activities: dict[str, Any] = {r["step"]: r["state"] for r in shown}
    servers = await holders.lookup(
        pool,
        (a.get("flag") for a in activities.values() if isinstance(a, dict)),
        lost_after_s=lost_after_s,
    )
    fields = {k: row[k] for k in InstanceSummary.model_fields}
    unordered = any(r["position"] == store.UNPLACED for r in shown)
    return InstanceDetail(
        **fields,
        inputs=state.get("inputs") or {},
        outputs=outputs,
        error=state.get("error"),
        activities=activity_views(
            instance_id,
            activities,
            row["definition_body"] if unordered else None,
            servers,
        ),
        activity_count=total,
        outputs_truncated=outputs_truncated,
        waiting_for=_waits(running, approvals),
        activities_truncated=total > len(shown),
        cancel=_cancel_view(row, state, running),
        trigger=row["trigger"],
    )


def _waits_for_approval(activity: Any) -> bool:
    waiting = activity.get("waiting") if isinstance(activity, dict) else None
    return isinstance(waiting, dict) and waiting.get("kind") == "approval"


def _waits(
    open_activities: dict[str, Any], approvals: dict[tuple[str, int], UUID]
) -> list[WaitView]:
    """The waits of the open activities; `approvals` maps (step, attempt) to the id of each
    pending approval."""
    views = []
    for step, a in open_activities.items():
        waiting = a.get("waiting") if isinstance(a, dict) else None
        if a.get("status") == ActivityStatus.WAITING and isinstance(waiting, dict):
            views.append(
                WaitView(
                    kind=waiting.get("kind", "timer"),
                    step=step,
                    since=a.get("started_at"),
                    due_at=waiting.get("due_at"),
                    signal=waiting.get("signal"),
                    approval_id=approvals.get((step, a.get("attempt", 0))),
                )
            )
    return sorted(views, key=lambda v: (v.due_at is None, v.due_at or 0, v.step))


def _cancel_view(row: Any, state: dict[str, Any], activities: dict[str, Any]) -> CancelView | None:
    """The first cancel request (the engine's record of the cancel when there is none: an
    older version's), with the running activities it waits for while CANCELLING."""
    if row["cancel_by"] is not None:
        first: dict[str, Any] = {
            "by": row["cancel_by"],
            "reason": row["cancel_reason"],
            "requested_at": row["cancel_requested_at"],
        }
    elif isinstance(state.get("cancel"), dict):
        first = {k: state["cancel"].get(k) for k in ("by", "reason", "requested_at")}
    else:
        return None
    status = InstanceStatus(row["status"])
    try:
        return CancelView(
            **first,
            recorded=status is InstanceStatus.CANCELLING or status is InstanceStatus.CANCELLED,
            waiting_for=cancelling.waiting_for(status, activities),
        )
    except ValidationError:
        log.warning("instance %s: a cancel record that does not fit: %r", row["id"], first)
        return None


@router.post(
    "/{instance_id}/cancel",
    status_code=202,
    response_model=CancelAccepted,
    responses=problem_responses(400, 404, 409, 413, 503),
)
async def cancel_instance(
    instance_id: IdParam,
    principal: Authorized,
    pool: Db,
    publisher: Broker,
    connection: BrokerConnection,
    body: Annotated[CancelRequestBody | None, Body()] = None,
) -> CancelAccepted:
    """Cancel the instance: nothing of it starts after this answer, and what of it runs is
    told to stop. The request is recorded with who asked (the principal whose token it
    carries) and the optional `reason`, and sent to the scheduler and, as a broadcast,
    to every worker. The answer waits a few seconds for the scheduler to record it: the status
    is then CANCELLING (it waits for the running activities to stop; `GET` shows them in
    `cancel.waiting_for`) or CANCELLED.

    Asking again, also at the same moment, answers 202 as the first request did (its `by`,
    `reason` and `requested_at`) with the current status. 409 when the instance has already
    COMPLETED or FAILED; 503 when the broker is not connected (nothing was recorded: try
    again)."""
    return await cancelling.cancel_instance(
        pool,
        publisher,
        connection,
        instance_id,
        by=principal,
        reason=body.reason if body is not None else None,
    )


@router.post(
    "/{instance_id}/activities/{step}/resolve",
    status_code=202,
    response_model=ResolveAccepted,
    responses=problem_responses(400, 404, 409, 413, 503),
)
async def resolve_activity(
    instance_id: IdParam,
    step: StepParam,
    body: ResolveRequest,
    principal: Authorized,
    pool: Db,
    publisher: Broker,
    connection: BrokerConnection,
    lost_after_s: LostAfter,
) -> ResolveAccepted:
    """Decide on a flagged (INTERRUPTED) activity whose outcome is unknown: `retry` runs it
    again, `skip` marks it done with `output` (`{}` when omitted), `fail` fails the instance.
    The decision is recorded with who decided (the principal whose token the request
    carries), once per flagged attempt, and the scheduler applies it and records it in the
    history.

    404 for an unknown instance or a step that is not one of its activities. 409 when the
    activity is not flagged, the instance has ended or is being cancelled; `already-resolved`
    naming the first decision when the attempt already has one (of two at the same moment,
    exactly one applies); `holder-alive` for a `retry` while the server that held the attempt
    has been alive since the flag (`flag.holder.may_still_finish`: the original attempt may
    still finish), unless the body says `"force": true`. 503 when the broker is not connected
    (nothing was recorded: try again)."""
    return await resolving.resolve_activity(
        pool,
        publisher,
        connection,
        instance_id,
        step,
        body,
        by=principal,
        lost_after_s=lost_after_s,
    )


@router.get(
    "/{instance_id}/history", response_model=InstanceHistory, responses=problem_responses(404)
)
async def get_instance_history(
    instance_id: IdParam,
    pool: Db,
    limit: Annotated[
        int, Query(ge=1, le=HISTORY_PAGE_MAX, description="Events per page (1-10000).")
    ] = HISTORY_PAGE_MAX,
    cursor: Annotated[str | None, cursor_query(EVENT_CURSOR)] = None,
) -> InstanceHistory:
    """The recorded events of the instance, oldest first, each with its reason: a page of at
    most `limit` (an instance of a few thousand steps has tens of thousands)."""
    after = int(cursor) if cursor else 0
    rows = await store.history(pool, instance_id, after=after, limit=limit + 1)
    if rows is None:
        raise not_found(instance_id)
    items = [HistoryEvent(**dict(r)) for r in rows[:limit]]
    more = len(rows) > limit
    return InstanceHistory(items=items, next_cursor=encode_cursor(items[-1].id) if more else None)
