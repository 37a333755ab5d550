"""Schedules through the admin API (issue 11): create, read, list, change, delete, pause, resume,
trigger, backfill and the fire ledger.

No scheduler runs here: what is checked is what the API writes (the schedule's row, as the
scheduler reads it; the ledger rows, instances and start commands of a trigger or a backfill).
Times are compared with the database's clock, which every due time is written in."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from admin_support import (
    AUTH,
    as_principal,
    assert_problem,
    body_of,
    create_definition,
    drain,
    unique,
)
from aio_pika.abc import AbstractQueue

from paceline_admin.app import create_app
from paceline_admin.settings import AdminSettings
from paceline_engine.schedule_spec import ScheduleSpec, fire_times
from paceline_engine.schedules import due_at

HOURLY = {"interval": "1h"}
SIMPLE_INPUTS = {"host": "db-1"}


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def db_now(pool: asyncpg.Pool) -> datetime:
    value: datetime = await pool.fetchval("SELECT clock_timestamp()")
    return value


async def definition(client: httpx.AsyncClient, body: dict[str, Any] | None = None) -> str:
    """A definition of admin_support.SIMPLE (`host` required, `count` defaults to 1)."""
    name = unique("sched")
    await create_definition(client, name, body)
    return name


def schedule(definition: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": unique("s"),
        "definition": definition,
        "inputs": SIMPLE_INPUTS,
        "spec": HOURLY,
        **fields,
    }


async def create(client: httpx.AsyncClient, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    created = await client.post("/v1/schedules", json=body, **kwargs)
    assert created.status_code == 201, created.text
    view: dict[str, Any] = created.json()
    return view


async def row_of(pool: asyncpg.Pool, schedule_id: str) -> asyncpg.Record:
    row: asyncpg.Record = await pool.fetchrow("SELECT * FROM schedules WHERE id = $1", schedule_id)
    return row


async def ledger(pool: asyncpg.Pool, schedule_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT * FROM schedule_fires WHERE schedule_id = $1 ORDER BY nominal_at", schedule_id
    )
    return rows


async def instances_of(pool: asyncpg.Pool, schedule_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT * FROM instances WHERE started_by = $1 ORDER BY created_at, id",
        f"schedule:{schedule_id}",
    )
    return rows


# --- create and read ---------------------------------------------------------------------------


async def test_a_created_schedule_is_stored_and_fires_only_after_its_creation(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    body = {
        "id": unique("nightly-audit"),
        "definition": name,
        "version": None,
        "inputs": {"host": "par1"},
        "spec": {
            "cron": "0 2 * * *",
            "timezone": "Europe/Paris",
            "start_at": None,
            "end_at": None,
            "jitter": "0s",
        },
        "policy": {
            "catchup": "latest",
            "catchup_window": "6h",
            "max_catchup": 10,
            "overlap": "skip",
        },
        "paused": False,
        "note": "owner: netops",
    }
    before = await db_now(pool)
    answer = await client.post("/v1/schedules", json=body, headers=as_principal("alice"))
    after = await db_now(pool)
    assert answer.status_code == 201, answer.text
    assert answer.headers["location"] == f"/v1/schedules/{body['id']}"
    view = answer.json()
    assert (view["id"], view["definition"], view["version"], view["inputs"], view["note"]) == (
        body["id"],
        name,
        None,
        {"host": "par1"},
        "owner: netops",
    )
    assert view["created_by"] == "alice"
    assert view["spec"] == {**body["spec"], "interval": None, "offset": None}
    assert view["policy"] == {**body["policy"], "max_buffered": 100}
    assert (view["paused"], view["paused_at"], view["pause_note"], view["resume_catchup"]) == (
        False,
        None,
        None,
        None,
    )
    assert view["revision"] == 1 and view["buffered"] == 0
    created = at(view["last_nominal_at"])
    assert before <= created <= after
    assert at(view["created_at"]) == at(view["updated_at"]) == created

    # The next five nights at 02:00 in Paris, all after the creation; the first is the next due.
    paris = ZoneInfo("Europe/Paris")
    nominal = [at(f["nominal_at"]) for f in view["next_fires"]]
    assert len(nominal) == 5
    assert all(n.astimezone(paris).time().isoformat() == "02:00:00" for n in nominal)
    assert nominal == sorted(nominal) and nominal[0] > created
    assert nominal[0] - created <= timedelta(days=1)
    assert all(at(f["due_at"]) == at(f["nominal_at"]) for f in view["next_fires"])  # no jitter
    assert at(view["next_due_at"]) == nominal[0]

    assert view["last_fire"] is None
    assert view["counts"] == {
        "STARTED": 0,
        "SKIPPED_OVERLAP": 0,
        "SKIPPED_MISSED": 0,
        "SKIPPED_PAUSED": 0,
        "BUFFERED": 0,
        "START_FAILED": 0,
    }
    assert view["counts_exact"] is True
    assert (view["running"], view["running_count"]) == ([], 0)

    # The row as a scheduler reads it.
    row = await row_of(pool, body["id"])
    assert row["last_nominal_at"] == created
    assert row["next_due_at"] == nominal[0]
    assert (row["paused"], row["paused_at"], row["resume_catchup"]) == (False, None, None)
    assert ScheduleSpec.model_validate(row["spec"]).cron == "0 2 * * *"
    assert row["created_by"] == "alice"
    assert (await client.get(f"/v1/schedules/{body['id']}")).json() == view


async def test_an_interval_with_jitter_is_due_by_the_engines_rule(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    body = schedule(name, spec={"interval": 900, "offset": "5m", "jitter": "30s"})
    view = await create(client, body)
    spec = ScheduleSpec(interval=900, offset="5m", jitter="30s")
    expected = fire_times(spec, at(view["last_nominal_at"]), 5)
    assert [at(f["nominal_at"]) for f in view["next_fires"]] == expected
    assert [at(f["due_at"]) for f in view["next_fires"]] == [
        due_at(spec, body["id"], n) for n in expected
    ]
    assert any(at(f["due_at"]) != at(f["nominal_at"]) for f in view["next_fires"])
    assert (await row_of(pool, body["id"]))["next_due_at"] == due_at(spec, body["id"], expected[0])
    assert all(n.minute % 15 == 5 for n in expected)


async def test_a_schedule_created_paused_is_not_due(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name, paused=True))
    assert view["paused"] is True
    assert view["next_due_at"] is None
    assert view["paused_at"] == view["last_nominal_at"]
    assert len(view["next_fires"]) == 5  # shown, though none fires while paused
    row = await row_of(pool, view["id"])
    assert (row["paused"], row["next_due_at"]) == (True, None)
    assert row["paused_at"] == row["last_nominal_at"]


async def test_a_schedule_past_its_end_has_no_next_fire(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(
        client, schedule(name, spec={"interval": "1h", "end_at": "2020-01-01T00:00:00Z"})
    )
    assert (view["next_due_at"], view["next_fires"]) == (None, [])


# --- what a create refuses -------------------------------------------------------------------


async def test_every_problem_of_spec_policy_and_inputs_is_listed_in_one_422(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    body = schedule(
        name,
        inputs={"count": "three", "colour": "red"},  # host missing, count not an integer
        spec={"cron": "61 * * * *", "timezone": "Mars/Olympus_Mons", "offset": "5m"},
        policy={"catchup_window": "0s"},
    )
    problem = assert_problem(await client.post("/v1/schedules", json=body), 422)
    assert problem["type"] == "urn:paceline:problem:invalid-schedule"
    paths = sorted(e["path"] for e in problem["errors"])
    assert paths == [
        "inputs.colour",
        "inputs.count",
        "inputs.host",
        "policy.catchup_window",
        "spec.cron",
        "spec.offset",
        "spec.timezone",
    ], problem
    messages = {e["path"]: e["message"] for e in problem["errors"]}
    assert "Mars/Olympus_Mons" in messages["spec.timezone"]
    assert "61 * * * *" in messages["spec.cron"]
    assert messages["policy.catchup_window"] == "more than zero"
    assert messages["inputs.host"] == "required"
    assert "7 problems" in problem["detail"]
    assert await pool.fetchval("SELECT count(*) FROM schedules WHERE id = $1", body["id"]) == 0


@pytest.mark.parametrize(
    ("spec", "paths"),
    [
        ({"cron": "0 2 * * *", "interval": "1h"}, ["spec"]),
        ({}, ["spec"]),
        ({"interval": "40d"}, ["spec.interval"]),
        ({"interval": "0.5s"}, ["spec.interval"]),
        ({"interval": "1h", "offset": "2h", "jitter": "1h"}, ["spec.jitter", "spec.offset"]),
        ({"cron": "0 0 30 2 *"}, ["spec.cron"]),
        (
            {
                "interval": "1h",
                "start_at": "2031-01-01T00:00:00Z",
                "end_at": "2030-01-01T00:00:00+01:00",
            },
            ["spec.end_at"],
        ),
    ],
)
async def test_a_spec_the_engine_refuses_is_422_at_its_fields(
    client: httpx.AsyncClient, spec: dict[str, Any], paths: list[str]
) -> None:
    name = await definition(client)
    problem = assert_problem(
        await client.post("/v1/schedules", json=schedule(name, spec=spec)), 422
    )
    assert problem["type"] == "urn:paceline:problem:invalid-schedule"
    assert sorted(e["path"] for e in problem["errors"]) == paths, problem


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"id": "-starts-with-a-dash"}, "id"),
        ({"id": "x" * 129}, "id"),
        ({"colour": "red"}, "colour"),
        ({"version": "1"}, "version"),
        ({"paused": "yes"}, "paused"),
        ({"note": "n" * 1001}, "note"),
        ({"spec": {"interval": "1 hour"}}, "spec.interval"),
        ({"spec": {"interval": "1h", "start_at": "2030-02-30T00:00:00Z"}}, "spec.start_at"),
        ({"spec": {"interval": "1h", "start_at": "2030-01-01T00:00:00"}}, "spec.start_at"),
        ({"spec": {"cron": "0 2 * * *; rm"}}, "spec.cron"),
        ({"policy": {"catchup": "some"}}, "policy.catchup"),
        ({"policy": {"max_catchup": 0}}, "policy.max_catchup"),
        ({"policy": {"overlap": "queue"}}, "policy.overlap"),
    ],
)
async def test_a_body_that_does_not_fit_the_schema_is_an_invalid_request(
    client: httpx.AsyncClient, change: dict[str, Any], path: str
) -> None:
    body = {**schedule("any"), **change}
    problem = assert_problem(await client.post("/v1/schedules", json=body), 422)
    assert problem["type"] == "urn:paceline:problem:invalid-request"
    assert path in [e["path"] for e in problem["errors"]], problem


async def test_an_unknown_definition_or_version_is_404(client: httpx.AsyncClient) -> None:
    problem = assert_problem(
        await client.post("/v1/schedules", json=schedule(unique("nowhere"))), 404
    )
    assert problem["type"] == "urn:paceline:problem:unknown-definition"
    name = await definition(client)
    problem = assert_problem(
        await client.post("/v1/schedules", json=schedule(name, version=2)), 404
    )
    assert problem["type"] == "urn:paceline:problem:unknown-definition"
    assert "version 2" in problem["detail"]
    await create(client, schedule(name, version=1))


async def test_an_id_taken_is_409(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    name = await definition(client)
    body = schedule(name)
    await create(client, body)
    again = {**body, "note": "another"}
    problem = assert_problem(await client.post("/v1/schedules", json=again), 409)
    assert problem["type"] == "urn:paceline:problem:schedule-exists"
    assert (await row_of(pool, body["id"]))["note"] is None


async def test_a_create_retried_with_its_idempotency_key_answers_as_the_first(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    body = schedule(name)
    key = {"Idempotency-Key": unique("create")}
    first = await client.post("/v1/schedules", json=body, headers=key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    retry = await client.post("/v1/schedules", json=body, headers=key)
    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["location"] == f"/v1/schedules/{body['id']}"
    assert retry.json() == first.json()
    # Defaults spelt out are the same request.
    spelt = {**body, "paused": False, "version": None, "note": None, "policy": {}}
    assert (await client.post("/v1/schedules", json=spelt, headers=key)).status_code == 201
    assert await pool.fetchval("SELECT count(*) FROM schedules WHERE id = $1", body["id"]) == 1

    other = {**body, "inputs": {"host": "db-2"}}
    problem = assert_problem(await client.post("/v1/schedules", json=other, headers=key), 422)
    assert problem["type"] == "urn:paceline:problem:idempotency-key-reused"
    assert (await row_of(pool, body["id"]))["inputs"] == SIMPLE_INPUTS


async def test_concurrent_creates_with_one_key_create_one_schedule(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    body = schedule(name)
    key = {"Idempotency-Key": unique("race")}
    answers = await asyncio.gather(
        *(client.post("/v1/schedules", json=body, headers=key) for _ in range(4))
    )
    assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 3
    assert await pool.fetchval("SELECT count(*) FROM schedules WHERE id = $1", body["id"]) == 1


# --- list ---------------------------------------------------------------------------------------


async def test_the_list_pages_by_id_and_filters(client: httpx.AsyncClient) -> None:
    name = await definition(client)
    prefix = unique("list")
    ids = [f"{prefix}-{i}" for i in range(5)]
    for i, schedule_id in enumerate(ids):
        await create(client, schedule(name, id=schedule_id, paused=i % 2 == 1))
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params: dict[str, Any] = {"definition": name, "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/v1/schedules", params=params)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    item = page["items"][-1]
    assert set(item) == {
        "id", "definition", "version", "spec", "paused", "note", "last_nominal_at",
        "next_due_at", "buffered", "created_by", "created_at", "updated_at", "revision",
    }  # fmt: skip
    paused = await client.get("/v1/schedules", params={"definition": name, "paused": "TRUE"})
    assert [i["id"] for i in paused.json()["items"]] == [ids[1], ids[3]]
    running = await client.get("/v1/schedules", params={"definition": name, "paused": "false"})
    assert [i["id"] for i in running.json()["items"]] == [ids[0], ids[2], ids[4]]
    after_all = await client.get("/v1/schedules", params={"definition": name, "cursor": ids[-1]})
    assert after_all.json() == {"items": [], "next_cursor": None}
    problem = assert_problem(await client.get("/v1/schedules", params={"paused": "yes"}), 422)
    assert problem["errors"][0]["path"] == "query.paused"


async def test_an_unknown_schedule_is_404_and_a_malformed_id_422(client: httpx.AsyncClient) -> None:
    missing = unique("missing")
    for method, path in [
        ("GET", f"/v1/schedules/{missing}"),
        ("GET", f"/v1/schedules/{missing}/fires"),
        ("PATCH", f"/v1/schedules/{missing}"),
        ("DELETE", f"/v1/schedules/{missing}"),
        ("POST", f"/v1/schedules/{missing}/pause"),
        ("POST", f"/v1/schedules/{missing}/resume"),
        ("POST", f"/v1/schedules/{missing}/trigger"),
    ]:
        body = {} if method in ("PATCH", "POST") else None
        problem = assert_problem(await client.request(method, path, json=body), 404)
        assert problem["type"] == "urn:paceline:problem:not-found", (method, path)
    backfill = {"from": "2030-01-01T00:00:00Z", "until": "2030-01-02T00:00:00Z"}
    assert_problem(await client.post(f"/v1/schedules/{missing}/backfill", json=backfill), 404)
    problem = assert_problem(await client.get("/v1/schedules/.hidden"), 422)
    assert problem["errors"][0]["path"] == "path.schedule_id"


# --- change and delete -------------------------------------------------------------------------


async def test_a_patch_replaces_the_fields_given_and_keeps_the_timing(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name, note="first"))
    before = await row_of(pool, view["id"])
    answer = await client.patch(
        f"/v1/schedules/{view['id']}",
        json={"inputs": {"host": "db-9", "count": 3}, "policy": {"overlap": "allow"}},
    )
    assert answer.status_code == 200, answer.text
    changed = answer.json()
    assert changed["inputs"] == {"host": "db-9", "count": 3}
    assert changed["policy"]["overlap"] == "allow"
    assert changed["policy"]["catchup"] == "latest"  # the policy is replaced as a whole
    assert changed["note"] == "first"  # not given: kept
    assert changed["revision"] == 2
    after = await row_of(pool, view["id"])
    assert after["last_nominal_at"] == before["last_nominal_at"]
    assert after["next_due_at"] == before["next_due_at"]
    assert after["updated_at"] > before["updated_at"]
    # The same spec written another way is no change of timing.
    same = await client.patch(f"/v1/schedules/{view['id']}", json={"spec": {"interval": 3600}})
    assert same.status_code == 200, same.text
    assert (await row_of(pool, view["id"]))["last_nominal_at"] == before["last_nominal_at"]
    # A null note clears it; version null is the latest.
    cleared = await client.patch(f"/v1/schedules/{view['id']}", json={"note": None, "version": 1})
    assert (cleared.json()["note"], cleared.json()["version"]) == (None, 1)
    assert cleared.json()["revision"] == 4


async def test_a_changed_spec_starts_afresh(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    name = await definition(client)
    view = await create(client, schedule(name))
    before = await db_now(pool)
    answer = await client.patch(
        f"/v1/schedules/{view['id']}", json={"spec": {"cron": "30 4 * * *", "timezone": "UTC"}}
    )
    assert answer.status_code == 200, answer.text
    row = await row_of(pool, view["id"])
    assert row["last_nominal_at"] >= before > at(view["last_nominal_at"])
    spec = ScheduleSpec(cron="30 4 * * *")
    (first,) = fire_times(spec, row["last_nominal_at"], 1)
    assert row["next_due_at"] == first
    assert answer.json()["next_fires"][0]["nominal_at"] == iso(first)


async def test_a_changed_spec_of_a_paused_schedule_stays_undue(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name, paused=True))
    answer = await client.patch(f"/v1/schedules/{view['id']}", json={"spec": {"interval": "5m"}})
    assert answer.status_code == 200, answer.text
    row = await row_of(pool, view["id"])
    assert (row["paused"], row["next_due_at"]) == (True, None)
    assert row["paused_at"] == at(view["paused_at"])
    assert row["last_nominal_at"] > row["paused_at"]


async def test_a_patch_is_checked_as_a_create(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name))
    url = f"/v1/schedules/{view['id']}"
    problem = assert_problem(
        await client.patch(
            url, json={"inputs": {"count": 2}, "spec": {"interval": "1h", "jitter": "2h"}}
        ),
        422,
    )
    assert problem["type"] == "urn:paceline:problem:invalid-schedule"
    assert sorted(e["path"] for e in problem["errors"]) == ["inputs.host", "spec.jitter"]
    # A new definition that the stored inputs do not fit.
    other = await definition(
        client, {"inputs": {"site": {"type": "string"}}, "steps": [{"id": "n", "type": "noop"}]}
    )
    problem = assert_problem(await client.patch(url, json={"definition": other}), 422)
    assert sorted(e["path"] for e in problem["errors"]) == ["inputs.host", "inputs.site"]
    problem = assert_problem(await client.patch(url, json={"version": 7}), 404)
    assert problem["type"] == "urn:paceline:problem:unknown-definition"
    for null in ("definition", "inputs", "spec", "policy"):
        problem = assert_problem(await client.patch(url, json={null: None}), 422)
        assert problem["type"] == "urn:paceline:problem:invalid-request"
        assert [e["path"] for e in problem["errors"]] == [null]
    assert_problem(await client.patch(url, json={"paused": True}), 422)
    row = await row_of(pool, view["id"])
    assert (row["revision"], row["inputs"], row["definition"]) == (1, SIMPLE_INPUTS, name)


async def test_delete_removes_the_schedule_and_its_ledger_not_its_runs(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name))
    fire = (await client.post(f"/v1/schedules/{view['id']}/trigger")).json()
    assert fire["outcome"] == "STARTED"
    assert len(await ledger(pool, view["id"])) == 1
    deleted = await client.delete(f"/v1/schedules/{view['id']}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert_problem(await client.get(f"/v1/schedules/{view['id']}"), 404)
    assert await ledger(pool, view["id"]) == []
    status = await pool.fetchval(
        "SELECT status FROM instances WHERE id = $1", UUID(fire["instance_id"])
    )
    assert status == "PENDING"
    assert_problem(await client.delete(f"/v1/schedules/{view['id']}"), 404)
    # The id is free again.
    await create(client, schedule(name, id=view["id"]))


# --- pause and resume --------------------------------------------------------------------------


async def test_pause_and_resume_write_what_the_scheduler_reads(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name, policy={"catchup": "skip"}))
    url = f"/v1/schedules/{view['id']}"
    before = await db_now(pool)
    paused = await client.post(f"{url}/pause", json={"note": "maintenance"})
    assert paused.status_code == 200, paused.text
    assert (paused.json()["paused"], paused.json()["pause_note"]) == (True, "maintenance")
    row = await row_of(pool, view["id"])
    assert (row["paused"], row["next_due_at"], row["pause_note"]) == (True, None, "maintenance")
    assert row["paused_at"] >= before
    first_pause = row["paused_at"]

    # Pausing again keeps when the pause began, and the note unless a new one is given; with
    # nothing new, nothing changes (not even the revision).
    revision = row["revision"]
    again = await client.post(f"{url}/pause")
    assert again.status_code == 200, again.text
    row = await row_of(pool, view["id"])
    assert (row["paused_at"], row["pause_note"]) == (first_pause, "maintenance")
    assert row["revision"] == revision
    await client.post(f"{url}/pause", json={"note": "longer"})
    assert (await row_of(pool, view["id"]))["pause_note"] == "longer"

    # Resumed: due at once, with the answer for the fires of the pause; `paused_at` bounds them.
    before = await db_now(pool)
    resumed = await client.post(f"{url}/resume", json={"catchup": "all"})
    after = await db_now(pool)
    assert resumed.status_code == 200, resumed.text
    assert (resumed.json()["paused"], resumed.json()["resume_catchup"]) == (False, "all")
    row = await row_of(pool, view["id"])
    assert (row["paused"], row["resume_catchup"], row["pause_note"]) == (False, "all", None)
    assert row["paused_at"] == first_pause
    assert before <= row["next_due_at"] <= after

    # Resuming a schedule that is not paused changes nothing.
    revision = row["revision"]
    again = await client.post(f"{url}/resume", json={"catchup": "skip"})
    assert again.status_code == 200, again.text
    unchanged = await row_of(pool, view["id"])
    assert dict(unchanged) == dict(row) and unchanged["revision"] == revision

    # Paused again before a scheduler applied the resume: the pause still began then.
    await client.post(f"{url}/pause")
    row = await row_of(pool, view["id"])
    assert (row["paused"], row["paused_at"], row["next_due_at"]) == (True, first_pause, None)
    # Without an answer, the policy's catch-up.
    await client.post(f"{url}/resume")
    assert (await row_of(pool, view["id"]))["resume_catchup"] == "skip"


# --- trigger -----------------------------------------------------------------------------------


async def test_a_trigger_writes_a_ledger_row_and_a_pending_instance_with_its_trigger(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name))
    url = f"/v1/schedules/{view['id']}"
    before = await db_now(pool)
    answer = await client.post(f"{url}/trigger", headers=as_principal("bob"))
    after = await db_now(pool)
    assert answer.status_code == 200, answer.text
    fire = answer.json()
    assert (fire["outcome"], fire["how"]) == ("STARTED", "trigger")
    nominal = at(fire["nominal_at"])
    assert before <= nominal <= after
    assert at(fire["due_at"]) == at(fire["started_at"]) == at(fire["decided_at"]) == nominal
    assert fire["lateness_ms"] == 0
    assert "triggered by an operator" in fire["reason"]

    [row] = await ledger(pool, view["id"])
    assert (row["nominal_at"], row["outcome"], row["how"]) == (nominal, "STARTED", "trigger")
    assert str(row["instance_id"]) == fire["instance_id"]
    [instance] = await instances_of(pool, view["id"])
    assert instance["id"] == row["instance_id"]
    assert (instance["status"], instance["started_how"], instance["started_by"]) == (
        "PENDING",
        "schedule",
        f"schedule:{view['id']}",
    )
    assert (instance["definition"], instance["version"]) == (name, 1)
    assert instance["trigger"] == {
        "kind": "schedule",
        "schedule": view["id"],
        "nominal_at": iso(nominal),
    }
    assert instance["state"]["inputs"] == {"host": "db-1", "count": 1}  # defaults filled in
    [message] = await drain(commands)
    assert body_of(message) == {
        "type": "instance.start",
        "v": 1,
        "instance_id": fire["instance_id"],
    }

    shown = (await client.get(url)).json()
    assert shown["running"] == [fire["instance_id"]] and shown["running_count"] == 1
    assert shown["last_fire"] == fire
    assert shown["counts"]["STARTED"] == 1


async def test_a_trigger_follows_the_overlap_policy(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name))
    url = f"/v1/schedules/{view['id']}"
    first = (await client.post(f"{url}/trigger")).json()
    skipped = (await client.post(f"{url}/trigger", json={})).json()
    assert skipped["outcome"] == "SKIPPED_OVERLAP" and skipped["instance_id"] is None
    assert "overlap=skip" in skipped["reason"]
    allowed = (await client.post(f"{url}/trigger", json={"overlap": "allow"})).json()
    assert allowed["outcome"] == "STARTED"
    held = (await client.post(f"{url}/trigger", json={"overlap": "buffer_one"})).json()
    assert held["outcome"] == "BUFFERED"
    assert len(await instances_of(pool, view["id"])) == 2
    assert len(await drain(commands)) == 2
    shown = (await client.get(url)).json()
    assert shown["counts"] == {
        "STARTED": 2,
        "SKIPPED_OVERLAP": 1,
        "SKIPPED_MISSED": 0,
        "SKIPPED_PAUSED": 0,
        "BUFFERED": 1,
        "START_FAILED": 0,
    }
    assert shown["buffered"] == 1
    assert shown["running"] == [first["instance_id"], allowed["instance_id"]]
    assert shown["last_fire"] == held


async def test_a_trigger_the_definition_refuses_is_start_failed(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name))  # version null: the latest at each fire
    await create_definition(
        client,
        name,
        {"inputs": {"site": {"type": "string"}}, "steps": [{"id": "n", "type": "noop"}]},
    )
    fire = (await client.post(f"/v1/schedules/{view['id']}/trigger")).json()
    assert fire["outcome"] == "START_FAILED" and fire["instance_id"] is None
    assert "inputs.site" in fire["reason"]
    assert await instances_of(pool, view["id"]) == []


# --- backfill ----------------------------------------------------------------------------------


async def hourly_window(pool: asyncpg.Pool, hours: int) -> tuple[datetime, datetime]:
    until = (await db_now(pool)).replace(minute=0, second=0, microsecond=0)
    return until - timedelta(hours=hours), until


async def test_a_backfill_dry_run_says_what_a_backfill_starts_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name))
    url = f"/v1/schedules/{view['id']}/backfill"
    start, until = await hourly_window(pool, 5)
    expected = [start + timedelta(hours=h) for h in range(5)]
    window = {"from": iso(start), "until": iso(until)}

    dry = await client.post(url, json={**window, "dry_run": True})
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] is True and dry.json()["fires"] == []
    assert [
        (at(p["nominal_at"]), p["outcome"], p["would_start"]) for p in dry.json()["planned"]
    ] == [(n, None, True) for n in expected]
    assert await ledger(pool, view["id"]) == []
    assert await instances_of(pool, view["id"]) == []

    real = await client.post(url, json={**window, "overlap": "allow"})
    assert real.status_code == 200, real.text
    fires = real.json()["fires"]
    assert real.json()["dry_run"] is False
    assert [(at(f["nominal_at"]), f["outcome"], f["how"]) for f in fires] == [
        (n, "STARTED", "backfill") for n in expected
    ]
    instances = await instances_of(pool, view["id"])
    assert sorted(i["trigger"]["nominal_at"] for i in instances) == [iso(n) for n in expected]
    assert {str(i["id"]) for i in instances} == {f["instance_id"] for f in fires}
    assert len(await drain(commands)) == 5

    # Again: nothing starts twice, and a dry run says so.
    again = await client.post(url, json={**window, "overlap": "allow"})
    assert again.status_code == 200, again.text
    assert again.json()["fires"] == []
    assert {(p["outcome"], p["would_start"]) for p in again.json()["planned"]} == {
        ("STARTED", False)
    }
    dry = await client.post(url, json={**window, "dry_run": True})
    assert [p["would_start"] for p in dry.json()["planned"]] == [False] * 5
    assert len(await instances_of(pool, view["id"])) == 5
    assert await drain(commands) == []
    assert len(await ledger(pool, view["id"])) == 5


async def test_a_backfill_runs_a_skipped_fire_and_leaves_the_started(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name, policy={"overlap": "allow"}))
    start, until = await hourly_window(pool, 2)
    # As a scheduler would have decided them: the first missed, the second started.
    await pool.execute(
        "INSERT INTO schedule_fires (schedule_id, nominal_at, outcome, how, decided_at, reason)"
        " VALUES ($1, $2, 'SKIPPED_MISSED', 'catchup', now(), 'missed'),"
        " ($1, $3, 'STARTED', 'schedule', now(), 'on time')",
        view["id"],
        start,
        start + timedelta(hours=1),
    )
    answer = await client.post(
        f"/v1/schedules/{view['id']}/backfill", json={"from": iso(start), "until": iso(until)}
    )
    assert answer.status_code == 200, answer.text
    [fire] = answer.json()["fires"]
    assert (at(fire["nominal_at"]), fire["outcome"]) == (start, "STARTED")
    assert "was SKIPPED_MISSED" in fire["reason"]
    assert [(p["outcome"], p["would_start"]) for p in answer.json()["planned"]] == [
        ("SKIPPED_MISSED", True),
        ("STARTED", False),
    ]
    assert len(await instances_of(pool, view["id"])) == 1


async def test_a_backfill_too_large_late_or_backwards_is_422(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name, spec={"interval": "1m"}))
    url = f"/v1/schedules/{view['id']}/backfill"
    now = await db_now(pool)
    large = {"from": iso(now - timedelta(days=1)), "until": iso(now - timedelta(minutes=1))}
    problem = assert_problem(await client.post(url, json=large), 422)
    assert problem["type"] == "urn:paceline:problem:invalid-backfill"
    assert "covers 1,439 fire times: at most 1,000 in one backfill" in problem["detail"]
    future = {"from": iso(now - timedelta(minutes=5)), "until": iso(now + timedelta(hours=1))}
    problem = assert_problem(await client.post(url, json={**future, "dry_run": True}), 422)
    assert [e["path"] for e in problem["errors"]] == ["until"]
    assert "after now" in problem["errors"][0]["message"]
    backwards = {"from": iso(now + timedelta(hours=2)), "until": iso(now + timedelta(hours=1))}
    problem = assert_problem(await client.post(url, json=backwards), 422)
    assert [e["path"] for e in problem["errors"]] == ["until", "until"]
    assert await ledger(pool, view["id"]) == []
    assert await instances_of(pool, view["id"]) == []


# --- the fire ledger -----------------------------------------------------------------------------


async def test_the_ledger_lists_rows_by_nominal_time_with_filters_and_pages(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name))
    base = datetime(2030, 1, 1, tzinfo=UTC)
    rows = [
        # A range of 500 missed fires, one of more than 10,000, then one row a fire.
        (base - timedelta(days=30), base - timedelta(days=20), 500, "SKIPPED_MISSED"),
        (base - timedelta(days=19), base - timedelta(days=1), None, "SKIPPED_MISSED"),
        (base, None, None, "SKIPPED_MISSED"),
        (base + timedelta(hours=1), None, None, "STARTED"),
        (base + timedelta(hours=2), None, None, "SKIPPED_OVERLAP"),
        (base + timedelta(hours=3), None, None, "STARTED"),
    ]
    await pool.executemany(
        "INSERT INTO schedule_fires (schedule_id, nominal_at, last_nominal_at, count, outcome,"
        " how, decided_at, reason) VALUES ($1, $2, $3, $4, $5, 'schedule', now(), 'test')",
        [(view["id"], *r) for r in rows],
    )
    url = f"/v1/schedules/{view['id']}/fires"
    everything = (await client.get(url)).json()
    assert [at(f["nominal_at"]) for f in everything["items"]] == [r[0] for r in rows]
    assert everything["next_cursor"] is None
    assert everything["items"][0]["count"] == 500
    assert at(everything["items"][0]["last_nominal_at"]) == rows[0][1]

    started = (await client.get(url, params={"outcome": "started"})).json()["items"]
    assert [at(f["nominal_at"]) for f in started] == [rows[3][0], rows[5][0]]
    several = (await client.get(url, params={"outcome": "STARTED,SKIPPED_OVERLAP"})).json()
    assert len(several["items"]) == 3
    # A range is listed when any of its fire times is in the window.
    window = {"since": iso(base - timedelta(days=2)), "until": iso(base + timedelta(hours=2))}
    shown = (await client.get(url, params=window)).json()["items"]
    assert [at(f["nominal_at"]) for f in shown] == [rows[1][0], rows[2][0], rows[3][0]]

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 4}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get(url, params=params)).json()
        seen += [f["nominal_at"] for f in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f["nominal_at"] for f in everything["items"]]

    counts = (await client.get(f"/v1/schedules/{view['id']}")).json()
    assert counts["counts"]["SKIPPED_MISSED"] == 500 + 10_001 + 1
    assert counts["counts"]["STARTED"] == 2 and counts["counts"]["SKIPPED_OVERLAP"] == 1
    assert counts["counts_exact"] is False
    assert at(counts["last_fire"]["nominal_at"]) == rows[-1][0]

    for bad in ({"outcome": "LOST"}, {"since": "2030-01-01"}, {"cursor": "abc"}):
        problem = assert_problem(await client.get(url, params=bad), 422)
        assert problem["errors"][0]["path"] == f"query.{next(iter(bad))}"


async def test_a_ledger_cursor_before_1970_is_a_position(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name))
    backfill = await client.post(
        f"/v1/schedules/{view['id']}/backfill",
        json={
            "from": "1970-01-01T00:00:00+02:00",
            "until": "1970-01-01T03:00:00+02:00",
            "overlap": "allow",
        },
    )
    assert backfill.status_code == 200, backfill.text
    assert len(backfill.json()["fires"]) == 3
    url = f"/v1/schedules/{view['id']}/fires"
    first = (await client.get(url, params={"limit": 1})).json()
    assert first["next_cursor"].startswith("-")
    rest = (await client.get(url, params={"cursor": first["next_cursor"]})).json()
    assert [f["nominal_at"] for f in first["items"] + rest["items"]] == [
        "1969-12-31T22:00:00Z",
        "1969-12-31T23:00:00Z",
        "1970-01-01T00:00:00Z",
    ]


# --- authentication ----------------------------------------------------------------------------


async def test_every_schedule_route_needs_a_token(
    anon: httpx.AsyncClient, client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name))
    url = f"/v1/schedules/{view['id']}"
    for method, path, body in [
        ("POST", "/v1/schedules", schedule(name)),
        ("GET", "/v1/schedules", None),
        ("GET", url, None),
        ("PATCH", url, {"note": "x"}),
        ("DELETE", url, None),
        ("POST", f"{url}/pause", {}),
        ("POST", f"{url}/resume", {}),
        ("POST", f"{url}/trigger", {}),
        ("POST", f"{url}/backfill", {"from": "2030-01-01T00:00:00Z", "until": "x"}),
        ("GET", f"{url}/fires", None),
    ]:
        problem = assert_problem(await anon.request(method, path, json=body), 401)
        assert problem["type"] == "urn:paceline:problem:unauthorized", (method, path)
    row = await row_of(pool, view["id"])
    assert (row["revision"], row["paused"], row["note"]) == (1, False, None)
    assert await ledger(pool, view["id"]) == []


async def test_without_the_broker_a_trigger_or_a_backfill_is_503_and_records_nothing(
    settings: AdminSettings, client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name = await definition(client)
    view = await create(client, schedule(name))
    url = f"/v1/schedules/{view['id']}"
    start, until = await hourly_window(pool, 2)
    window = {"from": iso(start), "until": iso(until)}
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://admin", headers=AUTH
        ) as own:
            await app.state.resources.connection.close()
            trigger = assert_problem(await own.post(f"{url}/trigger"), 503)
            assert trigger["type"] == "urn:paceline:problem:broker-unavailable"
            assert "trigger" in trigger["detail"]
            backfill = assert_problem(await own.post(f"{url}/backfill", json=window), 503)
            assert "backfill" in backfill["detail"]
            dry = await own.post(f"{url}/backfill", json={**window, "dry_run": True})
            assert dry.status_code == 200, dry.text
            assert len(dry.json()["planned"]) == 2
            # What sends no command is answered.
            assert (await own.post(f"{url}/pause")).status_code == 200
    assert await ledger(pool, view["id"]) == []
    assert await instances_of(pool, view["id"]) == []
