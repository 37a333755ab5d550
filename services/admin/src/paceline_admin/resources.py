"""What the routes share: the process database pool, the AMQP publisher and the control
exchange (drains to one server).

Opened once by the app's lifespan and handed to routes as dependencies (`Db`, `Broker`,
`Control`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

import aio_pika
import asyncpg
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from fastapi import Depends, Request

from paceline_admin.settings import AdminSettings
from paceline_contracts.queues import control_exchange_name
from paceline_infra import amqp, db
from paceline_infra.amqp import Publisher
from paceline_infra.identity import ServerIdentity

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Resources:
    pool: asyncpg.Pool
    connection: AbstractRobustConnection
    publisher: Publisher
    control: AbstractExchange
    """The control exchange, on a channel of its own with publisher confirms and
    `on_return_raises`: a drain that no server's queue takes raises instead of vanishing."""


@asynccontextmanager
async def open_resources(
    settings: AdminSettings, identity: ServerIdentity
) -> AsyncIterator[Resources]:
    pool = await db.create_pool(settings.database_url)
    try:
        connection = await amqp.connect(settings, name=identity.id)
        try:
            publisher = await Publisher.open(connection, settings.namespace)
            control_channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            control = await control_channel.declare_exchange(
                control_exchange_name(settings.namespace),
                aio_pika.ExchangeType.DIRECT,
                durable=True,
            )
            log.info(
                "admin connected to %s and the broker (namespace %s)",
                db.redact(settings.database_url),
                settings.namespace,
            )
            yield Resources(pool, connection, publisher, control)
        finally:
            await connection.close()
    finally:
        await pool.close()


def _resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


def get_pool(request: Request) -> asyncpg.Pool:
    return _resources(request).pool


def get_publisher(request: Request) -> Publisher:
    return _resources(request).publisher


def get_connection(request: Request) -> AbstractRobustConnection:
    return _resources(request).connection


def get_control(request: Request) -> AbstractExchange:
    return _resources(request).control


Db = Annotated[asyncpg.Pool, Depends(get_pool)]
Broker = Annotated[Publisher, Depends(get_publisher)]
BrokerConnection = Annotated[AbstractRobustConnection, Depends(get_connection)]
Control = Annotated[AbstractExchange, Depends(get_control)]
