"""Helpers for the admin API tests (fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from typing import Any

import httpx
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

TOKEN = "test-token-" + secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}

SIMPLE = {
    "inputs": {"host": {"type": "string"}, "count": {"type": "integer", "default": 1}},
    "steps": [
        {"id": "first", "type": "noop", "with": {"host": "${inputs.host}"}},
        {"id": "second", "type": "sleep", "with": {"seconds": 0}},
    ],
}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def drain(queue: AbstractQueue, settle_s: float = 0.2) -> list[AbstractIncomingMessage]:
    """Every message in the queue, waiting briefly for stragglers."""
    messages: list[AbstractIncomingMessage] = []
    deadline = asyncio.get_running_loop().time() + settle_s
    while True:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            messages.append(message)
            continue
        if asyncio.get_running_loop().time() > deadline:
            return messages
        await asyncio.sleep(0.02)


def body_of(message: AbstractIncomingMessage) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(message.body)
    return body


async def create_definition(
    client: httpx.AsyncClient, name: str, definition: dict[str, Any] | None = None
) -> dict[str, Any]:
    response = await client.post("/v1/definitions", json={"name": name, **(definition or SIMPLE)})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["title"] and problem["detail"] and problem["type"]
    return problem
