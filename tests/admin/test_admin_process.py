"""`paceline-admin run` as a real process: it serves, heartbeats as a server, and stops cleanly
(exit 0, DRAINING then DRAINED) on SIGTERM or on a drain, even one sent through its own API."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from admin_support import AUTH, HEARTBEAT_S, TOKEN, insert_from, next_heartbeat
from aio_pika.abc import AbstractChannel, AbstractQueue

from paceline_admin.settings import AdminSettings
from paceline_contracts.messages import ServerHeartbeat
from paceline_contracts.states import ServerKind, ServerStatus

COMMAND = Path(sys.executable).parent / "paceline-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def admin(
    settings: AdminSettings, broker: AbstractChannel
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """A running `paceline-admin run`, ready, and its port; killed if a test leaves it running.
    (`broker` removes the topology this process declares, at the end of the session.)"""
    port = free_port()
    env = {
        **os.environ,
        "PACELINE_DATABASE_URL": settings.database_url,
        "PACELINE_NAMESPACE": settings.namespace,
        "PACELINE_ADMIN_TOKEN": TOKEN,
        "PACELINE_ADMIN_PORT": str(port),
        "PACELINE_SERVER_HEARTBEAT_S": str(HEARTBEAT_S),
    }
    process = await asyncio.create_subprocess_exec(
        str(COMMAND), "run", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(300):  # a loaded machine may take a while
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the admin API did not become ready")
        yield process, port
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def its_heartbeat(
    queue: AbstractQueue, process: asyncio.subprocess.Process
) -> ServerHeartbeat:
    beat = await next_heartbeat(queue, lambda b: b.pid == process.pid)
    assert beat.kind is ServerKind.ADMIN
    assert beat.status is ServerStatus.ACTIVE
    return beat


async def statuses_until_drained(queue: AbstractQueue, server_id: str) -> list[ServerStatus]:
    """The statuses the server reports from now on, up to DRAINED."""
    seen: list[ServerStatus] = []
    while not seen or seen[-1] is not ServerStatus.DRAINED:
        seen.append((await next_heartbeat(queue, lambda b: b.server_id == server_id)).status)
    return seen


async def output_of(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    return (await process.stdout.read()).decode()


async def test_run_serves_and_stops_cleanly_on_sigterm(
    admin: tuple[asyncio.subprocess.Process, int], heartbeats: AbstractQueue
) -> None:
    process, port = admin
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        assert (await http.get("/v1/definitions")).status_code == 401
        assert (await http.get("/v1/definitions", headers=AUTH)).status_code == 200
    beat = await its_heartbeat(heartbeats, process)
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 15) == 0
    seen = await statuses_until_drained(heartbeats, beat.server_id)
    assert ServerStatus.DRAINING in seen
    assert seen.index(ServerStatus.DRAINING) < seen.index(ServerStatus.DRAINED)
    output = await output_of(process)
    assert "SIGTERM" in output
    assert TOKEN not in output


async def test_a_drain_through_its_own_api_stops_it_cleanly(
    admin: tuple[asyncio.subprocess.Process, int],
    heartbeats: AbstractQueue,
    pool: asyncpg.Pool,
) -> None:
    process, port = admin
    beat = await its_heartbeat(heartbeats, process)
    await insert_from(pool, beat)  # what the scheduler's registry would have written
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as http:
            listed = (await http.get("/v1/servers", params={"kind": "admin"})).json()["items"]
            assert [(s["id"], s["status"], s["pid"]) for s in listed] == [
                (beat.server_id, "ACTIVE", process.pid)
            ]
            response = await http.post(f"/v1/servers/{beat.server_id}/drain")
            # It answers before it stops.
            assert response.status_code == 202, response.text
            assert response.json() == {
                "id": beat.server_id,
                "status": "ACTIVE",
                "drain_requested": True,
            }
        assert await asyncio.wait_for(process.wait(), 15) == 0
        seen = await statuses_until_drained(heartbeats, beat.server_id)
        assert seen.index(ServerStatus.DRAINING) < seen.index(ServerStatus.DRAINED)
        output = await output_of(process)
        assert "drain requested by admin" in output
        assert TOKEN not in output
    finally:
        await pool.execute("DELETE FROM servers WHERE id = $1", beat.server_id)


async def test_run_refuses_to_start_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PACELINE_ADMIN_TOKEN"}
    process = await asyncio.create_subprocess_exec(
        str(COMMAND), "run", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"PACELINE_ADMIN_TOKEN" in stderr
