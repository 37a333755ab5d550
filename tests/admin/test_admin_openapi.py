"""The API is exactly what its OpenAPI document says: schemathesis against the app, with every
check on.

The app is one of its own (`create_app` with the admin tests' settings: their PostgreSQL
database and RabbitMQ namespace), which schemathesis serves in-process through its ASGI
transport: it runs the app's lifespan on an event loop of its own, so the app cannot be the
session's (whose pool and broker connection belong to the tests' loop). Its lifespan is ended
when the module is done, so no second admin heartbeats during the other tests.

Every check is on (`[checks] enabled = true`: not_a_server_error, status_code_conformance,
content_type_conformance, response_headers_conformance, response_schema_conformance,
positive_data_acceptance, negative_data_rejection, missing_required_header, unsupported_method,
allow_header_conformance, ignored_auth (not max_response_time: no timing in tests), and in the
stateful test use_after_free and ensure_resource_availability), with the token of the principal
`admin` for the operations' security scheme. Each operation runs the examples, coverage and fuzzing
phases (positive and negative data), then sequences of calls run along the links schemathesis
infers; all with a bounded number of examples, so the file takes a little over a minute here
(2 shared cores), most of it in the coverage phase, whose cases the number does not change.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import hypothesis
import jsonschema_rs
import pytest
import schemathesis
from admin_support import TOKEN, assert_problem, create_definition, done, insert_instance, unique
from aio_pika.abc import AbstractChannel
from hypothesis import HealthCheck
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from paceline_admin.app import create_app
from paceline_admin.settings import AdminSettings

MAX_EXAMPLES = int(os.environ.get("PACELINE_OPENAPI_EXAMPLES", "25"))
"""Examples per operation and phase: enough to meet each kind of value, few enough for
`make test`. More, and another seed, explore further: `PACELINE_OPENAPI_EXAMPLES=200
PACELINE_OPENAPI_SEED=7 pytest tests/admin/test_admin_openapi.py`."""
SEED = int(os.environ.get("PACELINE_OPENAPI_SEED", "10"))

CONFIG = f"""
seed = {SEED}
# Hypothesis's health checks judge the generator, not the API: how much it filters (the
# definition schema's patterns and nesting) and how fast it runs (a shared, loaded machine).
suppress-health-check = ["filter_too_much", "too_slow", "data_too_large"]

[generation]
max-examples = {MAX_EXAMPLES}
# The same cases on every run with one seed: a failure is not a fluke of one run.
deterministic = true
# The examples database would replay a failure found once; nothing to keep between runs.
database = "none"

[checks]
enabled = true
# max_response_time stays off (it is off unless given a limit): timing is measured by
# `make bench`, never asserted by a test on a shared machine.

[checks.negative_data_rejection]
# The defaults, and 413: a body over 1 MiB (`body-too-large`) is refused before anything reads
# it, schema-violating or not; a schema cannot say how long a body may be (an array over its
# `maxItems` of steps, say, easily is).
expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"
]

