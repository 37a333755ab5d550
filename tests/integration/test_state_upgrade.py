"""An instance started before the upgrade to activity rows (migration 0005) finishes after it.

The process database is built with migrations 0001-0004 only, and holds what the scheduler of
that version stored for an instance half way through: one `instances.state` document with every
activity in it, and a parallel step in progress (one branch done, the other's last activity
dispatched, its message in the activities queue). Then the stack starts as an upgrade starts
it (`paceline-scheduler migrate`, which applies 0005, then the services), and the instance must
run to its end: the parallel step joins by the count the upgrade derived from the old document,
a condition and later steps read outputs recorded before the upgrade, and the admin API shows
every activity, old and new, in definition order.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from stack_env import StackEnv, drop_everything

from integration.conftest import start_stack, wait_ready
from integration.harness import log_tail, wait_final
from paceline_contracts.messages import ActivityTask
from paceline_contracts.queues import Queue
from paceline_contracts.states import ActivityStatus
from paceline_engine.definitions import parse_definition
from paceline_engine.state import ActivityState
from paceline_infra import db, telemetry
from paceline_infra.amqp import Publisher
from paceline_infra.outbox import OutboxMessage
from stack import Stack

pytestmark = pytest.mark.integration

WHO = "sw-upgrade-7"
"""The input, echoed by `a`, read after the upgrade through `a`'s output only."""

DEFINITION: dict[str, Any] = {
    "name": "upgrade-flow",
    "inputs": {"who": {"type": "string"}},
    "steps": [
        {"id": "a", "type": "noop", "with": {"token": "${inputs.who}", "go": True}},
        {
            "id": "p",
            "parallel": [
                [{"id": "p1", "type": "noop", "with": {"n": 1}}],
                [
                    {"id": "p2", "type": "noop", "with": {"n": 2}},
                    {"id": "p3", "type": "noop", "with": {"n": 3, "a": "${steps.a.output.token}"}},
                ],
            ],
        },
        {
            "id": "c",
            "if": "steps.a.output.go == true",
            "then": [{"id": "t", "type": "noop", "with": {"from_a": "${steps.a.output.token}"}}],
            "else": [{"id": "e", "type": "noop", "with": {}}],
        },
        {
            "id": "z",
            "type": "noop",
            "with": {
                "a": "${steps.a.output.token}",
                "p1": "${steps.p1.output.n}",
                "p3": "${steps.p3.output.a}",
                "t": "${steps.t.output.from_a}",
            },
        },
    ],
}

A_OUTPUT = {"token": WHO, "go": True}
P3_PARAMS = {"n": 3, "a": WHO}
"""What the old scheduler rendered into p3's message (its `with`, `a` read from `a`'s output)."""

OLD_WORKER = "activity-worker-oldhost-4242-a1b2c3"
"""The worker of the version before, long gone."""

PRE_UPGRADE = ("0001", "0002", "0003", "0004")
"""The scheduler's migrations before the activity rows."""


@pytest.fixture
async def env() -> AsyncIterator[StackEnv]:
    """Names of its own: the stack starts on a database the test built by hand."""
    env = StackEnv.fresh("plupg")
    yield env
    if not os.environ.get("PACELINE_KEEP_TEST_DATA"):
        await drop_everything(env)


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    """The stack the test starts, stopped whatever happens (before `env` drops its names)."""
    started: list[Stack] = []
    yield started
    for stack in started:
        stack.stop_all(timeout=30)


def _old_activity(
    status: ActivityStatus, started: datetime | None, output: Any = None, *, done: bool = True
) -> dict[str, Any]:
    """An activity document exactly as the engine of the version before stored it (its
    ActivityState did not change): a noop, restartable, first attempt."""
    claimed = started is not None
    return ActivityState(
        type="noop",
        status=status,
        attempt=1,
        message_attempt=1,
        restartable=True,
        server_id=OLD_WORKER if claimed else None,
        started_at=started,
        finished_at=started + timedelta(milliseconds=20) if claimed and done else None,
        output=output,
        reason="its turn came",
        claimed_by=OLD_WORKER if claimed else None,
        claimed_at=started,
    ).model_dump(mode="json")


def _migration_versions() -> list[str]:
    source = files("paceline_scheduler") / "migrations"
    return [f.name[:4] for f in source.iterdir() if f.name.endswith(".sql")]


async def _build_pre_upgrade_database(env: StackEnv, tmp_path: Path) -> None:
    migrations = tmp_path / "migrations-0001-0004"
    migrations.mkdir()
    source = files("paceline_scheduler") / "migrations"
    for f in source.iterdir():
        if f.name.startswith(PRE_UPGRADE):
            shutil.copyfile(str(f), migrations / f.name)
    applied = await db.migrate(env.database_url, migrations)
    assert [name[:4] for name in applied] == list(PRE_UPGRADE), applied


