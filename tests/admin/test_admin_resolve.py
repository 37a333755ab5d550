"""Resolving a flag: one decision per flagged attempt (the first one wins, and the others are
told which it was), and no retry while the server that held the attempt is alive since the flag
unless the operator forces it.

No scheduler runs here: the tests write the state documents and registry rows it would write."""

from __future__ import annotations

import asyncio
import uuid
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
    insert_server,
    unique,
)
from aio_pika.abc import AbstractQueue

from paceline_contracts.states import ActivityStatus, InstanceStatus, ServerStatus
from paceline_engine.state import ActivityState, FlagKind
from paceline_infra import outbox

STEPS = {"steps": [{"id": "probe", "type": "noop"}, {"id": "push", "type": "noop"}]}


def now() -> datetime:
    return datetime.now(UTC)


async def flagged_instance(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    push: ActivityState | None = None,
    status: InstanceStatus = InstanceStatus.FLAGGED,
) -> str:
    """An instance whose `probe` completed and whose `push` is flagged."""
    name = unique("resolve")
    await create_definition(client, name, STEPS)
    instance_id, _ = await insert_instance(
        pool, name, {"probe": done(), "push": push or flagged(now(), server="gone-1")}, status
    )
    return instance_id


def resolve_url(instance_id: str, step: str = "push") -> str:
    return f"/v1/instances/{instance_id}/activities/{step}/resolve"


async def resolve(
    client: httpx.AsyncClient, instance_id: str, who: str, **body: Any
) -> httpx.Response:
    return await client.post(resolve_url(instance_id), json=body, headers=as_principal(who))


async def assert_sent(
    client: httpx.AsyncClient, commands: AbstractQueue, instance_id: str, who: str, action: str
) -> None:
    """`who`'s `action` on the flag of `push` (no force) is accepted, and its command sent."""
    assert (await resolve(client, instance_id, who, action=action)).status_code == 202
    assert len(await drain(commands)) == 1


async def decisions(pool: asyncpg.Pool, instance_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT step, attempt, action, by, forced, requested_at FROM resolve_requests"
        " WHERE instance_id = $1 ORDER BY attempt",
        uuid.UUID(instance_id),
    )
    return rows


async def set_push(pool: asyncpg.Pool, instance_id: str, push: ActivityState) -> None:
    """As the scheduler writes the activity after applying a decision."""
    await pool.execute(
        "UPDATE activities SET status = $2, state = $3::jsonb WHERE instance_id = $1"
        " AND step = 'push'",
        uuid.UUID(instance_id),
        push.status.value,
        push.model_dump(mode="json"),
    )


