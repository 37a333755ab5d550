"""The admin API as a real process: authentication and bad input, never a 500."""

from __future__ import annotations

import httpx
import pytest
from stack_env import StackEnv

pytestmark = pytest.mark.integration


async def test_missing_or_wrong_token_is_401(env: StackEnv, api: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=env.base_url) as anonymous:
        assert (await anonymous.get("/healthz")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": env.token}):
            r = await anonymous.get("/v1/instances", headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["content-type"].startswith("application/problem+json")
            assert env.token not in r.text


async def test_invalid_definition_lists_every_problem(api: httpx.AsyncClient) -> None:
    bad = {
        "name": "broken",
        "steps": [
            {"id": "a", "type": "teleport"},
            {"id": "a", "type": "noop", "with": {"x": "${steps.later.output}"}},
            {"id": "later", "type": "sleep", "with": {}},
            {"id": "c", "if": "steps.a.output.x =="},
        ],
    }
    r = await api.post("/v1/definitions", json=bad)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    paths = [e["path"] for e in r.json()["errors"]]
    assert "steps[0].type" in paths and "steps[1].id" in paths
    assert "steps[1].with.x" in paths and "steps[3].if" in paths
    assert any(p.startswith("steps[2].with") for p in paths)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/definitions", b"{not json"),
        ("POST", "/v1/definitions", b"[]"),
        ("POST", "/v1/definitions", b'{"name": 5, "steps": {"a": 1}}'),
        ("POST", "/v1/instances", b'{"definition": "nope"}'),
        ("POST", "/v1/instances", b'{"definition": ["x"], "inputs": 3}'),
        ("POST", "/v1/instances", b"\xff\xfe"),
        ("GET", "/v1/instances/not-a-uuid", None),
        ("GET", "/v1/instances?status=BOGUS", None),
        ("GET", "/v1/instances?limit=-4", None),
        ("POST", "/v1/instances/00000000-0000-0000-0000-000000000000/cancel", None),
    ],
)
async def test_bad_requests_get_a_4xx_problem(
    api: httpx.AsyncClient, method: str, path: str, body: bytes | None
) -> None:
    r = await api.request(
        method, path, content=body, headers={"Content-Type": "application/json"} if body else {}
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["detail"]
