"""Garbage in gets a 4xx problem out: no route answers 500 to a bad request."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from admin_support import assert_problem, create_definition, unique

from paceline_admin.settings import MAX_BODY_BYTES

JSON = {"Content-Type": "application/json"}
YAML = {"Content-Type": "application/yaml"}
GARBAGE: list[tuple[bytes, dict[str, str]]] = [
    (b"", JSON),
    (b"null", JSON),
    (b"[]", JSON),
    (b'"a string"', JSON),
    (b"{", JSON),
    (b"\xff\xfe\x00", JSON),
    (b"[" * 5000 + b"]" * 5000, JSON),
    (b'{"definition": null, "inputs": null}', JSON),
    (b'{"definition": "x\\u0000y"}', JSON),
    (b'{"definition": "\\ud800"}', JSON),
    (b'{"definition": "x", "version": 99999999999999999999}', JSON),
    (b'{"definition": "x", "version": -1}', JSON),
    (b'{"name": "x", "steps": [{"id": "a", "type": "noop", "with": {"v": NaN}}]}', JSON),
    (b'{"name": "x", "steps": [{"id": "a", "type": "noop", "with": {"v": "\\ud800"}}]}', JSON),
    (b'{"name": "x", "steps": ' + b"[" * 900 + b"]" * 900 + b"}", JSON),
    (b"{}", {"Content-Type": "text/plain"}),
    (b"- : : :\n\t- ]", YAML),
    (b"!!python/object/apply:os.system ['true']", YAML),
    (b"\xff\xfe", YAML),
    (b"name: x\nsteps: [{id: a, type: noop, with: {big: 123456789012345678901234567890}}]", YAML),
    (b"[" * 5000 + b"]" * 5000, YAML),
]


@pytest.mark.parametrize(("body", "headers"), GARBAGE)
@pytest.mark.parametrize(
    "path",
    [
        "/v1/definitions",
        "/v1/instances",
        "/v1/instances/00000000-0000-4000-8000-000000000000/activities/a/resolve",
        "/v1/instances/00000000-0000-4000-8000-000000000000/cancel",
        "/v1/instances/00000000-0000-4000-8000-000000000000/signals/go",
        "/v1/approvals/00000000-0000-4000-8000-000000000000/decision",
    ],
)
async def test_garbage_bodies_get_a_4xx_problem(
    client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str]
) -> None:
    # The client raises on an app exception, so a crash fails this test too.
    response = await client.post(path, content=body, headers=headers)
    assert 400 <= response.status_code < 500, response.text
    problem = assert_problem(response, response.status_code)
    if response.status_code == 400:
        assert problem["type"] == "urn:paceline:problem:malformed-body"


async def test_inputs_that_cannot_be_stored_are_422(client: httpx.AsyncClient) -> None:
    name = unique("storable")
    await create_definition(
        client, name, {"inputs": {"o": {"type": "object"}}, "steps": [{"id": "a", "type": "noop"}]}
    )
    for body in (
        b'{"definition": "%s", "inputs": {"o": {"big": 123456789012345678901234567890}}}',
        b'{"definition": "%s", "inputs": {"o": {"nan": NaN}}}',
        b'{"definition": "%s", "inputs": {"o": {"s": "\\ud800"}}}',
        b'{"definition": "%s", "inputs": {"o": {"k\\u0000": 1}}}',
    ):
        response = await client.post("/v1/instances", content=body % name.encode(), headers=JSON)
        assert assert_problem(response, 422)["errors"][0]["path"].startswith("inputs.o")


async def test_bodies_over_one_mebibyte_are_413_problems(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    def too_large(response: httpx.Response) -> None:
        problem = assert_problem(response, 413)
        assert problem["type"] == "urn:paceline:problem:body-too-large"
        assert problem["detail"] == f"the request body is larger than {MAX_BODY_BYTES} bytes"

    big = b'{"name": "' + b"x" * MAX_BODY_BYTES + b'"}'
    paths = ("/v1/definitions", "/v1/instances", "/v1/instances/x/activities/a/resolve")
    for path in paths:  # declared by Content-Length: refused before the route reads it
        too_large(await client.post(path, content=big, headers=JSON))

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 65536

    for path in (*paths, f"/v1/instances/{uuid.uuid4()}/cancel"):
        too_large(await client.post(path, content=chunks(), headers=JSON))
    # A declared size over the limit is refused whatever the route, and before the token.
    too_large(await client.request("GET", "/v1/servers", content=big))
    too_large(await anon.post("/v1/definitions", content=big, headers=JSON))
    assert (await client.post("/v1/definitions", content=b" " * 1000 + b"{}")).status_code == 422


async def test_a_method_a_path_does_not_take_is_405_naming_every_one_it_takes(
    client: httpx.AsyncClient,
) -> None:
    for method, path, allowed in [
        ("OPTIONS", "/v1/instances", "GET, POST"),
        ("DELETE", "/v1/definitions", "GET, POST"),
        ("PUT", "/v1/servers/s-1", "DELETE"),
        ("GET", f"/v1/instances/{uuid.uuid4()}/cancel", "POST"),
        ("POST", "/healthz", "GET"),
    ]:
        response = await client.request(method, path)
        problem = assert_problem(response, 405)
        assert response.headers["Allow"] == allowed
        assert problem["type"] == "about:blank"
        assert allowed in problem["detail"]
