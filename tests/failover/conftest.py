"""Failover tests: each builds a stack of real processes shaped for its scenario, crashes
parts of it with real signals, and checks what the operator would see."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from effect_sink import Sink
from private_services import PrivatePostgres, PrivateRabbitMQ
from stack_env import AMQP_URL, DATABASE_URL, StackEnv, drop_everything, queue_depths

from integration.conftest import wait_ready
from integration.harness import wait_for
from paceline_contracts.queues import Queue, queue_name
from stack import Service, Stack

FAST_LIVENESS = {
    # Heartbeats of 2 s: a frozen worker is given up after about three of them.
    "PACELINE_AMQP_HEARTBEAT_S": "2",
    "PACELINE_WORKER_GRACE_S": "5",
    "PACELINE_CRASH_BUDGET": "3",
    "PACELINE_DEADLINE_GRACE_S": "2",
    # Servers report every second and are LOST after four silent ones.
    "PACELINE_SERVER_HEARTBEAT_S": "1",
    "PACELINE_SERVER_LOST_AFTER_S": "4",
}

StackFactory = Callable[..., Awaitable[tuple[Stack, httpx.AsyncClient]]]


@pytest.fixture
async def effects() -> AsyncIterator[Sink]:
    server = Sink()
    server.start()
    yield server
    server.stop()


class HoldFirstSink(Sink):
    """An effect sink that honours `?hold=` only for the first POST to each path: later POSTs
    (an operator's retry of a flagged request, say) are answered at once."""

    def _handler(self) -> Any:
        base = super()._handler()
        sink = self

        class Handler(base):  # type: ignore[misc, valid-type]
            def _answer(self, method: str) -> None:
                path = urlsplit(self.path).path
                if method == "POST" and sink.count(path) > 0:
                    self.path = path  # held once already: no hold this time
                super()._answer(method)

        return Handler


@pytest.fixture
async def first_held_effects() -> AsyncIterator[Sink]:
    """Like `effects`, but only the first POST to a path is held (`HoldFirstSink`)."""
    server = HoldFirstSink()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[StackFactory]:
    """`await make_stack(workers=[{env}, ...])` -> (stack, api client); on a private broker
    and/or database server (deploy/private_services.py) when given, else the machine's."""
    made: list[tuple[StackEnv, Stack, httpx.AsyncClient]] = []

    async def make(
        workers: list[dict[str, str]] | None = None,
        *,
        broker: PrivateRabbitMQ | None = None,
        database: PrivatePostgres | None = None,
    ) -> tuple[Stack, httpx.AsyncClient]:
        env = StackEnv.fresh(
            "pltest",
            amqp_url=broker.url if broker else AMQP_URL,
            rabbitmq_node=broker.node if broker else None,
            server_url=database.url if database else DATABASE_URL,
        )
        stack = Stack(env={**env.variables(), **FAST_LIVENESS}, log_dir=tmp_path / env.namespace)
        stack.migrate()
        stack.add("scheduler")
        for worker_env in workers if workers is not None else [{}, {}]:
            stack.add("activity-worker", **worker_env)
        stack.add("reporting")
        stack.add("admin")
        await wait_ready(env, stack)
        api = httpx.AsyncClient(
            base_url=env.base_url, timeout=30, headers={"Authorization": f"Bearer {env.token}"}
        )
        made.append((env, stack, api))
        return stack, api

    yield make
    for env, stack, api in made:
        await api.aclose()
        stack.stop_all(timeout=30)
        if not os.environ.get("PACELINE_KEEP_TEST_DATA"):
            await drop_everything(env)


def service_of(stack: Stack, server_id: str) -> Service:
    """The stack's service whose process is the server `server_id`."""
    service = stack.serving(server_id)
    assert service is not None, f"no service of this stack is {server_id}"
    return service


def post_flow(name: str, effects: Sink, hold: float, *, then_noop: bool = True) -> dict:
    """A process whose step `push` POSTs to `effects` (a non-restartable side effect, counted at
    `/effect/<inputs.key>`), held by the sink for `hold` s so a test can strike while it runs;
    with `then_noop`, a step `after` follows that reads the POST's status."""
    push: dict = {
        "id": "push",
        "type": "http.request",
        "with": {"method": "POST", "url": f"{effects.url}/effect/${{inputs.key}}?hold={hold:g}"},
    }
    if not then_noop:
        return {"name": name, "inputs": {"key": {"type": "string"}}, "steps": [push]}
    push["with"]["json"] = {"key": "${inputs.key}"}
    after = {"id": "after", "type": "noop", "with": {"pushed": "${steps.push.output.status}"}}
    return {"name": name, "inputs": {"key": {"type": "string"}}, "steps": [push, after]}


def post_command(url: str) -> str:
    """A shell command that POSTs (an empty body) to `url`: curl, or this Python when the
    machine has no curl."""
    if shutil.which("curl"):
        return f"curl -s -o /dev/null -X POST {shlex.quote(url)}"
    code = f"import urllib.request as u; u.urlopen(u.Request({url!r}, data=b'', method='POST'))"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


async def activity(api: httpx.AsyncClient, instance_id: str, step: str) -> dict:
    body = (await api.get(f"/v1/instances/{instance_id}")).json()
    return next((a for a in body["activities"] if a["step"] == step), {})


async def wait_running(
    api: httpx.AsyncClient, instance_id: str, step: str, timeout: float = 30
) -> dict:
    """Wait until `step` is claimed (RUNNING, with the server that holds it)."""

    async def running() -> dict | None:
        a = await activity(api, instance_id, step)
        return a if a.get("status") == "RUNNING" and a.get("claimed_by") else None

    return await wait_for(running, timeout, f"{step} to be running")


async def wait_status(
    api: httpx.AsyncClient, instance_id: str, status: str, timeout: float = 60
) -> dict:
    async def reached() -> dict | None:
        body = (await api.get(f"/v1/instances/{instance_id}")).json()
        return body if body["status"] == status else None

    return await wait_for(reached, timeout, f"instance {instance_id} to be {status}")


async def wait_settled(
    api: httpx.AsyncClient, instance_id: str, status: str, timeout: float = 60
) -> dict:
    """Wait until the instance is `status`, has ended, or is FLAGGED (waiting for an operator),
    and assert it is `status`: a test waiting for FLAGGED fails at once, naming what happened,
    when the instance FAILED instead (and the other way round). Not for a flag expected to
    resolve itself."""
    settled_statuses = {status, "COMPLETED", "FAILED", "CANCELLED", "FLAGGED"}

    async def settled() -> dict | None:
        body = (await api.get(f"/v1/instances/{instance_id}")).json()
        return body if body["status"] in settled_statuses else None

    body = await wait_for(settled, timeout, f"instance {instance_id} to be {status}")
    assert body["status"] == status, (
        f"instance {instance_id} is {body['status']}, not {status}: {body['activities']}"
    )
    return dict(body)


async def history(api: httpx.AsyncClient, instance_id: str) -> list[dict]:
    body = (await api.get(f"/v1/instances/{instance_id}/history")).json()
    return list(body["items"])


async def define_and_start(
    api: httpx.AsyncClient, definition: dict, inputs: dict | None = None
) -> str:
    created = await api.post("/v1/definitions", json=definition)
    assert created.status_code == 201, created.text
    started = await api.post(
        "/v1/instances", json={"definition": definition["name"], "inputs": inputs or {}}
    )
    assert started.status_code == 202, started.text
    return str(started.json()["id"])


async def assert_work_queues_empty(stack: Stack) -> None:
    namespace = stack.env["PACELINE_NAMESPACE"]
    live = {queue_name(namespace, q) for q in Queue}

    async def empty() -> dict[str, int] | None:
        depths = await queue_depths(namespace)
        return depths if live <= depths.keys() and not any(depths[q] for q in live) else None

    await wait_for(empty, 30, "every work queue to be empty", interval=1.0)


async def revive_until(stack: Stack, done: asyncio.Event) -> None:
    """What `make run` does: start again any service that dies, until `done`."""
    while not done.is_set():
        stack.revive_dead()
        await asyncio.sleep(0.2)
