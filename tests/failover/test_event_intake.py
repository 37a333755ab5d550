"""An event posted while the admin process is SIGKILLed mid-request, then retried with the same
Idempotency-Key: exactly one set of instances, whichever side of the commit the kill fell on.

- After the commit, before the answer: the admin's broker connection goes through a proxy the
  test holds, so the start commands' publish waits for a confirm that does not come (the flush
  waits up to 5 s); the admin is killed once the event is seen committed. The retry answers the
  first answer (`duplicate: true`); the instances run, their commands published by the
  scheduler's outbox relay.
- Before the commit: the test holds an uncommitted row of the second trigger's dedupe key, so
  the admin's transaction waits with the event and the first instance written; the admin is
  killed there. Nothing of it remains, and the retry starts the whole set once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from failover.conftest import StackFactory, unique_name
from integration.harness import log_tail, wait_final, wait_for
from stack import Service, Stack

pytestmark = pytest.mark.integration


class HeldProxy:
    """A TCP proxy to the broker whose client-to-broker direction can be held: what the client
    sends meanwhile (a publish, a heartbeat) waits in the proxy, unanswered."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._parts = parts
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 5672
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> str:
        """Listen; the broker URL that goes through the proxy."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{port}"
        return urlunsplit(
            self._parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host)
        )

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
            await asyncio.gather(
                self._pipe(reader, up_writer, held=True),
                self._pipe(up_reader, writer, held=False),
                return_exceptions=True,
            )
        except (asyncio.CancelledError, OSError):
            writer.close()  # closed by the test, or the broker is away
        finally:
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, held: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if held:
                    await self._open.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


def two_triggers(name: str, kind: str) -> dict[str, Any]:
    """Every event of type `kind` starts two instances (one per trigger), each deduplicated
    by the event's id."""
    trigger = {
        "event": kind,
        "inputs": {"n": "${trigger.event.data.n}"},
        "dedupe": "${trigger.event.id}",
    }
    return {
        "name": name,
        "inputs": {"n": {"type": "integer"}},
        "steps": [
            {"id": "note", "type": "noop", "with": {"n": "${inputs.n}", "by": "${trigger.id}"}}
        ],
        "triggers": [{"id": "first", **trigger}, {"id": "second", **trigger}],
    }


