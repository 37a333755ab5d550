"""A stack's own names (namespace, databases, port, token), the broker's view of its queues,
and tearing them down. Used by `make chaos` and the tests: a stack never touches another
stack's names, so either runs next to `make run` on the same broker and server.

A stack uses the machine's broker and database server (PACELINE_AMQP_URL, PACELINE_DATABASE_URL)
unless it is given others: a private broker or server (deploy/private_services.py) that a
restart test or a chaos run may restart. Its queues are then asked of that broker, by node name.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg

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

AMQP_URL = os.environ.get("PACELINE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL = os.environ.get(
    "PACELINE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/paceline"
)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def is_local(url: str) -> bool:
    """Whether the server behind `url` runs on this machine (so we may restart it)."""
    return (urlsplit(url).hostname or "127.0.0.1") in LOCAL_HOSTS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Broker:
    """A RabbitMQ broker: its AMQP URL, and the node name `rabbitmqctl -n` reaches it by (None:
    rabbitmqctl's default node, which is the machine's broker)."""

    url: str = AMQP_URL
    node: str | None = None


_BROKERS: dict[str, Broker] = {}
"""The broker of each namespace this process made a StackEnv for, other than the machine's."""


@dataclass(frozen=True)
class StackEnv:
    """Names no other stack on this broker or server uses."""

    namespace: str
    database: str
    reporting_database: str
    admin_port: int
    token: str
    amqp_url: str = AMQP_URL
    """The broker the stack uses: by default the machine's."""
    server_url: str = DATABASE_URL
    """A URL of the PostgreSQL server the stack's databases are on (its database part is not
    used): by default the machine's."""
    rabbitmq_node: str | None = None
    """The broker's node name for `rabbitmqctl -n`, when it is not the machine's broker."""
    principals: tuple[tuple[str, str], ...] = ()
    """Principals other than `admin` (whose token is `token`), as (name, token) pairs: the
    stack's PACELINE_ADMIN_TOKENS (none by default)."""

    def __post_init__(self) -> None:
        if self.broker != Broker():
            _BROKERS[self.namespace] = self.broker

    @classmethod
    def fresh(
        cls,
        prefix: str,
        *,
        amqp_url: str = AMQP_URL,
        server_url: str = DATABASE_URL,
        rabbitmq_node: str | None = None,
        principals: Iterable[str] = (),
    ) -> StackEnv:
        """New names starting with `prefix` (letters and digits), e.g. `plchaos`; on the
        machine's broker and database server unless given others. Each of `principals` (names
        other than `admin`) gets a token of its own (`token_of`)."""
        tag = secrets.token_hex(5)
        return cls(
            f"{prefix}-{tag}",
            f"{prefix}_{tag}",
            f"{prefix}_rep_{tag}",
            _free_port(),
            secrets.token_urlsafe(24),
            amqp_url,
            server_url,
            rabbitmq_node,
            tuple((name, secrets.token_urlsafe(24)) for name in principals),
        )

    @property
    def broker(self) -> Broker:
        return Broker(self.amqp_url, self.rabbitmq_node)

    @property
    def database_url(self) -> str:
        return _with_database(self.server_url, self.database)

    @property
    def reporting_url(self) -> str:
        return _with_database(self.server_url, self.reporting_database)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def token_of(self, principal: str) -> str:
        """The token of `principal`: `admin` (`token`) or one of `principals`."""
        if principal == "admin":
            return self.token
        for name, token in self.principals:
            if name == principal:
                return token
        known = ", ".join(["admin", *(name for name, _ in self.principals)])
        raise KeyError(f"{principal} is not a principal of this stack (only {known})")

    def variables(self) -> dict[str, str]:
        variables = {
            "PACELINE_NAMESPACE": self.namespace,
            "PACELINE_AMQP_URL": self.amqp_url,
            "PACELINE_DATABASE_URL": self.database_url,
            "PACELINE_REPORTING_DATABASE_URL": self.reporting_url,
            "PACELINE_ADMIN_PORT": str(self.admin_port),
            "PACELINE_ADMIN_TOKEN": self.token,
        }
        if self.principals:
            # token_urlsafe tokens hold no `,`: they can be written inline.
            variables["PACELINE_ADMIN_TOKENS"] = ",".join(f"{n}={t}" for n, t in self.principals)
        if self.rabbitmq_node:
            # Not a service setting: what deploy/ensure-services.sh names the node by.
            variables["PACELINE_RABBITMQ_NODE"] = self.rabbitmq_node
        return variables

    def live_queues(self) -> set[str]:
        return {queue_name(self.namespace, q) for q in Queue}

    def dead_queues(self) -> set[str]:
        return {dead_queue_name(self.namespace, q) for q in Queue}


def broker_of(namespace: str) -> Broker:
    """The broker the namespace's stack uses (the machine's, unless its StackEnv said other)."""
    return _BROKERS.get(namespace, Broker())


def _can_ask_rabbitmqctl(broker: Broker) -> bool:
    # rabbitmqctl without -n asks the machine's node: only right for the machine's broker.
    return (
        shutil.which("rabbitmqctl") is not None
        and is_local(broker.url)
        and (broker.node is not None or broker.url == AMQP_URL)
    )


async def _rabbitmqctl(broker: Broker, *argv: str) -> str:
    """What `rabbitmqctl -q [-n <node>] <argv>` prints (the local broker's own view)."""
    node = ("-n", broker.node) if broker.node else ()
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *node, *argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode()


