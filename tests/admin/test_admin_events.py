"""Events: `POST /v1/events` records the event, its deduplications and the instances its
subscribers start (with their start commands) in one transaction and answers after the commit;
`GET /v1/events/{id}` shows what it started. A definition subscribes with `triggers`: only its
latest version's count.

No scheduler runs here: an instance stays PENDING, and its start command waits in the commands
queue (the tests read it there)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx
from admin_support import (
    as_principal,
    assert_problem,
    body_of,
    create_definition,
    drain,
    unique,
)
from aio_pika.abc import AbstractQueue

from paceline_engine.definitions import trigger_for_event
from paceline_starts import intake


def audit(event_type: str, **trigger: Any) -> dict[str, Any]:
    """A definition with one trigger on `event_type` (`trigger` adds to or replaces its
    fields): events whose `data.site` is `par1` start it with `host` from `data.host`,
    deduplicated by the event's id."""
    return {
        "inputs": {"host": {"type": "string"}, "site": {"type": "string", "default": "any"}},
        "steps": [{"id": "audit", "type": "noop", "with": {"host": "${inputs.host}"}}],
        "triggers": [
            {
                "id": "on_discovered",
                "event": event_type,
                "when": "trigger.event.data.site == 'par1'",
                "inputs": {"host": "${trigger.event.data.host}"},
                "dedupe": "${trigger.event.id}",
                "dedupe_window": "1h",
                **trigger,
            }
        ],
    }


