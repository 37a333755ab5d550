"""When the broker or the database goes away: readiness says so, and nothing is lost.
The app's lifespan still ends cleanly (its last heartbeats are given up)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import httpx
from admin_support import (
    AUTH,
    assert_problem,
    create_definition,
    flagged,
    insert_instance,
    insert_server,
    unique,
)

from paceline_admin.app import create_app
from paceline_admin.settings import AdminSettings


async def test_without_the_broker_starts_wait_in_the_outbox_and_commands_are_503(
    settings: AdminSettings, client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = unique("degraded")
    await create_definition(client, name)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://admin", headers=AUTH
        ) as own:
            await app.state.resources.connection.close()

            assert_problem(await own.get("/readyz"), 503)
            started = await own.post(
                "/v1/instances", json={"definition": name, "inputs": {"host": "h"}}
            )
            assert started.status_code == 202, started.text
            instance_id = uuid.UUID(started.json()["id"])
            # The command is committed with the instance; the outbox relay sends it later.
            # (Other tests may leave rows there: commands no relay sends in these tests.)
            bodies = await pool.fetch("SELECT id, body FROM outbox")
            mine = [b["id"] for b in bodies if str(instance_id) in bytes(b["body"]).decode()]
            assert len(mine) == 1, bodies
            await pool.execute("DELETE FROM outbox WHERE id = ANY($1::uuid[])", mine)

            cancel = await own.post(f"/v1/instances/{instance_id}/cancel")
            problem = assert_problem(cancel, 503)
            assert "broker" in problem["detail"]
            assert cancel.headers["Retry-After"] == "2"
            # Nothing recorded: asked again once the broker is back, it is a first cancel.
            assert (
                await pool.fetchval(
                    "SELECT count(*) FROM cancel_requests WHERE instance_id = $1", instance_id
                )
                == 0
            )
            flagged_id, _ = await insert_instance(pool, name, {"first": flagged(datetime.now(UTC))})
            resolve = await own.post(
                f"/v1/instances/{flagged_id}/activities/first/resolve", json={"action": "retry"}
            )
            assert "resolve" in assert_problem(resolve, 503)["detail"]
            assert (
                await pool.fetchval(
                    "SELECT count(*) FROM resolve_requests WHERE instance_id = $1",
                    uuid.UUID(flagged_id),
                )
                == 0
            )
            staged = await pool.fetch("SELECT body FROM outbox")
            about = (str(instance_id), flagged_id)
            assert not [b for b in staged if any(i in bytes(b["body"]).decode() for i in about)]
            server = await insert_server(pool)
            drain = assert_problem(await own.post(f"/v1/servers/{server}/drain"), 503)
            assert "drain" in drain["detail"]
            await pool.execute("DELETE FROM servers WHERE id = $1", server)

            await app.state.resources.pool.close()
            assert "database" in assert_problem(await own.get("/readyz"), 503)["detail"]
            # Without the database every route answers 503 with Retry-After, never a 500.
            for answer in (
                await own.post("/v1/instances", json={"definition": name, "inputs": {}}),
                await own.get("/v1/instances"),
                await own.get(f"/v1/instances/{instance_id}"),
                await own.get("/v1/flags"),
                await own.get("/v1/servers"),
                await own.get(f"/v1/definitions/{name}"),
            ):
                problem = assert_problem(answer, 503)
                assert problem["type"] == "urn:paceline:problem:database-unavailable", problem
                assert "database" in problem["detail"]
                assert answer.headers["Retry-After"] == "2"