async def admin_ready(api: httpx.AsyncClient, stack: Stack) -> None:
    async def ready() -> bool:
        for service in stack.services.values():
            if not service.alive():
                raise AssertionError(f"{service.name} died:\n{log_tail(service.log_path)}")
        try:
            return (await api.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    await wait_for(ready, 60, "the admin API to be ready", interval=0.3)


def admin_of(stack: Stack) -> Service:
    (admin,) = stack.of_kind("admin")
    return admin


async def connect(env: Any) -> asyncpg.Connection:
    conn = await asyncpg.connect(env.database_url)
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    return conn


async def started_by_event(conn: asyncpg.Connection, event_id: str) -> set[str]:
    rows = await conn.fetch("SELECT id FROM instances WHERE started_by = $1", f"event:{event_id}")
    return {str(r["id"]) for r in rows}


async def all_of(conn: asyncpg.Connection, definition: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, started_by, started_how, trigger->>'id' AS trigger FROM instances"
        " WHERE definition = $1",
        definition,
    )


async def test_killed_after_the_commit_the_retry_answers_the_first_answer(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack(workers=[{}])
    env = api.env  # type: ignore[attr-defined]
    proxy = HeldProxy(env.amqp_url)
    admin = admin_of(stack)
    admin.env["PACELINE_AMQP_URL"] = await proxy.start()
    stack.kill(admin.name)
    stack.start(admin.name)
    conn = await connect(env)
    try:
        await admin_ready(api, stack)
        kind, name, key = (
            f"kill.after.{uuid.uuid4().hex[:8]}",
            unique_name("after"),
            f"k-{uuid.uuid4()}",
        )
        assert (await api.post("/v1/definitions", json=two_triggers(name, kind))).status_code == 201
        event = {"type": kind, "id": "ev-after", "source": "test", "data": {"n": 7}}

        proxy.hold()  # the start commands' publish will wait for a confirm
        posting = asyncio.create_task(
            api.post("/v1/events", json=event, headers={"Idempotency-Key": key})
        )

        async def committed() -> asyncpg.Record | None:
            return await conn.fetchrow(
                "SELECT id, answer FROM events WHERE event_key = $1", f"key:{key}"
            )

        row = await wait_for(committed, 30, "the event to be committed", interval=0.02)
        assert not posting.done(), "answered before the kill: the test did not kill mid-request"
        stack.kill(admin.name)
        with pytest.raises(httpx.TransportError):
            await posting
        first = row["answer"]
        assert [s["outcome"] for s in first["instances"]] == ["started", "started"]
        proxy.release()
        stack.start(admin.name)
        await admin_ready(api, stack)

        retried = await api.post("/v1/events", json=event, headers={"Idempotency-Key": key})

        assert retried.status_code == 202, retried.text
        answer = retried.json()
        assert answer == {**first, "duplicate": True}
        assert answer["event_id"] == str(row["id"])
        named = {s["instance_id"] for s in answer["instances"]}
        assert await started_by_event(conn, answer["event_id"]) == named
        everything = await all_of(conn, name)
        assert sorted(r["trigger"] for r in everything) == ["first", "second"], "one set"
        # The killed admin never sent the start commands: the scheduler's relay did.
        done = await wait_final(api, named, timeout=90)
        assert {i["status"] for i in done.values()} == {"COMPLETED"}
        shown = (await api.get(f"/v1/events/{answer['event_id']}")).json()
        assert [s["status"] for s in shown["instances"]] == ["COMPLETED", "COMPLETED"]
    finally:
        await conn.close()
        await proxy.close()


async def test_killed_before_the_commit_nothing_remains_and_the_retry_starts_one_set(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack(workers=[{}])
    env = api.env  # type: ignore[attr-defined]
    admin = admin_of(stack)
    kind, name, key = (
        f"kill.before.{uuid.uuid4().hex[:8]}",
        unique_name("before"),
        f"k-{uuid.uuid4()}",
    )
    assert (await api.post("/v1/definitions", json=two_triggers(name, kind))).status_code == 201
    event = {"type": kind, "id": "ev-before", "source": "test", "data": {"n": 3}}
    conn = await connect(env)
    blocker = await asyncpg.connect(env.database_url)
    try:
        # An uncommitted claim of the second trigger's key: the admin's transaction waits on
        # it, holding the event's row and the first trigger's instance.
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute(
            "INSERT INTO trigger_dedupe (definition, trigger_id, dedupe_key, event, instance_id,"
            " expires_at) VALUES ($1, 'second', 'ev-before', $2, $3, now() + interval '1 hour')",
            name,
            uuid.uuid4(),
            uuid.uuid4(),
        )
        posting = asyncio.create_task(
            api.post("/v1/events", json=event, headers={"Idempotency-Key": key})
        )

        async def waiting() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE '%trigger_dedupe%'"
                )
            )

        await wait_for(
            waiting, 30, "the admin's transaction to wait on the dedupe key", interval=0.05
        )
        assert not posting.done()
        stack.kill(admin.name)
        with pytest.raises(httpx.TransportError):
            await posting
        await holding.rollback()

        async def ended() -> bool:  # the killed admin's backend is gone, its work undone
            return not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND query LIKE '%INSERT INTO trigger_dedupe AS d%'"
            )

        await wait_for(ended, 30, "the killed admin's database session to end")
        assert (
            await conn.fetchval("SELECT count(*) FROM events WHERE event_key = $1", f"key:{key}")
            == 0
        )
        assert await all_of(conn, name) == [], "nothing of the killed request remains"
        assert (
            await conn.fetchval("SELECT count(*) FROM trigger_dedupe WHERE definition = $1", name)
            == 0
        )

        stack.start(admin.name)
        await admin_ready(api, stack)
        retried = await api.post("/v1/events", json=event, headers={"Idempotency-Key": key})
        again = await api.post("/v1/events", json=event, headers={"Idempotency-Key": key})

        assert retried.status_code == 202, retried.text
        answer = retried.json()
        assert answer["duplicate"] is False
        assert [s["outcome"] for s in answer["instances"]] == ["started", "started"]
        assert again.json() == {**answer, "duplicate": True}
        named = {s["instance_id"] for s in answer["instances"]}
        assert await started_by_event(conn, answer["event_id"]) == named
        assert sorted(r["trigger"] for r in await all_of(conn, name)) == ["first", "second"]
        done = await wait_final(api, named, timeout=60)
        assert {i["status"] for i in done.values()} == {"COMPLETED"}
    finally:
        await blocker.close()
        await conn.close()
