"""The token guards every /v1 route; health and the OpenAPI document need none."""

from __future__ import annotations

import uuid

import httpx
import pytest
from admin_support import TOKEN, assert_problem
from fastapi import FastAPI

SOME_ID = uuid.UUID("24d306c7-ae0c-49c3-ab61-235e0c4901ef")  # fixed: test ids must not vary
SOME_APPROVAL = uuid.UUID("9b1c6f0e-3d2a-4e57-8f41-0c5d7a2b6e93")
SOME_EVENT = uuid.UUID("4f0d9a51-7c3e-4b8a-9e26-1d5b8c7a3f40")
V1_ROUTES = [
    ("POST", "/v1/definitions"),
    ("GET", "/v1/definitions"),
    ("GET", "/v1/definitions/some-name"),
    ("GET", "/v1/definitions/some-name/versions/1"),
    ("POST", "/v1/instances"),
    ("GET", "/v1/instances"),
    ("GET", f"/v1/instances/{SOME_ID}"),
    ("POST", f"/v1/instances/{SOME_ID}/cancel"),
    ("GET", f"/v1/instances/{SOME_ID}/history"),
    ("GET", f"/v1/instances/{SOME_ID}/activities"),
    ("POST", f"/v1/instances/{SOME_ID}/activities/some-step/resolve"),
    ("POST", f"/v1/instances/{SOME_ID}/signals/some-name"),
    ("GET", f"/v1/instances/{SOME_ID}/signals"),
    ("GET", "/v1/approvals"),
    ("GET", f"/v1/approvals/{SOME_APPROVAL}"),
    ("POST", f"/v1/approvals/{SOME_APPROVAL}/decision"),
    ("GET", "/v1/flags"),
    ("GET", "/v1/servers"),
    ("POST", "/v1/servers/some-server/drain"),
    ("DELETE", "/v1/servers/some-server"),
    ("POST", "/v1/schedules"),
    ("GET", "/v1/schedules"),
    ("GET", "/v1/schedules/some-schedule"),
    ("PATCH", "/v1/schedules/some-schedule"),
    ("DELETE", "/v1/schedules/some-schedule"),
    ("POST", "/v1/schedules/some-schedule/pause"),
    ("POST", "/v1/schedules/some-schedule/resume"),
    ("POST", "/v1/schedules/some-schedule/trigger"),
    ("POST", "/v1/schedules/some-schedule/backfill"),
    ("GET", "/v1/schedules/some-schedule/fires"),
    ("POST", "/v1/events"),
    ("GET", f"/v1/events/{SOME_EVENT}"),
]
WRONG_CREDENTIALS = [
    None,
    "Bearer not-the-token",
    f"Basic {TOKEN}",
    f"Bearer {TOKEN}x",
    "Bearer",
    b"Bearer t\xf6ken",  # not ASCII: must be a 401, not a crash in compare_digest
]


def test_the_route_table_covers_every_v1_route(app: FastAPI) -> None:
    # A new route must be added to V1_ROUTES so that it is checked for the token too.
    served = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/v1")
        for method in operations
    }
    listed = {
        (
            method,
            path.replace("some-name", "{name}")
            .replace("/versions/1", "/versions/{version}")
            .replace(str(SOME_ID), "{instance_id}")
            .replace(str(SOME_APPROVAL), "{approval_id}")
            .replace("some-step", "{step}")
            .replace("some-server", "{server_id}")
            .replace("some-schedule", "{schedule_id}")
            .replace(str(SOME_EVENT), "{event_id}"),
        )
        for method, path in V1_ROUTES
    }
    assert served == listed


@pytest.mark.parametrize(("method", "path"), V1_ROUTES)
# Fixed ids: the token is random per process, and parallel workers must collect the same tests.
@pytest.mark.parametrize(
    "authorization",
    WRONG_CREDENTIALS,
    ids=["none", "wrong", "basic", "longer", "bare", "not-ascii"],
)
async def test_v1_routes_refuse_a_missing_or_wrong_token(
    anon: httpx.AsyncClient, method: str, path: str, authorization: str | bytes | None
) -> None:
    raw = authorization.encode() if isinstance(authorization, str) else authorization
    headers = {} if raw is None else {b"Authorization": raw}
    response = await anon.request(method, path, headers=headers, json={"name": "x"})
    problem = assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in response.text
    assert problem["type"].endswith("unauthorized")


async def test_a_malformed_body_without_the_token_is_still_401(anon: httpx.AsyncClient) -> None:
    # FastAPI parses JSON before dependencies run; the token must still be checked first.
    response = await anon.post(
        "/v1/instances", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 401)


async def test_health_and_openapi_need_no_token(anon: httpx.AsyncClient) -> None:
    assert (await anon.get("/healthz")).json() == {"status": "ok"}
    ready = await anon.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok"}
    schema = (await anon.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["AdminToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["AdminToken"]["description"],
    }
    start = schema["paths"]["/v1/instances"]["post"]
    assert start["security"] == [{"AdminToken": []}]
    assert "application/problem+json" in start["responses"]["422"]["content"]
    assert "/healthz" in schema["paths"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


async def test_the_right_token_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/definitions")
    assert response.status_code == 200


async def test_unknown_routes_are_404_problems(client: httpx.AsyncClient) -> None:
    problem = assert_problem(await client.get("/v1/nothing-here"), 404)
    assert "/v1/nothing-here" in problem["detail"]
    assert_problem(await client.delete("/v1/definitions"), 405)
