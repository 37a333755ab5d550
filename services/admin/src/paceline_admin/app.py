"""The FastAPI application: routes, error handling, and the resources its lifespan opens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from paceline_admin import (
    approvals,
    definitions,
    events,
    flags,
    health,
    http_telemetry,
    instance_activities,
    instances,
    openapi_doc,
    problems,
    schedules,
    servers,
    signals,
)
from paceline_admin.auth import token_first
from paceline_admin.body_limit import LimitedApp
from paceline_admin.presence import present
from paceline_admin.resources import open_resources
from paceline_admin.settings import MAX_BODY_BYTES, AdminSettings
from paceline_contracts.states import ServerKind
from paceline_infra.identity import ServerIdentity

DESCRIPTION = """\
The Paceline admin API. Every /v1 request carries `Authorization: Bearer <token>`: the token
of a principal (`PACELINE_ADMIN_TOKEN`'s is `admin`, `PACELINE_ADMIN_TOKENS` names others).
Every error is `application/problem+json` (RFC 9457) with a `detail`, and `errors` listing
each problem when there can be several. Bad input is a 4xx, never a 500: malformed JSON or
YAML is 400, bodies over 1 MiB 413, invalid definitions, inputs and parameters 422, unknown
definitions, definition versions, instances and steps 404. A command the current state does
not allow (cancelling a COMPLETED or FAILED instance, resolving an activity that is not
flagged, or that an operator has already resolved) is 409; a command while the broker is not
connected is 503 (nothing was recorded: try again).

Instance statuses: PENDING, RUNNING, WAITING, FLAGGED (an activity waits for an operator),
CANCELLING (a cancel was recorded: nothing more of the instance starts, and it waits for the
activities that were running to stop; the instance's `cancel.waiting_for` lists them), and
the final COMPLETED, FAILED and CANCELLED. A start (`started_by`), a cancel, each decision on a
flag and a drain are recorded with who asked: the principal whose token the request carries,
never a name a header gives. A cancel asked again answers as the first did.

Every server (scheduler, activity-worker, reporting, admin) reports itself to the server
registry with heartbeats; `/v1/servers` lists them and drains or removes one. This admin
process is one of them: drained, it answers the drain, then finishes its requests and exits.
"""


def create_app(settings: AdminSettings, identity: ServerIdentity | None = None) -> FastAPI:
    """The app. Its lifespan opens the database pool and the broker connection, and makes the
    app present in the server registry as `identity` (one per process). `app.state.stop` is
    set when a drain for this server arrives: whoever serves the app must then stop serving
    (`paceline-admin run` does); the lifespan's end reports the server DRAINED."""
    identity = identity or ServerIdentity(ServerKind.ADMIN)
    stop = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with (
            open_resources(settings, identity) as resources,
            present(settings, identity, resources, stop) as presence,
        ):
            app.state.resources = resources
            app.state.presence = presence
            yield

    app = LimitedApp(
        title="Paceline admin API",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        redoc_url=None,
        max_body_size=MAX_BODY_BYTES,
        telemetry=http_telemetry.config(),
    )
    app.state.settings = settings
    app.state.identity = identity
    app.state.stop = stop
    problems.install(app, on_validation=token_first(problems.on_validation_error))
    app.include_router(health.router)
    app.include_router(definitions.router)
    app.include_router(instances.router)
    app.include_router(instance_activities.router)
    app.include_router(signals.router)
    app.include_router(approvals.router)
    app.include_router(schedules.router)
    app.include_router(events.router)
    app.include_router(flags.router)
    app.include_router(servers.router)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_doc.complete(default_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
