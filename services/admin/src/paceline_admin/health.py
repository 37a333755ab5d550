"""Liveness and readiness, without a token (for supervisors and load balancers)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from fastapi import APIRouter
from pydantic import BaseModel

from paceline_admin.problems import ApiError, problem_responses
from paceline_admin.resources import BrokerConnection, Db

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = "ok"


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """200 whenever the process serves requests."""
    return Health()


@router.get("/readyz", response_model=Health, responses=problem_responses(503))
async def readyz(pool: Db, connection: BrokerConnection) -> Health:
    """200 when the process database answers and the broker connection is up; else 503."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await pool.fetchval("SELECT 1")
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("not ready: database: %r", exc)
        raise ApiError(503, "the process database does not answer", kind="not-ready") from exc
    if connection.is_closed or not connection.connected.is_set():
        raise ApiError(503, "the message broker connection is down", kind="not-ready")
    return Health()