async def test_two_resolves_at_the_same_moment_exactly_one_applies(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    for _ in range(5):  # several pairs, so that the race really happens
        instance_id = await flagged_instance(client, pool)
        skip, fail = await asyncio.gather(
            resolve(client, instance_id, "alice", action="skip", output={"by": "hand"}),
            resolve(client, instance_id, "bob", action="fail"),
        )
        statuses = sorted([skip.status_code, fail.status_code])
        assert statuses == [202, 409], (skip.text, fail.text)
        winner, loser = (skip, fail) if skip.status_code == 202 else (fail, skip)
        [row] = await decisions(pool, instance_id)
        won = ("alice", "skip") if winner is skip else ("bob", "fail")
        assert (row["by"], row["action"], row["attempt"]) == (*won, 1)
        problem = assert_problem(loser, 409)
        assert problem["type"] == "urn:paceline:problem:already-resolved"
        assert f"{won[0]} chose {won[1]} at " in problem["detail"]
        assert row["requested_at"].isoformat(timespec="milliseconds") in problem["detail"]
        [message] = await drain(commands)
        assert (body_of(message)["by"], body_of(message)["action"]) == won


async def test_a_later_resolve_of_the_same_attempt_names_the_first_decision(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id = await flagged_instance(client, pool)
    assert (await resolve(client, instance_id, "carol", action="retry")).status_code == 202
    # The scheduler has not applied it yet: the activity is still flagged at attempt 1.
    later = assert_problem(await resolve(client, instance_id, "dave", action="skip"), 409)
    assert later["type"].endswith("already-resolved")
    assert (
        "attempt 1 of activity 'push' was already resolved: carol chose retry" in (later["detail"])
    )
    # Applied: attempt 2 runs. A decision about attempt 1 still names the first one.
    await set_push(
        pool,
        instance_id,
        ActivityState(type="noop", status=ActivityStatus.SCHEDULED, attempt=2, restartable=False),
    )
    applied = assert_problem(await resolve(client, instance_id, "dave", action="fail"), 409)
    assert "carol chose retry" in applied["detail"]
    assert "now SCHEDULED at attempt 2" in applied["detail"]
    # Attempt 2 flagged in turn: a new decision, recorded apart from the first.
    await set_push(pool, instance_id, flagged(now(), server="gone-2", attempt=2))
    assert (await resolve(client, instance_id, "dave", action="fail")).status_code == 202
    assert [(r["attempt"], r["by"], r["action"]) for r in await decisions(pool, instance_id)] == [
        (1, "carol", "retry"),
        (2, "dave", "fail"),
    ]
    assert [body_of(m)["attempt"] for m in await drain(commands)] == [1, 2]


async def test_a_skipped_activity_names_the_decision_and_one_never_resolved_is_not_flagged(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    instance_id = await flagged_instance(client, pool)
    assert (await resolve(client, instance_id, "erin", action="skip")).status_code == 202
    await set_push(
        pool,
        instance_id,
        ActivityState(type="noop", status=ActivityStatus.SKIPPED, attempt=1, restartable=False),
    )
    problem = assert_problem(await resolve(client, instance_id, "fred", action="retry"), 409)
    assert problem["type"].endswith("already-resolved") and "erin chose skip" in problem["detail"]
    # Completed on its own (a late result): nobody decided, so it is simply not flagged.
    other = await flagged_instance(client, pool)
    await set_push(pool, other, done())
    problem = assert_problem(await resolve(client, other, "fred", action="retry"), 409)
    assert problem["type"].endswith("not-flagged")


async def test_a_decision_that_cannot_stage_its_command_is_not_recorded(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    instance_id = await flagged_instance(client, pool)

    async def broken_stage(*_: Any) -> None:
        raise asyncpg.exceptions.ConnectionDoesNotExistError("the connection was lost")

    with monkeypatch.context() as patch:
        patch.setattr(outbox, "stage", broken_stage)
        assert_problem(await resolve(client, instance_id, "gil", action="fail"), 503)
    assert await decisions(pool, instance_id) == []
    assert (await resolve(client, instance_id, "gil", action="fail")).status_code == 202
    assert [body_of(m)["by"] for m in await drain(commands)] == ["gil"]


async def test_no_resolve_while_a_cancel_is_requested_or_recorded(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    requested = await flagged_instance(client, pool)
    cancel = await client.post(f"/v1/instances/{requested}/cancel", headers=as_principal("hal"))
    assert cancel.status_code == 202, cancel.text
    await drain(commands)
    problem = assert_problem(await resolve(client, requested, "ivy", action="retry"), 409)
    assert problem["type"].endswith("instance-cancelling")
    assert "by hal" in problem["detail"]
    cancelling = await flagged_instance(client, pool, status=InstanceStatus.CANCELLING)
    problem = assert_problem(await resolve(client, cancelling, "ivy", action="skip"), 409)
    assert problem["type"].endswith("instance-cancelling")
    assert await decisions(pool, requested) == await decisions(pool, cancelling) == []
    assert await drain(commands, settle_s=0.05) == []


async def holder_of(client: httpx.AsyncClient, instance_id: str) -> dict[str, Any]:
    detail = (await client.get(f"/v1/instances/{instance_id}")).json()
    push = next(a for a in detail["activities"] if a["step"] == "push")
    holder: dict[str, Any] = push["flag"]["holder"]
    return holder


async def test_retry_while_the_holder_heartbeats_since_the_flag_needs_force(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    flagged_at = now() - timedelta(seconds=10)
    server = await insert_server(pool, silent_s=0.0)  # heartbeated just now
    instance_id = await flagged_instance(client, pool, flagged(flagged_at, server=server))
    await pool.execute(
        "UPDATE servers SET in_flight = $2::jsonb WHERE id = $1",
        server,
        [{"instance_id": instance_id, "step": "push", "attempt": 1}],
    )
    holder = await holder_of(client, instance_id)
    assert holder == {
        "server_id": server,
        "status": "ACTIVE",
        "last_heartbeat": holder["last_heartbeat"],
        "alive_since_flag": True,
        "lists_attempt_in_flight": True,
        "may_still_finish": True,
        "note": holder["note"],
    }
    assert datetime.fromisoformat(holder["last_heartbeat"]) > flagged_at + timedelta(seconds=1)
    assert holder["note"].startswith(f"{server} has heartbeated since the flag")
    assert "a broker connection blip, not a crash" in holder["note"]
    assert "may still finish" in holder["note"]
    # The same in the list of flags.
    flags = (await client.get("/v1/flags", params={"limit": 500})).json()["items"]
    [listed] = [f for f in flags if f["instance_id"] == instance_id]
    assert listed["flag"]["holder"] == holder

    refused = assert_problem(await resolve(client, instance_id, "jo", action="retry"), 409)
    assert refused["type"] == "urn:paceline:problem:holder-alive"
    assert server in refused["detail"] and '"force": true' in refused["detail"]
    unforced = await resolve(client, instance_id, "jo", action="retry", force=False)
    assert_problem(unforced, 409)
    assert await decisions(pool, instance_id) == []
    assert await drain(commands, settle_s=0.05) == []

    # Only a JSON true forces: a string that merely reads as one is refused.
    loose = assert_problem(
        await resolve(client, instance_id, "jo", action="retry", force="yes"), 422
    )
    assert [e["path"] for e in loose["errors"]] == ["force"]
    forced = await resolve(client, instance_id, "jo", action="retry", force=True)
    assert forced.status_code == 202, forced.text
    [row] = await decisions(pool, instance_id)
    assert (row["action"], row["by"], row["forced"]) == ("retry", "jo", True)
    [message] = await drain(commands)
    assert (body_of(message)["action"], body_of(message)["attempt"]) == ("retry", 1)
    assert body_of(message)["forced"] is True  # so that the history can say so
    # Decided: a later retry is told of that decision, whatever the holder does.
    again = assert_problem(await resolve(client, instance_id, "kay", action="retry"), 409)
    assert again["type"].endswith("already-resolved")
    assert "jo chose retry (forced) at " in again["detail"]


async def test_skip_and_fail_need_no_force_and_force_is_only_for_retry(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    server = await insert_server(pool, silent_s=0.0)
    instance_id = await flagged_instance(
        client, pool, flagged(now() - timedelta(seconds=10), server=server)
    )
    problem = assert_problem(
        await resolve(client, instance_id, "kim", action="skip", force=True), 422
    )
    assert [e["path"] for e in problem["errors"]] == ["force"]
    await assert_sent(client, commands, instance_id, "kim", "skip")


@pytest.mark.parametrize(
    ("server_status", "silent_s", "flag_age_s", "status"),
    [
        (ServerStatus.ACTIVE, 60.0, 120.0, "LOST"),  # silent past PACELINE_SERVER_LOST_AFTER_S
        (ServerStatus.DRAINED, 0.0, 10.0, "DRAINED"),  # reported DRAINED since the flag
        (ServerStatus.ACTIVE, 5.0, 2.0, "ACTIVE"),  # not heartbeated since the flag yet
        (ServerStatus.ACTIVE, 0.0, 0.5, "ACTIVE"),  # within a second of the flag: no proof
    ],
)
async def test_a_holder_not_alive_since_the_flag_allows_a_retry(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    commands: AbstractQueue,
    server_status: ServerStatus,
    silent_s: float,
    flag_age_s: float,
    status: str,
) -> None:
    server = await insert_server(pool, status=server_status, silent_s=silent_s)
    flagged_at = now() - timedelta(seconds=flag_age_s)
    instance_id = await flagged_instance(client, pool, flagged(flagged_at, server=server))
    holder = await holder_of(client, instance_id)
    assert (holder["server_id"], holder["status"]) == (server, status)
    assert (holder["alive_since_flag"], holder["may_still_finish"]) == (False, False)
    if status == "LOST":
        assert holder["note"].startswith(f"{server} is LOST")
    await assert_sent(client, commands, instance_id, "lee", "retry")


async def test_a_holder_not_in_the_registry_is_shown_unknown(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    instance_id = await flagged_instance(client, pool, flagged(now(), server="removed-1"))
    holder = await holder_of(client, instance_id)
    assert holder["server_id"] == "removed-1"
    assert (holder["status"], holder["last_heartbeat"], holder["alive_since_flag"]) == (
        None,
        None,
        False,
    )
    assert "not in the server registry" in holder["note"]
    await assert_sent(client, commands, instance_id, "max", "retry")


async def test_a_holder_that_reported_the_end_itself_is_alive_but_the_attempt_is_over(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    """An `outcome_unknown` flag comes from the holder's own result: it heartbeats, but the
    original attempt has ended and cannot finish, so a retry needs no force."""
    server = await insert_server(pool, silent_s=0.0)
    push = flagged(
        now() - timedelta(seconds=10), server=server, kind=FlagKind.OUTCOME_UNKNOWN.value
    )
    push = push.model_copy(update={"finished_at": now() - timedelta(seconds=10)})
    instance_id = await flagged_instance(client, pool, push)
    holder = await holder_of(client, instance_id)
    assert (holder["alive_since_flag"], holder["may_still_finish"]) == (True, False)
    assert "reported the end of attempt 1 itself" in holder["note"]
    await assert_sent(client, commands, instance_id, "ned", "retry")


async def test_a_holder_alive_that_no_longer_runs_the_attempt_allows_a_retry(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commands: AbstractQueue
) -> None:
    """A blip whose worker then dropped the attempt (its claim was refused once the flag was
    raised): it heartbeats, but its heartbeats no longer list the attempt, so nothing of it
    can finish and a retry needs no force."""
    server = await insert_server(pool, silent_s=0.0)  # heartbeated just now, listing nothing
    instance_id = await flagged_instance(
        client, pool, flagged(now() - timedelta(seconds=10), server=server)
    )
    holder = await holder_of(client, instance_id)
    assert (holder["alive_since_flag"], holder["lists_attempt_in_flight"]) == (True, False)
    assert holder["may_still_finish"] is False
    assert "no longer runs attempt 1" in holder["note"]
    await assert_sent(client, commands, instance_id, "ola", "retry")