async def _store_old_instance(env: StackEnv, instance_id: uuid.UUID, trace_id: str) -> None:
    """The definition, the instance and its history, as the scheduler before 0005 wrote them."""
    parse_definition(DEFINITION)  # a definition the admin API would have accepted
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    activities = {
        "a": _old_activity(ActivityStatus.COMPLETED, t0, A_OUTPUT),
        "p1": _old_activity(ActivityStatus.COMPLETED, t0 + timedelta(seconds=1), {"n": 1}),
        "p2": _old_activity(ActivityStatus.COMPLETED, t0 + timedelta(seconds=1), {"n": 2}),
        # Dispatched when p2 completed; its message is in the queue, nobody has claimed it.
        "p3": _old_activity(ActivityStatus.SCHEDULED, None),
    }
    # The old InstanceState's keys, written by hand: that shape is what 0005 carries over.
    document = {
        "status": "RUNNING",
        "inputs": {"who": WHO},
        "activities": activities,
        "branches": {},
        "outputs": None,
        "error": None,
        "started_at": t0.isoformat(),
        "finished_at": None,
        "seq": 7,
        "cancel": None,
    }
    traceparent = f"00-{trace_id}-{'ab' * 8}-01"
    conn = await asyncpg.connect(env.database_url)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO definitions (name, version, body) VALUES ($1, 1, $2::jsonb)",
                DEFINITION["name"],
                json.dumps(DEFINITION),
            )
            await conn.execute(
                """
                INSERT INTO instances (id, definition, version, status, state, trace_id,
                                       traceparent, started_by, started_how, created_at)
                VALUES ($1, $2, 1, 'RUNNING', $3::jsonb, $4, $5, 'admin', 'api', $6)
                """,
                instance_id,
                DEFINITION["name"],
                json.dumps(document),
                trace_id,
                traceparent,
                t0,
            )
            history = [
                ("started", None, None, "started by admin"),
                ("dispatched", "a", 1, "its turn came"),
                ("activity_completed", "a", 1, f"attempt 1 completed on {OLD_WORKER}"),
                ("dispatched", "p1", 1, "its turn came"),
                ("dispatched", "p2", 1, "its turn came"),
                ("activity_completed", "p1", 1, f"attempt 1 completed on {OLD_WORKER}"),
                ("activity_completed", "p2", 1, f"attempt 1 completed on {OLD_WORKER}"),
                ("dispatched", "p3", 1, "its turn came"),
            ]
            await conn.executemany(
                "INSERT INTO history (instance_id, at, kind, step, attempt, reason, data)"
                " VALUES ($1, $2, $3, $4, $5, $6, '{}'::jsonb)",
                [(instance_id, t0, k, s, n, r) for k, s, n, r in history],
            )
    finally:
        await conn.close()


async def _publish_old_message(env: StackEnv, instance_id: uuid.UUID, trace_id: str) -> None:
    """p3's activity message, as the old scheduler's `to_outbox` and outbox flush sent it:
    an `activity.task`, persistent, on the namespace's exchange to the activities queue."""
    task = ActivityTask(
        instance_id=instance_id,
        step="p3",
        activity_type="noop",
        params=P3_PARAMS,
        attempt=1,
        restartable=True,
        timeout_s=None,
        isolated=False,
    )
    headers = {"traceparent": f"00-{trace_id}-{'cd' * 8}-01"}
    connection = await aio_pika.connect_robust(env.amqp_url)
    try:
        publisher = await Publisher.open(connection, env.namespace)
        message = OutboxMessage.of(Queue.ACTIVITIES, task, context=telemetry.extract(headers))
        await publisher.publish(message.outgoing())
    finally:
        await connection.close()


