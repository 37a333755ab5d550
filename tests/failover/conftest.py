"""Failover tests: each builds a stack of real processes shaped for its scenario, crashes
parts of it with real signals, and checks what the operator would see."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import sys
import time
import uuid
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

OPERATORS = (
    "ops-alice",
    "ops-ann",
    "ops-ben",
    "ops-bob",
    "ops-carol",
    "ops-cat",
    "ops-dan",
    "ops-eve",
)
"""Principals every test stack has besides `admin`, each with a token of its own (generated per
stack): what a request does is recorded with the name of the principal whose token it carries
(`as_principal`)."""


class StackApi(httpx.AsyncClient):
    """A client of a test stack's API, as `admin`; `env` has every principal's token."""

    def __init__(self, env: StackEnv, **kwargs: Any) -> None:
        super().__init__(
            base_url=env.base_url, headers={"Authorization": f"Bearer {env.token}"}, **kwargs
        )
        self.env = env


def as_principal(api: httpx.AsyncClient, name: str) -> dict[str, str]:
    """Headers that make a request of `api` (a `make_stack` client) the principal `name`."""
    assert isinstance(api, StackApi), "not a client of a stack of make_stack"
    return {"Authorization": f"Bearer {api.env.token_of(name)}"}


StackFactory = Callable[..., Awaitable[tuple[Stack, httpx.AsyncClient]]]

# Kills the process that runs it: its parent (a worker, or an isolated runner).
POISON = {
    "id": "boom",
    "type": "shell.command",
    "restartable": True,
    "with": {"argv": ["sh", "-c", "kill -9 $PPID; sleep 5"]},
}

needs_rabbitmqctl = pytest.mark.skipif(
    not shutil.which("rabbitmqctl"), reason="needs the broker's rabbitmqctl"
)


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
    and/or database server (deploy/private_services.py) when given, else the machine's; `extra_env`
    adds variables to every service. The
    client calls as `admin`; `as_principal` makes a request one of `OPERATORS`."""
    made: list[tuple[StackEnv, Stack, StackApi]] = []

    async def make(
        workers: list[dict[str, str]] | None = None,
        *,
        broker: PrivateRabbitMQ | None = None,
        database: PrivatePostgres | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> tuple[Stack, httpx.AsyncClient]:
        extra = extra_env or {}
        env = StackEnv.fresh(
            "pltest",
            amqp_url=broker.url if broker else AMQP_URL,
            rabbitmq_node=broker.node if broker else None,
            server_url=database.url if database else DATABASE_URL,
            principals=OPERATORS,
        )
        stack = Stack(
            env={**env.variables(), **FAST_LIVENESS, **extra}, log_dir=tmp_path / env.namespace
        )
        stack.migrate()
        stack.add("scheduler")
        for worker_env in workers if workers is not None else [{}, {}]:
            stack.add("activity-worker", **worker_env)
        stack.add("reporting")
        stack.add("admin")
        await wait_ready(env, stack)
        api = StackApi(env, timeout=30)
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


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def effect_path() -> str:
    """A path of its own on the effect sink, to count one test's requests."""
    return f"/effect/{uuid.uuid4().hex[:8]}"


def poison_flow() -> dict:
    """A definition (its name unique) whose only step is `POISON`."""
    return {"name": f"poison-{uuid.uuid4().hex[:6]}", "steps": [POISON]}


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


def step_of(body: dict, step: str) -> dict:
    """The activity of `step` in an instance as the API shows it (`body`)."""
    return next(a for a in body["activities"] if a["step"] == step)


async def sleep_until(moment: float) -> None:
    """Sleep until `time.time()` reaches `moment`."""
    await asyncio.sleep(max(0.0, moment - time.time()))


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


async def start_flow(api: httpx.AsyncClient, prefix: str, steps: list[dict]) -> str:
    """Define `steps` under a name of their own (`prefix`-...) and start an instance of them."""
    return await define_and_start(api, {"name": unique_name(prefix), "steps": steps})


async def busy_single_slot_worker(
    make_stack: StackFactory, prefetch: int, nap_s: float
) -> tuple[Stack, httpx.AsyncClient, str, str]:
    """A stack of one worker that runs one activity at a time but holds (prefetches) up to
    `prefetch` messages, busy with a `nap` of `nap_s` seconds: the stack, its API client, the
    napping instance and the worker's server id."""
    stack, api = await make_stack(
        workers=[{"PACELINE_WORKER_CONCURRENCY": "1", "PACELINE_WORKER_PREFETCH": str(prefetch)}]
    )
    busy = await start_flow(
        api, "busy", [{"id": "nap", "type": "sleep", "with": {"seconds": nap_s}}]
    )
    holder = (await wait_running(api, busy, "nap"))["claimed_by"]
    return stack, api, busy, holder


async def assert_work_queues_empty(stack: Stack) -> None:
    namespace = stack.env["PACELINE_NAMESPACE"]
    live = {queue_name(namespace, q) for q in Queue}

    seen: dict[str, int] = {}

    async def empty() -> dict[str, int] | None:
        depths = await queue_depths(namespace)
        seen.clear()
        seen.update({q: n for q, n in depths.items() if q in live and n})
        return depths if live <= depths.keys() and not seen else None

    try:
        await wait_for(empty, 30, "every work queue to be empty", interval=1.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still queued: {seen}") from exc


async def revive_until(stack: Stack, done: asyncio.Event) -> None:
    """What `make run` does: start again any service that dies, until `done`."""
    while not done.is_set():
        stack.revive_dead()
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def reviving(stack: Stack) -> AsyncIterator[None]:
    """Within it, any service of `stack` that dies is started again (`revive_until`)."""
    done = asyncio.Event()
    supervisor = asyncio.create_task(revive_until(stack, done))
    try:
        yield
    finally:
        done.set()
        await supervisor


async def rabbitmqctl(*args: str) -> str:
    """What `rabbitmqctl -q <args>` prints (the machine's broker; see `needs_rabbitmqctl`)."""
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode()


async def close_connection_of(server_id: str) -> None:
    """A network blip, as the broker sees it: the broker closes the connection of the server
    `server_id` (which must have exactly one)."""
    connections = await rabbitmqctl("list_connections", "pid", "client_properties")
    pids = [line.split()[0] for line in connections.splitlines() if server_id in line]
    assert len(pids) == 1, connections
    await rabbitmqctl("close_connection", pids[0], "test: a network blip")
