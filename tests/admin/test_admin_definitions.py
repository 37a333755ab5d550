"""Creating, versioning, validating, listing and reading process definitions."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import yaml
from admin_support import SIMPLE, assert_problem, create_definition, unique

from paceline_admin import definitions as definition_routes
from paceline_admin.settings import MAX_BODY_BYTES
from paceline_engine.definitions import (
    MAX_BRANCHES,
    MAX_EXPRESSION_LENGTH,
    MAX_NESTING_DEPTH,
    MAX_STEPS,
)

YAML_DEFINITION = """
name: {name}
inputs:
  host: {{type: string}}
  when: {{type: string, default: 2024-01-01}}
steps:
  - id: lookup
    type: http.request
    with: {{method: GET, url: "http://127.0.0.1:9000/devices/${{inputs.host}}"}}
  - id: known
    if: steps.lookup.output.status == 200
    then: [{{id: note, type: noop, with: {{msg: already there}}}}]
    else: [{{id: add, type: noop, with: {{x: "${{inputs.host}}"}}}}]
"""


async def test_create_from_json_stores_version_1(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = unique("json")
    response = await client.post("/v1/definitions", json={"name": name, **SIMPLE})
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["name"] == name
    assert created["version"] == 1
    assert created["definition"] == {"name": name, **SIMPLE}
    assert created["created_at"]
    assert response.headers["location"] == f"/v1/definitions/{name}/versions/1"
    stored = await pool.fetchval(
        "SELECT body FROM definitions WHERE name = $1 AND version = 1", name
    )
    assert stored == {"name": name, **SIMPLE}


async def test_create_from_yaml(client: httpx.AsyncClient) -> None:
    name = unique("yaml")
    for content_type in ("application/yaml", "text/yaml; charset=utf-8"):
        response = await client.post(
            "/v1/definitions",
            content=YAML_DEFINITION.format(name=name).encode(),
            headers={"Content-Type": content_type},
        )
        assert response.status_code == 201, response.text
    created = response.json()
    assert created["version"] == 2
    assert created["definition"]["steps"][1]["then"][0]["with"] == {"msg": "already there"}
    # YAML reads an unquoted date as a date; it is stored as the JSON string it looks like.
    assert created["definition"]["inputs"]["when"]["default"] == "2024-01-01"


async def test_each_create_is_the_next_version(client: httpx.AsyncClient) -> None:
    name = unique("versions")
    assert (await create_definition(client, name))["version"] == 1
    assert (await create_definition(client, name))["version"] == 2
    detail = (await client.get(f"/v1/definitions/{name}")).json()
    assert detail["name"] == name
    assert detail["latest"] == 2
    assert [v["version"] for v in detail["versions"]] == [1, 2]
    one = await client.get(f"/v1/definitions/{name}/versions/1")
    assert one.status_code == 200
    assert one.json()["definition"]["name"] == name


async def test_concurrent_creates_get_distinct_versions(client: httpx.AsyncClient) -> None:
    name = unique("race")
    responses = await asyncio.gather(
        *(client.post("/v1/definitions", json={"name": name, **SIMPLE}) for _ in range(8))
    )
    assert [r.status_code for r in responses] == [201] * 8
    assert sorted(r.json()["version"] for r in responses) == list(range(1, 9))


async def test_an_invalid_definition_lists_every_problem(client: httpx.AsyncClient) -> None:
    definition: dict[str, Any] = {
        "name": unique("bad"),
        "steps": [
            {"id": "a", "type": "no.such.type"},
            {"id": "a", "type": "noop"},
            {"id": "b", "type": "noop", "with": {"x": "${steps.c.output}"}},
            {"id": "c", "type": "noop"},
            {"id": "d", "if": "1 +* 2", "then": []},
        ],
    }
    response = await client.post("/v1/definitions", json=definition)
    problem = assert_problem(response, 422)
    paths = {e["path"]: e["message"] for e in problem["errors"]}
    assert "no.such.type" in paths["steps[0].type"]  # unknown type
    assert "duplicate" in paths["steps[1].id"]  # duplicate id
    assert "'c'" in paths["steps[2].with.x"]  # reads a later step
    assert "steps[4].if" in paths  # not an expression
    assert len(problem["errors"]) == 4
    assert problem["type"].endswith("invalid-definition")
    listed = (await client.get(f"/v1/definitions/{definition['name']}")).status_code
    assert listed == 404  # nothing was stored


async def test_invalid_yaml_and_json_are_400(client: httpx.AsyncClient) -> None:
    bad_yaml = await client.post(
        "/v1/definitions", content=b"name: [unclosed", headers={"Content-Type": "text/yaml"}
    )
    assert "YAML" in assert_problem(bad_yaml, 400)["detail"]
    bad_json = await client.post(
        "/v1/definitions", content=b'{"name": ', headers={"Content-Type": "application/json"}
    )
    assert "JSON" in assert_problem(bad_json, 400)["detail"]
    other = await client.post(
        "/v1/definitions", content=b"<xml/>", headers={"Content-Type": "application/xml"}
    )
    assert_problem(other, 415)


async def test_yaml_that_is_not_json_is_refused_with_each_problem(
    client: httpx.AsyncClient,
) -> None:
    document = {
        "name": unique("odd"),
        "steps": [{"id": "a", "type": "noop", "with": {1: "int key", "x": float("nan")}}],
    }
    response = await client.post(
        "/v1/definitions",
        content=yaml.safe_dump(document).encode(),
        headers={"Content-Type": "application/yaml"},
    )
    problem = assert_problem(response, 422)
    assert {e["path"] for e in problem["errors"]} == {"steps[0].with", "steps[0].with.x"}


async def test_an_alias_bomb_is_refused_quickly(client: httpx.AsyncClient) -> None:
    bomb = 'a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]\n'
    for i in range(1, 10):
        bomb += f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]\n"
    response = await client.post(
        "/v1/definitions", content=bomb.encode(), headers={"Content-Type": "application/yaml"}
    )
    assert "more than" in assert_problem(response, 422)["errors"][0]["message"]


async def test_list_shows_the_latest_of_each_name_a_page_at_a_time(
    client: httpx.AsyncClient,
) -> None:
    prefix = unique("page")
    names = [f"{prefix}-{i}" for i in range(5)]
    for name in names:
        await create_definition(client, name)
    await create_definition(client, names[2])
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/definitions", params=params)).json()
        assert len(page["items"]) <= 2
        seen.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    ours = [item for item in seen if item["name"].startswith(prefix)]
    assert [item["name"] for item in ours] == names  # by name, each once
    assert [(item["version"], item["versions"]) for item in ours][2] == (2, 2)
    assert [item["name"] for item in seen] == sorted(item["name"] for item in seen)


async def test_unknown_definitions_and_versions_are_404(client: httpx.AsyncClient) -> None:
    name = unique("known")
    await create_definition(client, name)
    assert_problem(await client.get(f"/v1/definitions/{unique('unknown')}"), 404)
    assert_problem(await client.get(f"/v1/definitions/{name}/versions/2"), 404)
    assert_problem(await client.get(f"/v1/definitions/{name}/versions/99999999999"), 422)
    for cursor in ("nul\x00", "x" * 1025):  # a name's cursor is the last name: any other text
        bad_cursor = assert_problem(
            await client.get("/v1/definitions", params={"cursor": cursor}), 422
        )
        assert [e["path"] for e in bad_cursor["errors"]] == ["query.cursor"]
    assert_problem(await client.get("/v1/definitions", params={"limit": 501}), 422)


# --- limits (README, "Process definitions", Limits) ------------------------------------------


def noop(step_id: str, **params: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "noop", "with": params}


def wide(branches: int) -> dict[str, Any]:
    return {"id": "wide", "parallel": [[noop(f"b{i}")] for i in range(branches)]}


def nested(depth: int) -> dict[str, Any]:
    """A noop inside `depth` parallel steps: the deepest JSON a nesting level takes."""
    step = noop("leaf", x={"y": 1})
    for level in reversed(range(depth)):
        step = {"id": f"n{level}", "parallel": [[step]]}
    return step


def condition(length: int) -> dict[str, Any]:
    """A condition whose `if` has `length` characters, then one activity (2 steps)."""
    expression = "inputs.x == '" + "a" * (length - 14) + "'"
    return {"id": "cond", "if": expression, "then": [noop("then1")]}


def at_the_limits(name: str, over: int = 0) -> dict[str, Any]:
    """MAX_STEPS steps (over: more of each), with a parallel step of MAX_BRANCHES branches, a
    step nested MAX_NESTING_DEPTH deep and expressions of MAX_EXPRESSION_LENGTH characters."""
    special = [
        wide(MAX_BRANCHES + over),
        nested(MAX_NESTING_DEPTH + over),
        condition(MAX_EXPRESSION_LENGTH + over),
    ]
    count = (MAX_BRANCHES + over + 1) + (MAX_NESTING_DEPTH + over + 1) + 2
    filler = [noop(f"s{i}") for i in range(MAX_STEPS - count - 1 + over)]
    reads = "${inputs.x + '" + "a" * (MAX_EXPRESSION_LENGTH + over - 13) + "'}"
    last = noop("last", x=reads)
    return {"name": name, "inputs": {"x": {"type": "string"}}, "steps": [*special, *filler, last]}


async def test_a_definition_at_every_limit_is_accepted(client: httpx.AsyncClient) -> None:
    definition = at_the_limits(unique("limits"))
    body = orjson.dumps(definition)
    assert len(body) < MAX_BODY_BYTES  # the limits fit in a request
    response = await client.post(
        "/v1/definitions", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 201, response.text[:2000]
    created = response.json()
    assert created["definition"] == definition
    stored = await client.get(f"/v1/definitions/{definition['name']}/versions/1")
    assert stored.json() == created  # the same answer, created_at written the same way


@pytest.mark.parametrize(
    ("definition", "path", "limit", "actual"),
    [
        ({"steps": [noop(f"s{i}") for i in range(MAX_STEPS + 1)]}, "steps", "10000", "10001"),
        ({"steps": [noop("a"), wide(MAX_BRANCHES + 1)]}, "steps[1].parallel", "1000", "1001"),
        ({"steps": [nested(MAX_NESTING_DEPTH + 1)]}, "steps[0].", "16", "17"),
        ({"steps": [condition(1_234)]}, "steps[0].if", "1000", "1234"),
        (
            {"steps": [noop("a", x={"y": ["${" + "1 + " * 300 + "1}"]})]},
            "steps[0].with.x.y[0]",
            "1000",
            "1201",
        ),
    ],
    ids=["steps", "branches", "nesting", "if", "with"],
)
async def test_a_definition_over_a_limit_is_refused_naming_it(
    client: httpx.AsyncClient, definition: dict[str, Any], path: str, limit: str, actual: str
) -> None:
    document = {"name": unique("over"), "inputs": {"x": {"type": "string"}}, **definition}
    problem = assert_problem(await client.post("/v1/definitions", json=document), 422)
    assert problem["type"].endswith("invalid-definition")
    (error,) = problem["errors"]
    assert error["path"].startswith(path)
    assert f"{actual} " in error["message"]
    assert f"limit is {limit} " in error["message"] or f"depth of {limit}" in error["message"]
    assert error["message"] in problem["detail"]


async def test_every_limit_exceeded_is_listed_with_the_other_problems(
    client: httpx.AsyncClient,
) -> None:
    definition = at_the_limits(unique("over"), over=1)
    definition["steps"].append({"id": "odd", "type": "telepathy"})
    problem = assert_problem(await client.post("/v1/definitions", json=definition), 422)
    errors = {e["path"]: e["message"] for e in problem["errors"]}
    assert len(errors) == 6, errors
    assert "10002 steps" in errors["steps"]  # one more than the limit, and the odd one
    assert "1001 branches" in errors["steps[0].parallel"]
    assert "1001 characters" in errors["steps[2].if"]
    assert "1001 characters" in errors[f"steps[{len(definition['steps']) - 2}].with.x"]
    assert "unknown activity type" in errors[f"steps[{len(definition['steps']) - 1}].type"]
    assert any("nested 17 deep" in message for message in errors.values())
    assert problem["detail"].startswith("6 problems in the definition")


async def test_healthz_answers_while_a_large_definition_is_validated(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ordering, not timing: validation (real work, on a definition of 2,000 steps) goes on,
    round after round, until /healthz has answered. Were it run on the event loop, /healthz
    could not answer until the rounds ran out (at 200), after the create."""
    validate = definition_routes.validate
    started, answered = threading.Event(), threading.Event()
    rounds = 0

    def busy(raw: Any) -> Any:
        nonlocal rounds
        started.set()
        while True:
            result = validate(raw)
            rounds += 1
            if answered.is_set() or rounds >= 200:
                return result

    monkeypatch.setattr(definition_routes, "validate", busy)
    steps = [noop("s0")] + [noop(f"s{i}", x=f"${{steps.s{i - 1}.output}}") for i in range(1, 2000)]
    create = asyncio.create_task(
        client.post("/v1/definitions", json={"name": unique("busy"), "steps": steps})
    )
    while not started.is_set():
        await asyncio.sleep(0.001)
    health = await anon.get("/healthz")
    validating = not create.done()
    answered.set()
    assert health.status_code == 200
    assert validating, f"the create ended first, after {rounds} validations"
    assert (await create).status_code == 201
    assert rounds < 200


