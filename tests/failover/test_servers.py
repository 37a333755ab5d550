"""The server registry, LOST detection, and friendly shutdown through the admin API."""

from __future__ import annotations

import uuid

import httpx
import pytest

from failover.conftest import (
    StackFactory,
    define_and_start,
    service_of,
    wait_running,
    wait_status,
)
from integration.harness import wait_for
from stack import Stack

pytestmark = pytest.mark.integration


async def _servers(api: httpx.AsyncClient) -> dict[str, dict]:
    r = await api.get("/v1/servers")
    assert r.status_code == 200, r.text
    body = r.json()
    items = body["items"] if isinstance(body, dict) else body
    return {s["id"]: s for s in items}


async def _wait_server(
    api: httpx.AsyncClient, server_id: str, status: str, timeout: float = 30
) -> dict:
    async def reached() -> dict | None:
        server = (await _servers(api)).get(server_id)
        return server if server and server["status"] == status else None

    return await wait_for(reached, timeout, f"{server_id} to be {status}")


async def _ids_by_name(api: httpx.AsyncClient, stack: Stack) -> dict[str, str]:
    async def all_there() -> dict[str, str] | None:
        servers = await _servers(api)
        found = {
            service_of(stack, sid).name: sid
            for sid in servers
            if servers[sid]["status"] == "ACTIVE" and _is_ours(stack, sid)
        }
        return found if len(found) == len(stack.services) else None

    return await wait_for(all_there, 30, "every service in the registry")


def _is_ours(stack: Stack, server_id: str) -> bool:
    try:
        service_of(stack, server_id)
    except AssertionError:
        return False
    return True


async def test_registry_shows_every_server_and_a_killed_one_becomes_lost(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack()
    ids = await _ids_by_name(api, stack)
    servers = await _servers(api)
    kinds = sorted(servers[sid]["kind"] for sid in ids.values())
    assert kinds == ["activity-worker", "activity-worker", "admin", "reporting", "scheduler"]
    for name, sid in ids.items():
        assert servers[sid]["pid"] == stack.services[name].pid
        assert servers[sid]["last_heartbeat"]

    victim = ids["activity-worker-1"]
    refused = await api.delete(f"/v1/servers/{victim}")
    assert refused.status_code == 409, "an active server is not removed"
    stack.kill("activity-worker-1")
    lost = await _wait_server(api, victim, "LOST", timeout=20)
    assert lost["kind"] == "activity-worker"
    assert (await _servers(api))[ids["activity-worker-2"]]["status"] == "ACTIVE"

    removed = await api.delete(f"/v1/servers/{victim}")
    assert removed.status_code == 204
    assert victim not in await _servers(api)


async def test_admin_drain_finishes_in_flight_work_and_exits_0(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack()
    instance_id = await define_and_start(
        api,
        {
            "name": f"d-{uuid.uuid4().hex[:6]}",
            "steps": [
                {"id": "nap", "type": "sleep", "with": {"seconds": 4}},
                {"id": "next", "type": "noop", "with": {"after": "nap"}},
            ],
        },
    )
    holder = (await wait_running(api, instance_id, "nap"))["claimed_by"]
    service = service_of(stack, holder)

    r = await api.post(f"/v1/servers/{holder}/drain")
    assert r.status_code == 202, r.text
    draining = await _wait_server(api, holder, "DRAINING", timeout=10)
    assert [(f["instance_id"], f["step"]) for f in draining["in_flight"]] == [
        (instance_id, "nap")
    ], "it shows what it waits for"

    await _wait_server(api, holder, "DRAINED", timeout=30)
    assert service.process is not None
    assert service.process.wait(timeout=30) == 0
    done = await wait_status(api, instance_id, "COMPLETED")
    steps = {a["step"]: a for a in done["activities"]}
    assert steps["nap"]["server"] == holder, "the drained worker finished what it had"
    assert steps["nap"]["attempts"] == 1
    assert steps["next"]["server"] != holder, "and took nothing new"
    again = await api.post(f"/v1/servers/{holder}/drain")
    assert again.status_code == 409
