"""Helpers for integration tests: a stack of real service processes in a namespace of its
own, its databases, and checks against the broker and the admin API."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx

from paceline_contracts.queues import Queue, dead_queue_name, queue_name

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
FINAL = {"COMPLETED", "FAILED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class StackEnv:
    """Names no other stack on this broker or server uses."""

    namespace: str
    database: str
    reporting_database: str
    admin_port: int
    token: str

    @classmethod
    def fresh(cls) -> StackEnv:
        tag = uuid.uuid4().hex[:10]
        return cls(
            f"pltest-{tag}", f"pltest_{tag}", f"pltest_rep_{tag}", free_port(), uuid.uuid4().hex
        )

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:5432/{self.database}"

    @property
    def reporting_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:5432/{self.reporting_database}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def variables(self) -> dict[str, str]:
        return {
            "PACELINE_NAMESPACE": self.namespace,
            "PACELINE_DATABASE_URL": self.database_url,
            "PACELINE_REPORTING_DATABASE_URL": self.reporting_url,
            "PACELINE_ADMIN_PORT": str(self.admin_port),
            "PACELINE_ADMIN_TOKEN": self.token,
            "PACELINE_AMQP_URL": AMQP_URL,
            "PACELINE_WORKER_GRACE_S": "10",
        }


async def drop_everything(env: StackEnv) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        for name in (env.database, env.reporting_database):
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for q in Queue:
            for name in (queue_name(env.namespace, q), dead_queue_name(env.namespace, q)):
                await channel.queue_delete(name)
        for name in (f"{env.namespace}.x", f"{env.namespace}.dlx"):
            await channel.exchange_delete(name)
    finally:
        await connection.close()


async def queue_depths(namespace: str) -> dict[str, int]:
    """Messages in each queue of the namespace, ready and unacknowledged together."""
    if shutil.which("rabbitmqctl"):
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl",
            "-q",
            "list_queues",
            "name",
            "messages",
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        depths = {}
        for line in out.decode().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].startswith(f"{namespace}."):
                depths[parts[0]] = int(parts[1])
        return depths
    return await _passive_depths(namespace)


async def _passive_depths(namespace: str) -> dict[str, int]:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        depths = {}
        for q in Queue:
            for name in (queue_name(namespace, q), dead_queue_name(namespace, q)):
                declared = await channel.declare_queue(name, passive=True)
                depths[name] = declared.declaration_result.message_count or 0
        return depths
    finally:
        await connection.close()


async def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def wait_final(
    api: httpx.AsyncClient,
    ids: Iterable[str],
    timeout: float = 60.0,
) -> dict[str, dict[str, Any]]:
    """Wait until every instance is final; returns each instance as the API shows it."""
    pending = set(ids)
    done: dict[str, dict[str, Any]] = {}

    async def poll() -> bool:
        for instance_id in list(pending):
            body = (await api.get(f"/v1/instances/{instance_id}")).json()
            if body.get("status") in FINAL:
                done[instance_id] = body
                pending.discard(instance_id)
        return not pending

    await wait_for(poll, timeout, f"{len(pending)} instance(s) to end")
    return done


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