async def test_what_the_schema_refuses_the_parser_is_made_to_refuse(
    client: httpx.AsyncClient,
) -> None:
    """The published schema's few rules the engine's parser does not check itself, and a type
    the parser would crash on, are 422 problems at their place like any other."""
    name = unique("shape")
    definition: dict[str, Any] = {
        "name": name + "\n",
        "description": 5,
        "inputs": {"x\n": {"type": "string"}, "y": {"type": "string", "description": []}},
        "steps": [
            {"id": "a\n", "type": ["noop"]},
            {"id": "b", "type": {"noop": 1}, "description": None},
            {"id": "c", "if": "true", "then": [{"id": "d\n", "type": "noop"}]},
            {"id": "e", "wait": {"signal": "go\n", "timeout": "none"}},
        ],
    }
    problem = assert_problem(await client.post("/v1/definitions", json=definition), 422)
    assert problem["type"].endswith("invalid-definition")
    errors = {e["path"]: e["message"] for e in problem["errors"]}
    assert errors == {
        "name": "must not end with a line break",
        "description": "a string",
        "inputs.x\n": "must not end with a line break",
        "inputs.y.description": "a string",
        "steps[0].id": "must not end with a line break",
        "steps[0].type": errors["steps[0].type"],
        "steps[1].type": errors["steps[1].type"],
        "steps[1].description": "a string",
        "steps[2].then[0].id": "must not end with a line break",
        "steps[3].wait.signal": "must not end with a line break",
    }
    assert "unknown activity type" in errors["steps[0].type"]
    assert '["noop"]' in errors["steps[0].type"]
    assert (await client.get(f"/v1/definitions/{name}")).status_code == 404


@pytest.mark.parametrize(
    "value",
    [-9223372036854775809, 9223372036854775808, 1e20, -1e300],
    ids=["below int64", "above int64", "1e20", "-1e300"],
)
async def test_a_whole_number_past_64_bits_is_refused_however_written(
    client: httpx.AsyncClient, value: int | float
) -> None:
    definition = {"name": unique("big"), "steps": [noop("a", n=value)]}
    problem = assert_problem(await client.post("/v1/definitions", json=definition), 422)
    assert problem["errors"] == [
        {"path": "steps[0].with.n", "message": "an integer outside the 64-bit range"}
    ]
