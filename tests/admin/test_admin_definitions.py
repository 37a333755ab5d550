"""Creating, versioning, validating, listing and reading process definitions."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
import yaml
from admin_support import SIMPLE, assert_problem, create_definition, unique

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
    assert_problem(await client.get("/v1/definitions", params={"cursor": "garbage!"}), 422)
    assert_problem(await client.get("/v1/definitions", params={"limit": 501}), 422)
