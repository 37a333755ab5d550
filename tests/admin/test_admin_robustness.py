"""Garbage in gets a 4xx problem out: no route answers 500 to a bad request."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from admin_support import assert_problem, create_definition, unique

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
    ],
)
async def test_garbage_bodies_get_a_4xx_problem(
    client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str]
) -> None:
    # The client raises on an app exception, so a crash fails this test too.
    response = await client.post(path, content=body, headers=headers)
    assert 400 <= response.status_code < 500, response.text
    assert_problem(response, response.status_code)


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


async def test_bodies_over_one_mebibyte_are_413(client: httpx.AsyncClient) -> None:
    big = b'{"name": "' + b"x" * (1024 * 1024) + b'"}'
    for path in ("/v1/definitions", "/v1/instances", "/v1/instances/x/activities/a/resolve"):
        assert_problem(await client.post(path, content=big, headers=JSON), 413)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 65536

    response = await client.post("/v1/definitions", content=chunks(), headers=JSON)
    assert_problem(response, 413)
    assert (await client.post("/v1/definitions", content=b" " * 1000 + b"{}")).status_code == 422