async def queue_depths(namespace: str) -> dict[str, int]:
    """Messages (ready and unacknowledged) in each queue of the namespace."""
    broker = broker_of(namespace)
    if _can_ask_rabbitmqctl(broker):
        out = await _rabbitmqctl(broker, "list_queues", "name", "messages")
        depths = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].startswith(f"{namespace}.") and parts[1].isdigit():
                depths[parts[0]] = int(parts[1])
        return depths
    return await _passive_depths(namespace, broker.url)


async def queue_details(namespace: str) -> dict[str, str]:
    """Ready, unacknowledged and consumers of each queue of the namespace, when rabbitmqctl
    can say: what tells a message nobody takes from one a consumer holds and never settles."""
    broker = broker_of(namespace)
    if not _can_ask_rabbitmqctl(broker):
        return {}
    columns = ("messages_ready", "messages_unacknowledged", "consumers")
    out = await _rabbitmqctl(broker, "list_queues", "name", *columns)
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].startswith(f"{namespace}."):
            found[parts[0]] = ", ".join(f"{c} {v}" for c, v in zip(columns, parts[1:], strict=True))
    return found


async def unsettled_holders(namespace: str | None = None) -> list[str]:
    """Which connections (named by their server id) hold unacknowledged deliveries now, when
    rabbitmqctl can say: who to blame for a queue that is never seen empty. On the broker of
    `namespace`; without one, of the stacks this process made (the machine's when none said
    other)."""
    if namespace is not None:
        brokers = [broker_of(namespace)]
    else:
        brokers = sorted(set(_BROKERS.values()), key=lambda b: b.url) or [Broker()]
    holders = []
    for broker in brokers:
        holders += await _unsettled_on(broker)
    return holders


async def _unsettled_on(broker: Broker) -> list[str]:
    if not _can_ask_rabbitmqctl(broker):
        return []

    async def listing(*argv: str) -> list[dict[str, Any]]:
        try:
            out = await _rabbitmqctl(broker, *argv, "--formatter", "json")
            return list(json.loads(out or "[]"))
        except ValueError:
            return []

    names = {
        c["pid"]: _connection_name(c.get("client_properties") or [], default=c["pid"])
        for c in await listing("list_connections", "pid", "client_properties")
    }
    return [
        f"{names.get(ch['connection'], ch['connection'])}: {ch['messages_unacknowledged']} "
        f"unacknowledged on a channel with {ch['consumer_count']} consumers"
        for ch in await listing(
            "list_channels", "connection", "messages_unacknowledged", "consumer_count"
        )
        if ch.get("messages_unacknowledged")
    ]


def _connection_name(properties: list[Any], default: str) -> str:
    # rabbitmqctl's JSON gives client properties as [name, type, value] triples.
    for entry in properties:
        if isinstance(entry, list) and len(entry) == 3 and entry[0] == "connection_name":
            return str(entry[2])
    return default


async def _passive_depths(namespace: str, amqp_url: str) -> dict[str, int]:
    # A passive declare counts only ready messages: good enough once consumers have settled.
    connection = await aio_pika.connect(amqp_url)
    try:
        depths = {}
        for q in Queue:
            for name in (queue_name(namespace, q), dead_queue_name(namespace, q)):
                channel = await connection.channel()
                try:
                    declared = await channel.declare_queue(name, passive=True)
                    depths[name] = declared.declaration_result.message_count or 0
                except aio_pika.exceptions.ChannelClosed:
                    pass  # not declared (yet): a closed channel says so
        return depths
    finally:
        await connection.close()


async def drop_everything(env: StackEnv, tries: int = 20) -> None:
    """The run's databases, queues and exchanges; tried again for a while, since a broker or
    database restart (ours, or another stack's on this machine) may be under way."""
    for attempt in range(tries):
        try:
            await _drop(env)
            return
        except (OSError, asyncpg.PostgresError, aio_pika.exceptions.AMQPError):
            if attempt == tries - 1:
                raise
            await asyncio.sleep(3)


async def _drop(env: StackEnv) -> None:
    conn = await asyncpg.connect(_with_database(env.server_url, "postgres"))
    try:
        for name in (env.database, env.reporting_database):
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
    connection = await aio_pika.connect(env.amqp_url)
    try:
        channel = await connection.channel()
        streams = {stream_name(env.namespace, s) for s in Stream}
        for name in sorted(env.live_queues() | env.dead_queues() | streams):
            await channel.queue_delete(name)
        for name in (
            exchange_name(env.namespace),
            dead_letter_exchange_name(env.namespace),
            control_exchange_name(env.namespace),
        ):
            await channel.exchange_delete(name)
    finally:
        await connection.close()


async def read_stream(
    amqp_url: str, namespace: str, stream: Stream, *, within_s: float = 10.0, quiet_s: float = 0.5
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The messages on `stream` of `namespace`, read from its start as a consumer that starts
    late does: until nothing more arrives for `quiet_s`, or `within_s` at the most."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)  # a stream consumer needs a prefetch
        queue = await channel.declare_queue(stream_name(namespace, stream), passive=True)
        seen: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            seen.append(message)
            await message.ack()

        tag = await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        loop = asyncio.get_running_loop()
        deadline, count, quiet_since = loop.time() + within_s, -1, loop.time()
        while loop.time() < deadline:
            await asyncio.sleep(0.05)
            if len(seen) != count:
                count, quiet_since = len(seen), loop.time()
            elif loop.time() - quiet_since > quiet_s:
                break
        await queue.cancel(tag)
    finally:
        await connection.close()
    return seen
