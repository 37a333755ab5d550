"""Routes for process instances: start, list, read, cancel, resolve a flag, history."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from fastapi import APIRouter, Depends, Header, Path, Query, Response

from paceline_admin import instance_store as store
from paceline_admin import starting
from paceline_admin.activities import activity_views
from paceline_admin.auth import Authorized, require_token
from paceline_admin.documents import as_json_document
from paceline_admin.instance_models import (
    CancelAccepted,
    HistoryEvent,
    InstanceDetail,
    InstanceHistory,
    InstancePage,
    InstanceSummary,
    ResolveAccepted,
    ResolveRequest,
    StartedInstance,
    StartInstanceRequest,
)
from paceline_admin.paging import Cursor, Limit, bad_cursor, decode_cursor, encode_cursor
from paceline_admin.params import Text
from paceline_admin.problems import (
    RETRY_SOON,
    ApiError,
    ProblemItem,
    problem_responses,
    summarize,
)
from paceline_admin.resources import Broker, Db
from paceline_contracts.messages import CancelInstance, Command, ResolveActivity
from paceline_contracts.queues import Queue
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_infra.amqp import Outgoing, Publisher
from paceline_infra.telemetry import extract, inject, tracer

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0
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
StartedBy = Annotated[
    str | None,
    Header(
        alias="X-Paceline-Started-By",
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Who the start is for (a person or service), recorded as `started_by`.",
    ),
]

StepParam = Annotated[str, Path(description="The step id of the activity."), Text]
Operator = Annotated[
    str | None,
    Header(
        alias="X-Paceline-Operator",
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Who decides (a person or service), recorded in the history as `by`; "
        "`admin-token` when omitted.",
    ),
]

StatusFilter = Annotated[
    list[str] | None,
    Query(description="Only these statuses: repeat the parameter or separate them with commas."),
]

# The token is checked for every route here; `Authorized` in a signature also names who asked.
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
    subject: Authorized,
    pool: Db,
    publisher: Broker,
    idempotency_key: IdempotencyKey = None,
    started_by: StartedBy = None,
) -> StartedInstance:
    """Record a PENDING instance and send its start command; the scheduler runs it.

    An unknown definition or version is 404; inputs that do not fit the definition are 422
    with every problem in `errors`. A replayed Idempotency-Key answers 202 too, with the
    header `Idempotent-Replayed: true` and the instance's current status."""
    started, replayed = await starting.start_instance(
        pool,
        publisher,
        body,
        started_by=started_by or subject,
        idempotency_key=idempotency_key,
    )
    response.headers["Location"] = f"/v1/instances/{started.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return started


def _statuses(raw: list[str]) -> list[str]:
    """`?status=A&status=B` and `?status=A,B` both work; every unknown one is reported."""
    values = [v.strip() for item in raw for v in item.split(",") if v.strip()]
    known = [s.value for s in InstanceStatus]
    bad = [
        ProblemItem(path="query.status", message=f"{v!r} is not one of {', '.join(known)}")
        for v in values
        if v.upper() not in known
    ]
    if bad:
        raise ApiError(
            422,
            "unknown status in the filter",
            kind="invalid-request",
            title="Invalid request",
            errors=bad,
        )
    return [v.upper() for v in values]


def _after(cursor: str) -> tuple[datetime, UUID]:
    at, last_id = decode_cursor(cursor, 2)
    try:
        return datetime.fromisoformat(at), UUID(last_id)
    except ValueError as exc:
        raise bad_cursor() from exc


@router.get("", response_model=InstancePage)
async def list_instances(
    pool: Db,
    limit: Limit = 50,
    cursor: Cursor = None,
    status: StatusFilter = None,
    definition: Annotated[str | None, Query(description="Only this definition."), Text] = None,
) -> InstancePage:
    """Instances, newest first, a page at a time."""
    rows = await store.page(
        pool,
        statuses=_statuses(status or []),
        definition=definition,
        after=_after(cursor) if cursor else None,
        limit=limit + 1,
    )
    items = [InstanceSummary(**dict(r)) for r in rows[:limit]]
    last = items[-1] if items else None
    next_cursor = (
        encode_cursor([last.created_at.isoformat(), str(last.id)])
        if last is not None and len(rows) > limit
        else None
    )
    return InstancePage(items=items, next_cursor=next_cursor)


def _not_found(instance_id: UUID) -> ApiError:
    return ApiError(404, f"instance {instance_id} does not exist", kind="not-found")


@router.get("/{instance_id}", response_model=InstanceDetail, responses=problem_responses(404))
async def get_instance(instance_id: IdParam, pool: Db) -> InstanceDetail:
    """The instance with its inputs, outputs and activities."""
    row = await store.detail(pool, instance_id)
    if row is None:
        raise _not_found(instance_id)
    state: dict[str, Any] = row["state"] or {}
    fields = {k: row[k] for k in InstanceSummary.model_fields}
    return InstanceDetail(
        **fields,
        inputs=state.get("inputs") or {},
        outputs=state.get("outputs"),
        error=state.get("error"),
        activities=activity_views(state.get("activities") or {}, row["definition_body"]),
    )


