"""`paceline-admin run` as a real process: it serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
from admin_support import AUTH, TOKEN
from aio_pika.abc import AbstractChannel

from paceline_admin.settings import AdminSettings

COMMAND = Path(sys.executable).parent / "paceline-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_run_serves_and_stops_cleanly_on_sigterm(
    settings: AdminSettings, broker: AbstractChannel
) -> None:
    # `broker` removes the topology this process declares, at the end of the session.
    port = free_port()
    env = {
        **os.environ,
        "PACELINE_DATABASE_URL": settings.database_url,
        "PACELINE_NAMESPACE": settings.namespace,
        "PACELINE_ADMIN_TOKEN": TOKEN,
        "PACELINE_ADMIN_PORT": str(port),
    }
    process = await asyncio.create_subprocess_exec(
        str(COMMAND), "run", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(100):
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the admin API did not become ready")
            assert (await http.get("/v1/definitions")).status_code == 401
            assert (await http.get("/v1/definitions", headers=AUTH)).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stdout is not None
    output = (await process.stdout.read()).decode()
    assert "SIGTERM" in output
    assert TOKEN not in output


async def test_run_refuses_to_start_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PACELINE_ADMIN_TOKEN"}
    process = await asyncio.create_subprocess_exec(
        str(COMMAND), "run", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"PACELINE_ADMIN_TOKEN" in stderr