async def _pages(api: httpx.AsyncClient, instance_id: uuid.UUID) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"status": "COMPLETED", "limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        answer = await api.get(f"/v1/instances/{instance_id}/activities", params=params)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert all(item["status"] == "COMPLETED" for item in body["items"]), body
        pages.append([item["step"] for item in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 10, pages


async def test_instance_started_before_the_upgrade_finishes_after_it(
    env: StackEnv, tmp_path: Path, stacks: list[Stack]
) -> None:
    instance_id = uuid.uuid4()
    trace_id = uuid.uuid4().hex
    await _build_pre_upgrade_database(env, tmp_path)
    await _store_old_instance(env, instance_id, trace_id)
    await _publish_old_message(env, instance_id, trace_id)

    # The upgrade: `paceline-scheduler migrate` applies 0005, then the services start.
    stack = start_stack(env, tmp_path / "logs", workers=1)
    stacks.append(stack)
    await wait_ready(env, stack)

    async with httpx.AsyncClient(
        base_url=env.base_url, headers={"Authorization": f"Bearer {env.token}"}, timeout=30
    ) as api:
        try:
            instance = (await wait_final(api, [str(instance_id)], timeout=60))[str(instance_id)]
        except AssertionError as exc:
            now = (await api.get(f"/v1/instances/{instance_id}")).json()
            logs = "\n".join(
                f"--- {s.name}\n{log_tail(s.log_path, 15)}" for s in stack.services.values()
            )
            raise AssertionError(f"{exc}\ninstance now: {now}\n{logs}") from exc

        assert instance["status"] == "COMPLETED", instance
        steps = [a["step"] for a in instance["activities"]]
        # Every activity, old and new, in definition order (`e` was on the branch not taken).
        assert steps == ["a", "p1", "p2", "p3", "t", "z"], instance["activities"]
        assert instance["activity_count"] == 6
        assert instance["activities_truncated"] is False
        by_step = {a["step"]: a for a in instance["activities"]}
        assert all(a["status"] == "COMPLETED" for a in by_step.values()), by_step
        # The activities done before the upgrade are as they were.
        assert by_step["a"]["server"] == OLD_WORKER and by_step["a"]["output"] == A_OUTPUT
        assert by_step["p1"]["output"] == {"n": 1} and by_step["p2"]["output"] == {"n": 2}
        # p3 ran from the message the old scheduler sent, once, on a worker of this stack.
        assert by_step["p3"]["attempts"] == 1
        assert by_step["p3"]["output"] == P3_PARAMS
        assert by_step["p3"]["server"] not in (None, OLD_WORKER)
        # The parallel step joined, the condition read a's carried-over output and took `then`,
        # and the later steps' `with` read outputs from before and after the upgrade.
        assert by_step["t"]["output"] == {"from_a": WHO}
        assert by_step["z"]["output"] == {"a": WHO, "p1": 1, "p3": WHO, "t": WHO}
        assert instance["outputs"] == {
            "a": A_OUTPUT,
            "p1": {"n": 1},
            "p2": {"n": 2},
            "p3": P3_PARAMS,
            "t": {"from_a": WHO},
            "z": {"a": WHO, "p1": 1, "p3": WHO, "t": WHO},
        }

        history = (await api.get(f"/v1/instances/{instance_id}/history")).json()
        entries = history["items"] if isinstance(history, dict) else history
        kinds = [(h["kind"], h["step"]) for h in entries]
        assert kinds[:8] == [
            ("started", None),
            ("dispatched", "a"),
            ("activity_completed", "a"),
            ("dispatched", "p1"),
            ("dispatched", "p2"),
            ("activity_completed", "p1"),
            ("activity_completed", "p2"),
            ("dispatched", "p3"),
        ], kinds
        for entry in (
            ("activity_completed", "p3"),
            ("branch_taken", "c"),
            ("dispatched", "t"),
            ("dispatched", "z"),
            ("instance_completed", None),
        ):
            assert entry in kinds[8:], kinds
        assert ("dispatched", "e") not in kinds

        # The list endpoint pages through every one of them, in definition order: the
        # upgrade gave the carried-over rows their positions.
        pages = await _pages(api, instance_id)
        assert all(1 <= len(page) <= 2 for page in pages), pages
        listed = [step for page in pages for step in page]
        assert listed == ["a", "p1", "p2", "p3", "t", "z"], pages

    conn = await asyncpg.connect(env.database_url)
    try:
        applied = await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")
        versions = [r["name"][:4] for r in applied]
        assert versions[: len(PRE_UPGRADE) + 1] == [*PRE_UPGRADE, "0005"]
        assert versions == sorted(_migration_versions()), "every migration applied, in order"
        rows = await conn.fetch(
            "SELECT step, status, state::text AS state FROM activities WHERE instance_id = $1",
            instance_id,
        )
        assert {r["step"]: r["status"] for r in rows} == dict.fromkeys(
            ["a", "p1", "p2", "p3", "t", "z"], "COMPLETED"
        )
        for r in rows:
            ActivityState.model_validate_json(r["state"])  # each row is an engine ActivityState
        document = json.loads(
            await conn.fetchval("SELECT state::text FROM instances WHERE id = $1", instance_id)
        )
        assert "activities" not in document and "outputs" not in document, document
        assert document["counts"] == {"COMPLETED": 6}, document
        assert document["status"] == "COMPLETED"
        assert document["seq"] > 7
        assert not document.get("joins") and not document.get("branches"), document
        assert document["inputs"] == {"who": WHO}
    finally:
        await conn.close()
