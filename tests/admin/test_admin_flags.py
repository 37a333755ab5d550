"""Flagged activities: shown on the instance, listed across instances, resolved by a command."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from admin_support import (
    as_principal,
    assert_problem,
    body_of,
    create_definition,
    done,
    drain,
    flagged,
    insert_instance,
    unique,
)
from aio_pika.abc import AbstractQueue

from paceline_contracts.states import ActivityStatus, InstanceStatus

FLAGGABLE = {
    "steps": [
        {"id": "probe", "type": "noop"},
        {
            "id": "check",
            "if": "1 == 1",
            "then": [{"id": "push", "type": "noop"}],
            "else": [{"id": "skipped", "type": "noop"}],
        },
        {"id": "later", "type": "noop"},
    ]
}
T0 = datetime(2021, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def definition(client: httpx.AsyncClient, prefix: str = "flags") -> str:
    name = unique(prefix)
    await create_definition(client, name, FLAGGABLE)
    return name


async def one_flagged(
    client: httpx.AsyncClient, pool: asyncpg.Pool, status: InstanceStatus = InstanceStatus.FLAGGED
) -> tuple[str, str]:
    """An instance whose `probe` completed and whose `push` is flagged."""
    name = await definition(client)
    return await insert_instance(
        pool, name, {"probe": done(), "push": flagged(at(0), server="worker-7")}, status
    )


def resolve_url(instance_id: str, step: str = "push") -> str:
    return f"/v1/instances/{instance_id}/activities/{step}/resolve"


async def test_the_instance_shows_the_flag(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    instance_id, _ = await one_flagged(client, pool)
    detail = (await client.get(f"/v1/instances/{instance_id}")).json()
    assert detail["status"] == "FLAGGED"
    probe, push = detail["activities"]
    assert (probe["step"], probe["flag"], probe["claimed_by"]) == ("probe", None, None)
    assert push["status"] == "INTERRUPTED"
    assert (push["claimed_by"], push["interruptions"], push["server"]) == (
        "worker-7",
        1,
        "worker-7",
    )
    assert push["reason"].startswith("attempt 1 held by worker-7")
    flag = push["flag"]
    assert flag == {
        "kind": "redelivered",
        "reason": push["reason"],
        "attempt": 1,
        "server": "worker-7",
        "held_since": flag["held_since"],
        "flagged_at": flag["flagged_at"],
        "holder": {
            "server_id": "worker-7",
            "status": None,  # not in the registry
            "last_heartbeat": None,
            "alive_since_flag": False,
            "lists_attempt_in_flight": False,
            "may_still_finish": False,
            "note": flag["holder"]["note"],
        },
    }
    assert datetime.fromisoformat(flag["flagged_at"]) == at(0)
    assert datetime.fromisoformat(flag["held_since"]) == at(-30)


async def test_flags_lists_waiting_activities_oldest_first_and_pages(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    name, other = await definition(client), await definition(client, "other")
    late, _ = await insert_instance(pool, name, {"probe": done(), "push": flagged(at(3))})
    # Two flagged in one instance, at the same moment: the step breaks the tie.
    both, _ = await insert_instance(
        pool, name, {"push": flagged(at(1)), "probe": flagged(at(1), server="worker-2")}
    )
    middle, _ = await insert_instance(pool, name, {"probe": flagged(at(2), attempt=3)})
    # Not waiting for an operator: not FLAGGED, or nothing INTERRUPTED.
    await insert_instance(pool, name, {"probe": flagged(at(0))}, InstanceStatus.CANCELLED)
    await insert_instance(pool, name, {"probe": done()}, InstanceStatus.RUNNING)
    await insert_instance(pool, name, {"probe": done(ActivityStatus.SKIPPED)})
    elsewhere, _ = await insert_instance(pool, other, {"push": flagged(at(2.5))})

    async def listed(**params: Any) -> dict[str, Any]:
        response = await client.get("/v1/flags", params=params)
        assert response.status_code == 200, response.text
        page: dict[str, Any] = response.json()
        return page

    expected = [(both, "probe"), (both, "push"), (middle, "probe"), (late, "push")]
    page = await listed(definition=name)
    assert [(i["instance_id"], i["step"]) for i in page["items"]] == expected
    assert page["next_cursor"] is None
    first = page["items"][0]
    assert first == {
        "instance_id": both,
        "definition": name,
        "version": 1,
        "step": "probe",
        "type": "noop",
        "attempt": 1,
        "restartable": False,
        "flag": first["flag"],
        "instance_url": f"/v1/instances/{both}",
    }
    assert (first["flag"]["kind"], first["flag"]["server"]) == ("redelivered", "worker-2")
    assert page["items"][2]["flag"]["attempt"] == 3

    for limit, sizes in ((1, [1, 1, 1, 1]), (3, [3, 1])):
        pages: list[list[tuple[str, str]]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"definition": name, "limit": limit}
            page = await listed(**params, **({"cursor": cursor} if cursor else {}))
            pages.append([(i["instance_id"], i["step"]) for i in page["items"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [len(p) for p in pages] == sizes
        assert [item for p in pages for item in p] == expected

    assert [i["instance_id"] for i in (await listed(definition=other))["items"]] == [elsewhere]
    assert (await listed(definition=unique("nothing")))["items"] == []
    everything = [(i["instance_id"], i["step"]) for i in (await listed(limit=500))["items"]]
    ours = [key for key in everything if key in [*expected, (elsewhere, "push")]]
    assert ours == [*expected[:3], (elsewhere, "push"), expected[3]]

    assert_problem(await client.get("/v1/flags", params={"cursor": "bm90IGpzb24"}), 422)
    assert_problem(await client.get("/v1/flags", params={"limit": 0}), 422)


@pytest.mark.parametrize(("action", "output"), [("retry", None), ("skip", {}), ("fail", None)])
async def test_resolve_sends_the_decision_to_the_scheduler(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    action: str,
    output: Any,
) -> None:
    instance_id, trace_id = await one_flagged(client, pool)
    response = await client.post(resolve_url(instance_id), json={"action": action})
    assert response.status_code == 202, response.text
    assert response.json() == {
        "id": instance_id,
        "step": "push",
        "action": action,
        "status": "RESOLVE_REQUESTED",
    }
    [message] = await drain(commands)
    assert body_of(message) == {
        "type": "activity.resolve",
        "v": 1,
        "instance_id": instance_id,
        "step": "push",
        "action": action,
        "output": output,
        "by": "admin",
        "forced": False,
        "attempt": 1,  # the flagged attempt: the scheduler ignores it for any other
    }
    assert message.type == "activity.resolve"
    # The decision is a span in the instance's own trace.
    version, trace, span, _ = str(message.headers["traceparent"]).split("-")
    assert (version, trace) == ("00", trace_id)
    assert int(span, 16) != 0


async def test_skip_carries_the_output_and_the_operator(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id, _ = await one_flagged(client, pool)
    output = {"exit_code": 0, "stdout": "added by hand", "nested": {"list": [1, None, True]}}
    response = await client.post(
        resolve_url(instance_id),
        json={"action": "skip", "output": output},
        headers=as_principal("alice@example.com"),
    )
    assert response.status_code == 202, response.text
    [message] = await drain(commands)
    command = body_of(message)
    assert (command["action"], command["output"], command["by"]) == (
        "skip",
        output,
        "alice@example.com",
    )


async def test_bad_decisions_are_422_and_send_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id, _ = await one_flagged(client, pool)
    url = resolve_url(instance_id)

    async def refused(body: Any, **headers: str) -> dict[str, Any]:
        return assert_problem(await client.post(url, json=body, headers=headers), 422)

    for action in ("retry", "fail"):
        problem = await refused({"action": action, "output": {"x": 1}})
        assert [e["path"] for e in problem["errors"]] == ["output"]
        assert "only `skip`" in problem["detail"]
    assert [e["path"] for e in (await refused({"action": "retry", "output": None}))["errors"]] == [
        "output"
    ]
    for body in (
        {"action": "skip", "force": False},
        {"action": "fail", "force": True},
        {"action": "skip", "output": {}, "force": False},
    ):
        problem = await refused(body)
        assert [e["path"] for e in problem["errors"]] == ["force"]
        assert "only `retry`" in problem["detail"]
    assert [e["path"] for e in (await refused({"action": "skip", "output": None}))["errors"]] == [
        "output"
    ]
    bad_action = await refused({"action": "restart"})
    assert [e["path"] for e in bad_action["errors"]] == ["action"]
    assert "'retry', 'skip' or 'fail'" in bad_action["errors"][0]["message"]
    assert [e["path"] for e in (await refused({}))["errors"]] == ["action"]
    extra = await refused({"action": "skip", "output": {}, "by": "mallory", "why": "x"})
    assert {e["path"] for e in extra["errors"]} == {"by", "why"}
    assert [e["path"] for e in (await refused({"action": "skip", "output": [1]}))["errors"]] == [
        "output"
    ]
    unstorable = await client.post(
        url,
        content=b'{"action": "skip", "output": {"n": NaN, "s": "a\\u0000b"}}',
        headers={"Content-Type": "application/json"},
    )
    assert {e["path"] for e in assert_problem(unstorable, 422)["errors"]} == {
        "output.n",
        "output.s",
    }
    broken = await client.post(
        url, content=b'{"action": ', headers={"Content-Type": "application/json"}
    )
    assert_problem(broken, 400)
    assert await drain(commands, settle_s=0.05) == []


async def test_unknown_instances_and_steps_are_404(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id, _ = await one_flagged(client, pool)
    for step in ("nope", "check", "later"):  # no such step; a condition; not dispatched yet
        problem = assert_problem(
            await client.post(resolve_url(instance_id, step), json={"action": "retry"}), 404
        )
        assert repr(step) in problem["detail"]
    unknown = "00000000-0000-4000-8000-000000000000"
    assert_problem(await client.post(resolve_url(unknown), json={"action": "retry"}), 404)
    assert_problem(await client.post(resolve_url("not-a-uuid"), json={"action": "retry"}), 422)
    assert await drain(commands, settle_s=0.05) == []


async def test_only_a_flagged_activity_of_a_live_instance_can_be_resolved(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id, _ = await one_flagged(client, pool)
    not_flagged = await client.post(resolve_url(instance_id, "probe"), json={"action": "retry"})
    problem = assert_problem(not_flagged, 409)
    assert "COMPLETED" in problem["detail"] and "not flagged" in problem["detail"]
    assert problem["type"].endswith("not-flagged")

    for status in (InstanceStatus.CANCELLED, InstanceStatus.FAILED):
        ended, _ = await one_flagged(client, pool, status)
        problem = assert_problem(
            await client.post(resolve_url(ended), json={"action": "skip"}), 409
        )
        assert status.value in problem["detail"]
        assert problem["type"].endswith("instance-ended")
    assert await drain(commands, settle_s=0.05) == []