async def post(
    client: httpx.AsyncClient, event: dict[str, Any], key: str | None = None, **kwargs: Any
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return await client.post("/v1/events", json=event, headers=headers, **kwargs)


async def accepted(client: httpx.AsyncClient, event: dict[str, Any], key: str | None = None) -> Any:
    response = await post(client, event, key)
    assert response.status_code == 202, response.text
    return response.json()


async def instances_of(pool: asyncpg.Pool, definition: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT id, version, status, started_by, started_how, trigger, state->'inputs' AS inputs"
        " FROM instances WHERE definition = $1 ORDER BY created_at",
        definition,
    )


async def test_an_event_starts_an_instance_with_its_start_command_and_says_so(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    kind, name = unique("device.discovered"), unique("audit")
    await create_definition(client, name, audit(kind))
    event = {
        "type": kind,
        "id": "ev-1",
        "source": "inventory",
        "data": {"site": "par1", "host": "sw1"},
    }

    response = await post(client, event)

    assert response.status_code == 202, response.text
    answer = response.json()
    assert set(answer) == {"event_id", "duplicate", "no_subscriber", "instances"}
    assert answer["duplicate"] is False and answer["no_subscriber"] is False
    [start] = answer["instances"]
    assert start == {
        "definition": name,
        "version": 1,
        "trigger": "on_discovered",
        "outcome": "started",
        "instance_id": start["instance_id"],
        "reason": None,
    }
    assert response.headers["Location"] == f"/v1/events/{answer['event_id']}"
    assert "Idempotent-Replayed" not in response.headers

    [row] = await instances_of(pool, name)
    assert str(row["id"]) == start["instance_id"]
    assert row["status"] == "PENDING"
    assert row["started_how"] == "event"
    assert row["started_by"] == f"event:{answer['event_id']}"
    assert row["inputs"] == {"host": "sw1", "site": "any"}, "rendered from the event, defaults in"
    assert row["trigger"] == trigger_for_event(
        "on_discovered", kind, "ev-1", "inventory", {"site": "par1", "host": "sw1"}
    )
    sent = [body_of(m) for m in await drain(commands)]
    assert {"type": "instance.start", "v": 1, "instance_id": start["instance_id"]} in sent

    recorded = await pool.fetchrow(
        "SELECT * FROM events WHERE id = $1", uuid.UUID(answer["event_id"])
    )
    assert recorded["type"] == kind and recorded["event_id"] == "ev-1"
    assert recorded["source"] == "inventory"
    assert recorded["received_via"] == "api" and recorded["received_by"] == "admin"
    assert recorded["answer"] == answer


async def test_who_posted_an_event_is_the_token_principal(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await client.post(
        "/v1/events", json={"type": unique("nobody.listens")}, headers=as_principal("alice")
    )
    assert response.status_code == 202, response.text
    event_id = uuid.UUID(response.json()["event_id"])
    assert await pool.fetchval("SELECT received_by FROM events WHERE id = $1", event_id) == "alice"


async def test_a_repeated_event_answers_the_first_answer_and_starts_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    kind, name = unique("device.discovered"), unique("audit")
    definition = audit(kind)
    del definition["triggers"][0]["dedupe"], definition["triggers"][0]["dedupe_window"]
    await create_definition(client, name, definition)  # no trigger dedupe: only the event's
    event = {"type": kind, "data": {"site": "par1", "host": "sw1"}}

    key = unique("retry-me")
    first = await accepted(client, event, key=key)
    await drain(commands)
    again = await post(client, event, key=key)

    assert again.status_code == 202, again.text
    assert again.json() == {**first, "duplicate": True}
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(await instances_of(pool, name)) == 1
    assert await drain(commands) == [], "a repeat sends nothing"
    assert (
        await pool.fetchval("SELECT count(*) FROM events WHERE event_key = $1", f"key:{key}") == 1
    )

    # Without a key, the source and the id are the event's key.
    by_id = {**event, "id": "ev-7", "source": "inventory"}
    first = await accepted(client, by_id)
    assert await accepted(client, by_id) == {**first, "duplicate": True}
    assert len(await instances_of(pool, name)) == 2
    # The same id from another source is another event.
    other = await accepted(client, {**by_id, "source": "elsewhere"})
    assert other["duplicate"] is False and other["instances"][0]["outcome"] == "started"
    # With neither, every copy is an event of its own.
    assert (await accepted(client, event))["instances"][0]["outcome"] == "started"
    assert (await accepted(client, event))["instances"][0]["outcome"] == "started"
    assert len(await instances_of(pool, name)) == 5


async def test_an_idempotency_key_reused_for_another_event_is_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    kind, key = unique("device.discovered"), unique("key")
    first = await accepted(client, {"type": kind, "data": {"n": 1}}, key=key)
    for changed in (
        {"type": kind, "data": {"n": 2}},
        {"type": kind, "data": {"n": 1}, "id": "x"},
        {"type": kind + ".other", "data": {"n": 1}},
    ):
        problem = assert_problem(await post(client, changed, key=key), 422)
        assert problem["type"] == "urn:paceline:problem:idempotency-key-reused"
    assert (
        await pool.fetchval("SELECT count(*) FROM events WHERE event_key = $1", f"key:{key}") == 1
    )
    assert (await accepted(client, {"type": kind, "data": {"n": 1}}, key=key))["event_id"] == first[
        "event_id"
    ]


async def test_concurrent_copies_of_an_event_start_one_set_of_instances(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    kind, name = unique("device.discovered"), unique("audit")
    await create_definition(client, name, audit(kind))
    event, key = {"type": kind, "id": "ev-c", "data": {"site": "par1", "host": "sw1"}}, unique("k")
    answers = [
        r.json() for r in await asyncio.gather(*(post(client, event, key) for _ in range(6)))
    ]
    assert {a["event_id"] for a in answers} == {answers[0]["event_id"]}
    assert sorted(a["duplicate"] for a in answers) == [False] + [True] * 5
    assert len(await instances_of(pool, name)) == 1


async def test_an_event_nobody_subscribes_to_is_recorded(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    kind = unique("nobody.listens")
    answer = await accepted(client, {"type": kind, "id": unique("ev"), "data": [1, 2]})
    assert answer["no_subscriber"] is True and answer["instances"] == []
    row = await pool.fetchrow(
        "SELECT type, data, answer FROM events WHERE id = $1", uuid.UUID(answer["event_id"])
    )
    assert row["type"] == kind and row["data"] == [1, 2] and row["answer"] == answer
    assert await drain(commands) == []
    shown = (await client.get(f"/v1/events/{answer['event_id']}")).json()
    assert shown["no_subscriber"] is True and shown["instances"] == []


async def test_an_event_for_which_when_is_false_starts_nothing_and_says_why(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    kind, name = unique("device.discovered"), unique("audit")
    await create_definition(client, name, audit(kind))
    answer = await accepted(
        client, {"type": kind, "id": "e", "data": {"site": "ams1", "host": "sw1"}}
    )
    [start] = answer["instances"]
    assert start["outcome"] == "not_started" and start["instance_id"] is None
    assert "`when` is false" in start["reason"]
    assert answer["no_subscriber"] is False
    assert await instances_of(pool, name) == []


async def test_a_dedupe_key_seen_inside_its_window_starts_one_instance(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    kind, name = unique("device.discovered"), unique("audit")
    await create_definition(client, name, audit(kind, dedupe="${trigger.event.data.host}"))
    data = {"site": "par1", "host": "sw1"}

    first = await accepted(client, {"type": kind, "id": "a", "data": data})
    second = await accepted(client, {"type": kind, "id": "b", "data": data})
    other_host = await accepted(client, {"type": kind, "id": "c", "data": {**data, "host": "sw2"}})

    started = first["instances"][0]["instance_id"]
    [dup] = second["instances"]
    assert dup["outcome"] == "deduplicated" and dup["instance_id"] == started
    assert "'sw1'" in dup["reason"] and first["event_id"] in dup["reason"]
    assert other_host["instances"][0]["outcome"] == "started"
    assert len(await instances_of(pool, name)) == 2

    # Concurrent events with one key: one starts, the others find it.
    concurrent = await asyncio.gather(
        *(
            post(client, {"type": kind, "id": f"p{i}", "data": {**data, "host": "sw3"}})
            for i in range(5)
        )
    )
    outcomes = sorted(r.json()["instances"][0]["outcome"] for r in concurrent)
    assert outcomes == ["deduplicated"] * 4 + ["started"]
    assert len(await instances_of(pool, name)) == 3

    # Past its window, the key starts an instance again.
    await pool.execute(
        "UPDATE trigger_dedupe SET expires_at = now() - interval '1 second'"
        " WHERE definition = $1 AND dedupe_key = 'sw1'",
        name,
    )
    later = await accepted(client, {"type": kind, "id": "d", "data": data})
    assert later["instances"][0]["outcome"] == "started"
    assert later["instances"][0]["instance_id"] != started
    assert len(await instances_of(pool, name)) == 4
    remembered = await pool.fetchrow(
        "SELECT instance_id, expires_at > now() + interval '59 minutes' AS fresh"
        " FROM trigger_dedupe WHERE definition = $1 AND dedupe_key = 'sw1'",
        name,
    )
    assert str(remembered["instance_id"]) == later["instances"][0]["instance_id"]
    assert remembered["fresh"], "the window starts again from the new event"


async def test_a_trigger_that_fails_on_the_event_says_why_and_the_others_start(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    kind, name = unique("device.discovered"), unique("audit")
    definition = {
        "inputs": {"host": {"type": "string"}, "count": {"type": "integer", "default": 1}},
        "steps": [{"id": "audit", "type": "noop", "with": {}}],
        "triggers": [
            {"id": "ok", "event": kind, "inputs": {"host": "${trigger.event.data.host}"}},
            {"id": "bad_when", "event": kind, "when": "trigger.event.data.host > 3",
             "inputs": {"host": "x"}},
            {"id": "bad_inputs", "event": kind,
             "inputs": {"host": "x", "count": "${trigger.event.data.host}"}},
            {"id": "bad_dedupe", "event": kind, "inputs": {"host": "x"},
             "dedupe": "trigger.event.data.host - 1"},
        ],
    }  # fmt: skip
    await create_definition(client, name, definition)

    answer = await accepted(client, {"type": kind, "data": {"host": "sw1"}})

    by_trigger = {s["trigger"]: s for s in answer["instances"]}
    assert [s["trigger"] for s in answer["instances"]] == [
        "ok",
        "bad_when",
        "bad_inputs",
        "bad_dedupe",
    ]
    assert by_trigger["ok"]["outcome"] == "started"
    for failed in ("bad_when", "bad_inputs", "bad_dedupe"):
        assert by_trigger[failed]["outcome"] == "start_failed", by_trigger[failed]
        assert by_trigger[failed]["instance_id"] is None
    assert by_trigger["bad_when"]["reason"].startswith("`when` failed on the event")
    assert "inputs.count" in by_trigger["bad_inputs"]["reason"]
    assert by_trigger["bad_dedupe"]["reason"].startswith("`dedupe` failed on the event")
    [row] = await instances_of(pool, name)
    assert str(row["id"]) == by_trigger["ok"]["instance_id"]
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM events WHERE id = $1", uuid.UUID(answer["event_id"])
        )
        == 1
    )


async def test_a_new_version_of_a_definition_replaces_its_subscriptions(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    old_kind, new_kind, name = unique("old.kind"), unique("new.kind"), unique("audit")
    await create_definition(client, name, audit(old_kind, when="true"))
    assert await intake.subscriptions(pool, name) == [(old_kind, 1, "on_discovered")]
    two = audit(new_kind, when="true")
    two["triggers"].append({**two["triggers"][0], "id": "also"})
    await create_definition(client, name, two)
    assert await intake.subscriptions(pool, name) == [
        (new_kind, 2, "also"),
        (new_kind, 2, "on_discovered"),
    ]

    old = await accepted(client, {"type": old_kind, "data": {"host": "a"}})
    assert old["no_subscriber"] is True
    new = await accepted(client, {"type": new_kind, "data": {"host": "a"}})
    assert [(s["trigger"], s["version"], s["outcome"]) for s in new["instances"]] == [
        ("on_discovered", 2, "started"),
        ("also", 2, "started"),
    ]
    assert {r["version"] for r in await instances_of(pool, name)} == {2}

    # A version without triggers ends them.
    await create_definition(client, name, {"steps": [{"id": "x", "type": "noop", "with": {}}]})
    assert await intake.subscriptions(pool, name) == []
    assert (await accepted(client, {"type": new_kind}))["no_subscriber"] is True


async def test_every_subscriber_of_the_type_starts_by_definition_name(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    kind, prefix = unique("device.discovered"), unique("sub")
    for name in (f"{prefix}-b", f"{prefix}-a"):
        await create_definition(client, name, audit(kind, when="true"))
    answer = await accepted(client, {"type": kind, "data": {"host": "h"}})
    assert [s["definition"] for s in answer["instances"]] == [f"{prefix}-a", f"{prefix}-b"]
    assert all(s["outcome"] == "started" for s in answer["instances"])


async def test_get_shows_the_event_and_what_it_started(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    kind, name = unique("device.discovered"), unique("audit")
    await create_definition(client, name, audit(kind))
    event = {
        "type": kind,
        "id": "ev-9",
        "source": "inventory",
        "data": {"site": "par1", "host": "h"},
    }
    answer = await accepted(client, event)
    instance_id = answer["instances"][0]["instance_id"]
    await pool.execute(
        "UPDATE instances SET status = 'RUNNING' WHERE id = $1", uuid.UUID(instance_id)
    )

    response = await client.get(f"/v1/events/{answer['event_id']}")

    assert response.status_code == 200, response.text
    shown = response.json()
    assert shown.pop("received_at")
    assert shown == {
        "event_id": answer["event_id"],
        "type": kind,
        "id": "ev-9",
        "source": "inventory",
        "data": {"site": "par1", "host": "h"},
        "received_by": "admin",
        "received_via": "api",
        "no_subscriber": False,
        "instances": [{**answer["instances"][0], "status": "RUNNING"}],
    }
    missing = assert_problem(await client.get(f"/v1/events/{uuid.uuid4()}"), 404)
    assert missing["type"] == "urn:paceline:problem:not-found"


async def test_bad_events_are_refused_with_every_problem(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    before = await pool.fetchval("SELECT count(*) FROM events")
    cases: list[tuple[Any, set[str]]] = [
        ({}, {"type"}),
        ({"type": "has space"}, {"type"}),
        ({"type": "x" * 201}, {"type"}),
        ({"type": "ok", "extra": 1}, {"extra"}),
        ({"type": "ok", "id": 3, "source": ["s"]}, {"id", "source"}),
        ({"type": "ok", "id": ""}, {"id"}),
        ({"type": "ok", "data": {"a": "nul \u0000"}}, {"body.data.a"}),
        ({"type": "ok", "data": {"n": 2**64}}, {"body.data.n"}),
        ({"type": "ok", "data": "x" * (intake.MAX_DATA_BYTES + 1)}, {"body.data"}),
        ([{"type": "ok"}], {"body"}),
    ]
    for body, paths in cases:
        problem = assert_problem(await client.post("/v1/events", json=body), 422)
        assert {e["path"] for e in problem["errors"]} == paths, (body, problem)
    bad_key = assert_problem(await post(client, {"type": "ok"}, key="k" * 201), 422)
    assert len(bad_key["errors"]) == 1
    assert bad_key["errors"][0]["path"].lower() == "header.idempotency-key"
    malformed = await client.post(
        "/v1/events", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code in (400, 422)
    assert await pool.fetchval("SELECT count(*) FROM events") == before, "nothing recorded"


async def test_event_routes_need_a_token(anon: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    before = await pool.fetchval("SELECT count(*) FROM events")
    for response in (
        await anon.post("/v1/events", json={"type": "ok"}),
        await anon.post(
            "/v1/events", json={"type": "ok"}, headers={"Authorization": "Bearer nope"}
        ),
        await anon.get(f"/v1/events/{uuid.uuid4()}"),
    ):
        problem = assert_problem(response, 401)
        assert problem["type"] == "urn:paceline:problem:unauthorized"
    assert await pool.fetchval("SELECT count(*) FROM events") == before