[auth.openapi.AdminToken]
bearer = "{TOKEN}"
"""


@pytest.fixture(scope="module")
def api(settings: AdminSettings, broker: AbstractChannel) -> Iterator[schemathesis.BaseSchema]:
    app = create_app(settings)
    config = schemathesis.Config.from_str(CONFIG)
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    asgi.shutdown_lifespans()


schema = schemathesis.pytest.from_fixture("api")


@pytest.fixture(autouse=True)
def _node_id(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32.5 renames the test node per operation through `Node._nodeid`, which
    # pytest 9.2 no longer has (its id lives elsewhere): give it the attribute it reads.
    request.node._nodeid = request.node.nodeid


STATE_DEPENDENT = frozenset(
    f"urn:paceline:problem:{kind}"
    for kind in (
        "invalid-definition",
        "invalid-inputs",
        "idempotency-key-reused",
        "invalid-schedule",
        "invalid-backfill",
    )
)
"""422 problems that no schema of one request can foresee, as a 404 or a 409 cannot: inputs
that do not fit the stored definition the start names; an Idempotency-Key an earlier request
used for another request; a definition whose shape is right but whose content is not (step ids
unique across nested steps, the expression language, which earlier steps an expression may
read, the limits summed over nested steps, each activity type's parameters); a schedule's spec
and policy likewise (a cron expression croniter reads and some date matches, a zone of the
time-zone database, an offset or a jitter shorter than the interval; and its inputs, as a
start's); a backfill's window against the schedule's fire times and the database's clock."""


@schema.parametrize()
def test_the_api_is_what_its_schema_says(case: schemathesis.Case) -> None:
    response = case.call()
    case.validate_response(response, excluded_checks=_not_applicable(response))


def _not_applicable(response: schemathesis.Response) -> list[Any]:
    """`positive_data_acceptance` does not apply to the STATE_DEPENDENT answers. Schemathesis'
    docs give its expected statuses as 2xx, 401, 403, 404, 409, 5xx "to account for
    authentication requirements, missing resources, conflicts (e.g., duplicate entries), and
    downstream failures": what depends on the server's state rather than on the request; these
    422s are of that kind. Any other 422 to schema-valid data (`invalid-request`: the request
    breaks a rule the schema should have said) still fails it, and every other check runs on
    these answers too."""
    if response.status_code != 422:
        return []
    try:
        kind = response.json().get("type")
    except ValueError:
        return []
    return [positive_data_acceptance] if kind in STATE_DEPENDENT else []


def test_sequences_of_calls_keep_to_the_schema(api: schemathesis.BaseSchema) -> None:
    """The stateful phase: sequences of calls along the links schemathesis infers between
    operations (a created definition read back, an instance started from it, the server
    registry listed then drained or removed), each response checked as above, with the checks
    that span calls besides (`ensure_resource_availability`, `use_after_free`).

    The server is real, so a replayed sequence may meet other answers than its first run (an id
    the database gave, a definition that now exists): the values a link carries, and so the
    drawing, differ, and Hypothesis stops with `FlakyStrategyDefinition`. That says nothing of
    the API; schemathesis' own runner counts it a pass unless a check failed in the suite
    (`engine/run/stateful/_executor.py`, `_classify_flaky`), and so does this test: a check that
    failed before the replay is raised, and the responses checked must be many."""
    checked: list[int] = []
    failed: list[Exception] = []

    class Workflow(api.as_state_machine()):  # type: ignore[misc]
        def validate_response(
            self,
            response: schemathesis.Response,
            case: schemathesis.Case,
            additional_checks: Any = None,
            **kwargs: Any,
        ) -> None:
            checked.append(response.status_code)
            try:
                case.validate_response(
                    response,
                    additional_checks=additional_checks,
                    excluded_checks=_not_applicable(response),
                    transport_kwargs=kwargs or None,
                    recorder=self.recorder,
                )
            except Exception as failure:
                failed.append(failure)
                raise

    try:
        _run_workflow(Workflow)
    except hypothesis.errors.FlakyStrategyDefinition:
        if failed:
            raise failed[0] from None
    assert len(checked) >= MAX_EXAMPLES, f"only {len(checked)} responses checked"


def _run_workflow(workflow: Any) -> None:
    workflow.run(
        settings=hypothesis.settings(
            max_examples=MAX_EXAMPLES * 2,
            stateful_step_count=8,
            derandomize=True,
            database=None,
            deadline=None,
            # Hypothesis' own health checks, not checks of the API: links whose values do not
            # fit the next call are drawn and thrown away, as schemathesis' runner allows.
            suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
        )
    )


# --- what the document says, kind by kind ----------------------------------------------------

CLOSED_SETS = {"status", "kind", "outcome", "paused"}
"""Query parameters whose values come from a closed set."""


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def _alternatives(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]


async def test_every_closed_set_has_an_enum_and_every_cursor_a_pattern(
    anon: httpx.AsyncClient,
) -> None:
    document = (await anon.get("/openapi.json")).json()
    closed, cursors = [], []
    for label, operation in _operations(document):
        for parameter in operation.get("parameters", []):
            schemas = _alternatives(parameter["schema"])
            if parameter["name"] in CLOSED_SETS:
                if schemas[0].get("type") == "array":
                    schemas = schemas[0]["items"]["anyOf"]
                enums = [s["enum"] for s in schemas if "enum" in s]
                assert len(enums) == 1 and enums[0], label
                closed.append(label)
            if parameter["name"] == "cursor":
                (cursor,) = schemas
                assert cursor["pattern"].startswith("^") and cursor["pattern"].endswith("$")
                cursors.append(label)
    # instances, activities, approvals, servers' kind and status, schedules' paused, the ledger
    assert len(closed) == 7
    assert len(cursors) == 8


async def test_every_field_of_a_request_body_is_typed(anon: httpx.AsyncClient) -> None:
    document = (await anon.get("/openapi.json")).json()
    components = document["components"]["schemas"]

    def typed(schema: dict[str, Any]) -> bool:
        return bool({"type", "$ref", "anyOf", "oneOf", "const", "enum"} & schema.keys())

    def fields(schema: dict[str, Any], seen: set[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            if name not in seen:
                seen.add(name)
                yield from fields(components[name], seen)
            return
        for key in ("anyOf", "oneOf"):
            for alternative in schema.get(key, []):
                yield from fields(alternative, seen)
        for name, field in schema.get("properties", {}).items():
            yield name, field
            yield from fields(field, seen)
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                yield from fields(schema[key], seen)

    bodies = 0
    for label, operation in _operations(document):
        for media in operation.get("requestBody", {}).get("content", {}).values():
            bodies += 1
            for name, field in fields(media["schema"], set()):
                assert typed(field), f"{label}: {name} has no type"
    assert bodies >= 6
    definition = components["Definition"]["properties"]
    assert definition["name"]["type"] == "string" and definition["name"]["pattern"]
    assert definition["steps"]["type"] == "array" and definition["steps"]["items"]
    resolve = components["ResolveRequest"]["oneOf"]
    assert {shape["title"]: sorted(shape["properties"]) for shape in resolve} == {
        "retry": ["action", "force"],
        "skip": ["action", "output"],
        "fail": ["action"],
    }


async def test_a_cursor_of_the_published_form_is_a_position(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """Every cursor that fits its pattern is accepted: a position before or after every item
    (the page after it), whether or not this API gave it out; any other is a 422."""
    name = unique("cursors")
    await create_definition(client, name)
    instance_id, _ = await insert_instance(pool, name, {"a": done()})
    start, end = "0." + "0" * 32, "9" * 16 + "." + "f" * 32
    lists: list[tuple[str, str, str]] = [
        ("/v1/definitions", "!", "\U0010ffff"),  # a name: any text but NUL
        ("/v1/instances", end, start),  # newest first
        ("/v1/approvals", start, end),
        ("/v1/flags", f"{start}.a", f"{end}.z"),
        (f"/v1/instances/{instance_id}/activities", "0.a", "9999999999.a"),
        (f"/v1/instances/{instance_id}/history", "0", "9" * 18),
    ]
    for path, before, after in lists:
        for cursor in (before, after):
            response = await client.get(path, params={"cursor": cursor})
            assert response.status_code == 200, (path, cursor, response.text)
        if path != "/v1/definitions":  # where a text sorts is the database collation's
            assert (await client.get(path, params={"cursor": after})).json()["items"] == []
        for bad in ("", "a\x00", "x" * 1025, "W10"):
            if bad == "W10" and path == "/v1/definitions":
                continue  # a name
            problem = assert_problem(await client.get(path, params={"cursor": bad}), 422)
            assert [e["path"] for e in problem["errors"]] == ["query.cursor"], (path, bad)


async def test_a_filter_takes_its_values_in_any_case_and_nothing_else(
    client: httpx.AsyncClient,
) -> None:
    for params in ({"status": "running,Failed"}, {"status": ["PENDING", "completed"]}):
        assert (await client.get("/v1/instances", params=params)).status_code == 200
    assert (await client.get("/v1/approvals", params={"status": "pending"})).status_code == 200
    assert (await client.get("/v1/servers", params={"kind": "Activity-Worker"})).status_code == 200
    for path, params in [
        ("/v1/instances", {"status": "RUNNING, FAILED"}),
        ("/v1/instances", {"status": "RUNNING,"}),
        ("/v1/instances", {"status": ""}),
        ("/v1/instances", {"status": "runn\u0131ng"}),  # a dotless i: its upper case is I
        ("/v1/approvals", {"status": "PENDING,DECIDED"}),  # one value only
        ("/v1/servers", {"kind": "admin "}),
    ]:
        problem = assert_problem(await client.get(path, params=params), 422)
        assert problem["errors"][0]["path"] in ("query.status", "query.kind"), (path, params)


async def test_every_documented_definition_fits_the_definition_schema(
    anon: httpx.AsyncClient,
) -> None:
    """The `Definition` schema is no stricter than the reference: each valid example of
    docs/definitions.md (the blocks marked `<!-- definition -->`) fits it."""
    document = (await anon.get("/openapi.json")).json()
    components = json.loads(
        json.dumps(document["components"]["schemas"]).replace("#/components/schemas/", "#/$defs/")
    )
    validator = jsonschema_rs.validator_for({"$defs": components, "$ref": "#/$defs/Definition"})
    text = (Path(__file__).resolve().parents[2] / "docs" / "definitions.md").read_text()
    blocks = re.findall(
        r"^<!-- definition -->\n```json\n(.*?)^```$", text, re.MULTILINE | re.DOTALL
    )
    assert len(blocks) >= 5
    for block in blocks:
        errors = [str(e) for e in validator.iter_errors(json.loads(block))]
        assert errors == [], block
