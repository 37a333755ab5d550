"""The admin API against a real PostgreSQL database and RabbitMQ broker of its own.

Each session creates and migrates a fresh database and uses a fresh namespace on the broker;
both are removed at the end. The app runs in-process with its lifespan, through httpx.
"""

from __future__ import annotations

import importlib.resources
import secrets
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import httpx
import pytest
from admin_support import AUTH, HEARTBEAT_S, TOKEN, TOKENS, Broadcasts
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from fastapi import FastAPI
from stack_env import read_stream

from paceline_admin import cancelling
from paceline_admin.app import create_app
from paceline_admin.settings import AdminSettings
from paceline_contracts.messages import CANCELLATION, InstanceCancelled
from paceline_contracts.queues import (
    Queue,
    Stream,
    control_exchange_name,
    dead_letter_exchange_name,
    dead_queue_name,
    exchange_name,
    queue_name,
    stream_name,
)
from paceline_contracts.states import ServerKind
from paceline_infra import db
from paceline_infra.identity import ServerIdentity
from paceline_infra.telemetry import setup_tracing

SERVER_URL = "postgresql://postgres@127.0.0.1:5432"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    name = f"paceline_admin_test_{secrets.token_hex(6)}"
    url = f"{SERVER_URL}/{name}"
    await db.migrate(url, importlib.resources.files("paceline_scheduler") / "migrations")
    yield url
    conn = await asyncpg.connect(f"{SERVER_URL}/postgres")
    try:
        # The name is ours and checked by database_name(); identifiers cannot be parameters.
        await conn.execute(f'DROP DATABASE IF EXISTS "{db.database_name(url)}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def namespace() -> str:
    return f"pltest-admin-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def settings(database_url: str, namespace: str) -> AdminSettings:
    # Heartbeats twice a second, so that tests that wait for one wait briefly.
    return AdminSettings(
        database_url=database_url,
        namespace=namespace,
        amqp_url=AMQP_URL,
        admin_token=TOKEN,
        admin_tokens=",".join(f"{name}={token}" for name, token in TOKENS.items()),
        server_heartbeat_s=HEARTBEAT_S,
    )


@pytest.fixture(scope="session")
async def broker(namespace: str) -> AsyncIterator[AbstractChannel]:
    """A channel of the tests' own, to read queues; removes the namespace's topology last.
    Robust: the session's connection may be dropped between admin test files (the worker
    process runs long synchronous tests, hypothesis properties say, without answering the
    broker's heartbeats); the later admin tests get their channel back."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    yield channel
    await connection.close()
    # A connection of its own for the clean-up: other suites restart the broker, which closes
    # the session's channel long before this runs.
    cleanup = await aio_pika.connect(AMQP_URL)
    try:
        channel = await cleanup.channel()
        for queue in Queue:
            for name in (queue_name(namespace, queue), dead_queue_name(namespace, queue)):
                await channel.queue_delete(name)
        for stream in Stream:
            await channel.queue_delete(stream_name(namespace, stream))
        for name in (
            exchange_name(namespace),
            dead_letter_exchange_name(namespace),
            control_exchange_name(namespace),
        ):
            await channel.exchange_delete(name)
    finally:
        await cleanup.close()


@pytest.fixture(scope="session")
async def app(settings: AdminSettings, broker: AbstractChannel) -> AsyncIterator[FastAPI]:
    # As `paceline-admin run` does, so that spans are real and have trace ids.
    setup_tracing(ServerIdentity(ServerKind.ADMIN), settings)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="session")
async def anon(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client without the token."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        yield client


@pytest.fixture(scope="session")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://admin", headers=AUTH
    ) as client:
        yield client


@pytest.fixture(scope="session")
async def pool(database_url: str, app: FastAPI) -> AsyncIterator[asyncpg.Pool]:
    """The tests' own view of the process database, to check and arrange rows."""
    pool = await db.create_pool(database_url, max_size=3)
    yield pool
    await pool.close()


@pytest.fixture
async def commands(broker: AbstractChannel, app: FastAPI, namespace: str) -> AbstractQueue:
    """The commands queue, emptied of what earlier tests left in it."""
    queue = await broker.declare_queue(queue_name(namespace, Queue.COMMANDS), passive=True)
    await queue.purge()
    return queue


@pytest.fixture
async def heartbeats(broker: AbstractChannel, app: FastAPI, namespace: str) -> AbstractQueue:
    """The servers queue (no scheduler consumes it in these tests): every heartbeat sent."""
    return await broker.declare_queue(queue_name(namespace, Queue.SERVERS), passive=True)


@pytest.fixture
async def no_servers(pool: asyncpg.Pool) -> None:
    """An empty server registry (the tests insert the rows the scheduler would write)."""
    await pool.execute("DELETE FROM servers")


@pytest.fixture(autouse=True)
def quick_cancel_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """No scheduler runs here to record a cancel: the answer waits for it briefly, not 3 s
    (a test of the wait sets its own)."""
    monkeypatch.setattr(cancelling, "RECORD_WAIT_S", 0.2)


@pytest.fixture
def broadcasts(app: FastAPI, namespace: str) -> Broadcasts:
    """Every cancellation broadcast of an instance on the cancellations stream, read from its
    start as a worker that starts late does (the stream keeps every test's broadcasts)."""

    async def read(instance_id: str) -> list[tuple[InstanceCancelled, AbstractIncomingMessage]]:
        seen = await read_stream(
            AMQP_URL, namespace, Stream.CANCELLATIONS, within_s=5.0, quiet_s=0.3
        )
        parsed = [(CANCELLATION.validate_json(m.body), m) for m in seen]
        return [(c, m) for c, m in parsed if str(c.instance_id) == instance_id]

    return read
