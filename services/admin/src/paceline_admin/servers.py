"""Routes for the server registry: list every server, drain one, remove one that is gone.

The registry is the scheduler's, written from the heartbeats every server sends. A drain is
sent to the server itself, on its own control queue (bound to the control exchange with its
server id); it then stops taking work, finishes what it runs and exits, reporting DRAINING and
DRAINED on the way.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import aio_pika
from aio_pika.abc import AbstractExchange
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, PublishError
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError

from paceline_admin import server_store as store
from paceline_admin.auth import Authorized, require_token
from paceline_admin.filters import chosen, several_of
from paceline_admin.params import Text
from paceline_admin.problems import RETRY_SOON, ApiError, problem_responses
from paceline_admin.resources import Control, Db
from paceline_contracts.messages import DrainServer
from paceline_contracts.states import ServerKind, ServerStatus
from paceline_infra.telemetry import inject, tracer

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0

ServerIdParam = Annotated[
    str, Path(description="The server id, as `GET /v1/servers` lists it."), Text
]
KindFilter = Annotated[
    list[Annotated[str, several_of(ServerKind)]] | None,
    Query(description="Only these kinds: repeat the parameter or separate them with commas."),
]
StatusFilter = Annotated[
    list[Annotated[str, several_of(ServerStatus)]] | None,
    Query(description="Only these statuses: repeat the parameter or separate them with commas."),
]

router = APIRouter(
    prefix="/v1/servers",
    tags=["servers"],
    dependencies=[Depends(require_token)],
    responses=problem_responses(401, 422, 500, 503),
)


class InFlightView(BaseModel):
    """An activity attempt a server runs or holds: what a drain of it waits for."""

    instance_id: UUID = Field(description="The instance the activity belongs to.")
    step: str = Field(description="The activity's step id.")
    attempt: int = Field(description="The attempt the server runs.")


class ServerView(BaseModel):
    """One server, as its heartbeats last reported it."""

    id: str = Field(description="The server id: unique across hosts and restarts.")
    kind: ServerKind
    host: str = Field(description="The host name it runs on.")
    pid: int = Field(description="Its process id on that host.")
    status: ServerStatus = Field(
        description="ACTIVE, DRAINING or DRAINED as the server last reported; LOST when it is "
        "not DRAINED and has sent no heartbeat for longer than PACELINE_SERVER_LOST_AFTER_S."
    )
    started_at: datetime = Field(description="When the server process started.")
    last_heartbeat: datetime = Field(
        description="When its last heartbeat was received (the database's clock)."
    )
    in_flight: list[InFlightView] = Field(
        description="For a worker: the activities it runs or holds, as of its last heartbeat."
    )


class ServerList(BaseModel):
    items: list[ServerView] = Field(description="By kind, then start time.")
    truncated: bool = Field(
        description=f"True when more than {store.MAX_LISTED} servers matched: only the first "
        f"{store.MAX_LISTED} are listed (narrow the filter, or remove servers that are gone)."
    )


class DrainAccepted(BaseModel):
    """The drain was delivered to the server's control queue. The server reports DRAINING, then
    DRAINED once what it runs has finished, and exits."""

    id: str
    status: ServerStatus = Field(
        description="The server's status when the drain was sent: ACTIVE, or DRAINING when it "
        "was draining already (a second drain is harmless)."
    )
    drain_requested: bool = True


def _in_flight(server_id: str, raw: Any) -> list[InFlightView]:
    # A tolerant reader: an entry that does not fit is left out (and logged), never a 500.
    items: list[InFlightView] = []
    for entry in raw if isinstance(raw, list) else ():
        try:
            items.append(InFlightView.model_validate(entry))
        except ValidationError:
            log.warning("server %s: an in-flight entry that does not fit: %r", server_id, entry)
    return items


def _view(row: Any) -> ServerView:
    return ServerView(
        id=row["id"],
        kind=row["kind"],
        host=row["host"],
        pid=row["pid"],
        status=row["status"],
        started_at=row["started_at"],
        last_heartbeat=row["last_heartbeat"],
        in_flight=_in_flight(row["id"], row["in_flight"]),
    )


def _lost_after_s(request: Request) -> float:
    lost_after_s: float = request.app.state.settings.server_lost_after_s
    return lost_after_s


def _not_found(server_id: str) -> ApiError:
    return ApiError(404, f"server {server_id!r} is not in the registry", kind="not-found")


@router.get("", response_model=ServerList)
async def list_servers(
    request: Request, pool: Db, kind: KindFilter = None, status: StatusFilter = None
) -> ServerList:
    """Every server in the registry (at most 1000), by kind, then start time, with what each
    one still runs. LOST is concluded from silence: such a server may be dead, or cut off."""
    rows = await store.listing(
        pool,
        lost_after_s=_lost_after_s(request),
        kinds=chosen(kind, ServerKind, "kind"),
        statuses=chosen(status, ServerStatus, "status"),
        limit=store.MAX_LISTED + 1,
    )
    return ServerList(
        items=[_view(r) for r in rows[: store.MAX_LISTED]],
        truncated=len(rows) > store.MAX_LISTED,
    )


@router.post(
    "/{server_id}/drain",
    status_code=202,
    response_model=DrainAccepted,
    responses=problem_responses(404, 409, 503),
)
async def drain_server(
    server_id: ServerIdParam,
    request: Request,
    principal: Authorized,
    pool: Db,
    control: Control,
) -> DrainAccepted:
    """Friendly shutdown of one server: it stops taking new work, lets what it runs finish
    (`in_flight` shows what it waits for), reports DRAINED and exits. Draining this admin
    process itself is allowed: it answers first, then stops. Who asked (the principal whose
    token the request carries) is sent to the server as `by` and logged there.

    404 for a server not in the registry; 409 when it is DRAINED or LOST, or not connected to
    the broker (no control queue took the drain); 503 when the broker cannot take the drain
    (nothing was sent: try again)."""
    row = await store.one(pool, server_id, lost_after_s=_lost_after_s(request))
    if row is None:
        raise _not_found(server_id)
    status = ServerStatus(row["status"])
    if status in (ServerStatus.DRAINED, ServerStatus.LOST):
        raise ApiError(
            409,
            f"server {server_id!r} is {status.value}: there is nothing to drain"
            + (" (remove it with DELETE)" if status is ServerStatus.LOST else ""),
            kind="server-gone",
        )
    command = DrainServer(server_id=server_id, by=principal)
    with tracer().start_as_current_span(
        "drain server", attributes={"paceline.server_id": server_id, "paceline.by": command.by}
    ):
        await _send(control, command)
    log.info("drain of %s requested by %s", server_id, command.by)
    return DrainAccepted(id=server_id, status=status)


async def _send(control: AbstractExchange, command: DrainServer) -> None:
    """Publish to the server's own control queue, mandatory and confirmed: 409 when no queue
    takes it (the server is not connected), 503 when the broker does not."""
    message = aio_pika.Message(
        command.model_dump_json().encode(),
        content_type="application/json",
        message_id=str(uuid.uuid4()),
        type=command.type,
        headers=dict(inject()),
    )
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT_S):
            await control.publish(message, routing_key=command.server_id, mandatory=True)
    except PublishError as exc:
        raise ApiError(
            409,
            f"server {command.server_id!r} is not connected: it has no control queue on the "
            "broker, so nothing was sent (a server that is gone shows LOST once its "
            "heartbeats stop)",
            kind="server-not-connected",
        ) from exc
    except (TimeoutError, OSError, AMQPError, ChannelInvalidStateError) as exc:
        log.warning("drain of %s not sent: %r", command.server_id, exc)
        raise ApiError(
            503,
            "the message broker did not take the drain command; try again",
            kind="broker-unavailable",
            headers=RETRY_SOON,
        ) from exc


@router.delete(
    "/{server_id}",
    status_code=204,
    responses={204: {"description": "Removed from the registry."}, **problem_responses(404, 409)},
)
async def remove_server(
    server_id: ServerIdParam, request: Request, principal: Authorized, pool: Db
) -> Response:
    """Remove a server that is gone (DRAINED or LOST) from the registry. An ACTIVE or DRAINING
    server is refused with 409: drain it first. A removed server that was only cut off
    reappears with its next heartbeat."""
    lost_after_s = _lost_after_s(request)
    if await store.remove_if_gone(pool, server_id, lost_after_s=lost_after_s):
        log.info("removed server %s from the registry (asked by %s)", server_id, principal)
        return Response(status_code=204)
    row = await store.one(pool, server_id, lost_after_s=lost_after_s)
    if row is None:
        raise _not_found(server_id)
    raise ApiError(
        409,
        f"server {server_id!r} is {row['status']}: drain it first (only DRAINED and LOST "
        "servers can be removed)",
        kind="server-active",
    )