@router.post(
    "/{instance_id}/cancel",
    status_code=202,
    response_model=CancelAccepted,
    responses=problem_responses(404, 409, 503),
)
async def cancel_instance(instance_id: IdParam, pool: Db, publisher: Broker) -> CancelAccepted:
    """Send a cancel command. 409 when the instance has already ended; 503 when the broker
    cannot take the command (nothing was sent: try again)."""
    current = await store.current_status(pool, instance_id)
    if current is None:
        raise _not_found(instance_id)
    status = InstanceStatus(current)
    if status.is_final:
        raise ApiError(
            409, f"instance {instance_id} has already ended ({status.value})", kind="instance-ended"
        )
    command = CancelInstance(instance_id=instance_id)
    with tracer().start_as_current_span(
        "cancel instance", attributes={"paceline.instance_id": str(instance_id)}
    ):
        await _send(publisher, command, "cancel")
    return CancelAccepted(id=instance_id, status=status)


async def _send(publisher: Publisher, command: Command, what: str) -> None:
    """Publish a command in the current span and wait for the broker's confirm; 503 when the
    broker does not take it (then nothing was sent, and the caller may try again)."""
    message = Outgoing(
        Queue.COMMANDS,
        command.model_dump_json().encode(),
        command.type,
        str(uuid.uuid4()),
        inject(),
    )
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT_S):
            await publisher.publish(message)
    except (TimeoutError, OSError, AMQPError, ChannelInvalidStateError) as exc:
        log.warning("%s of %s not sent: %r", what, command.instance_id, exc)
        raise ApiError(
            503,
            f"the message broker did not take the {what} command; try again",
            kind="broker-unavailable",
            headers=RETRY_SOON,
        ) from exc


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
    subject: Authorized,
    pool: Db,
    publisher: Broker,
    operator: Operator = None,
) -> ResolveAccepted:
    """Decide on a flagged (INTERRUPTED) activity whose outcome is unknown: `retry` runs it
    again, `skip` marks it done with `output` (`{}` when omitted), `fail` fails the instance.
    The scheduler applies the decision and records it in the history.

    404 for an unknown instance or a step that is not one of its activities; 409 when the
    activity is not flagged or the instance has ended; 503 when the broker cannot take the
    command (nothing was sent: try again)."""
    output = _resolve_output(body)
    target = await store.resolve_target(pool, instance_id, step)
    if target is None:
        raise _not_found(instance_id)
    activity = target["activity"]
    if not isinstance(activity, dict):
        raise ApiError(
            404,
            f"instance {instance_id} has no activity {step!r} (it is not an activity step, "
            "or it has not run yet)",
            kind="not-found",
        )
    status = InstanceStatus(target["status"])
    if status.is_final:
        raise ApiError(
            409, f"instance {instance_id} has already ended ({status.value})", kind="instance-ended"
        )
    current = activity.get("status")
    if current != ActivityStatus.INTERRUPTED:
        raise ApiError(
            409,
            f"activity {step!r} of instance {instance_id} is {current}, not flagged "
            f"({ActivityStatus.INTERRUPTED.value}): there is nothing to resolve",
            kind="not-flagged",
        )
    command = ResolveActivity(
        instance_id=instance_id,
        step=step,
        action=body.action,
        output=output,
        by=operator or subject,
        attempt=activity.get("attempt"),
    )
    traceparent = target["traceparent"]
    # In the instance's own trace, so that the operator's decision shows up in it.
    with tracer().start_as_current_span(
        "resolve activity",
        context=extract({"traceparent": traceparent}) if traceparent else None,
        attributes={
            "paceline.instance_id": str(instance_id),
            "paceline.step": step,
            "paceline.action": body.action,
            "paceline.by": command.by,
        },
    ):
        await _send(publisher, command, "resolve")
    return ResolveAccepted(id=instance_id, step=step, action=body.action)


def _resolve_output(body: ResolveRequest) -> dict[str, Any] | None:
    """The output to send: only `skip` takes one (`{}` when omitted), and it must be storable."""
    if body.action != "skip":
        if "output" in body.model_fields_set:
            item = ProblemItem(
                path="output", message=f"only `skip` takes an output, not `{body.action}`"
            )
            raise ApiError(
                422,
                summarize([item]),
                kind="invalid-request",
                title="Invalid request",
                errors=[item],
            )
        return None
    output, problems = as_json_document(body.output or {}, "output")
    if problems:
        raise ApiError(
            422,
            summarize(problems, "the output"),
            kind="invalid-output",
            title="Invalid output",
            errors=problems,
        )
    assert isinstance(output, dict)
    return output


@router.get(
    "/{instance_id}/history", response_model=InstanceHistory, responses=problem_responses(404)
)
async def get_instance_history(instance_id: IdParam, pool: Db) -> InstanceHistory:
    """Every recorded event of the instance, oldest first, each with its reason."""
    rows = await store.history(pool, instance_id)
    if rows is None:
        raise _not_found(instance_id)
    return InstanceHistory(items=[HistoryEvent(**dict(r)) for r in rows])
