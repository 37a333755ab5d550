"""A process runs end to end through the four real services over RabbitMQ and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import datetime

import asyncpg
import httpx
import pytest
from stack_env import StackEnv, queue_depths

from integration.harness import wait_final, wait_for
from paceline_contracts.queues import Queue, dead_queue_name, queue_name
from stack import Stack

pytestmark = pytest.mark.integration

FLOW = {
    "name": "add-device",
    "inputs": {"host": {"type": "string"}, "known": {"type": "integer", "default": 404}},
    "steps": [
        {"id": "lookup", "type": "noop", "with": {"status": "${inputs.known}"}},
        {
            "id": "check",
            "if": "steps.lookup.output.status == 200",
            "then": [{"id": "note", "type": "noop", "with": {"msg": "already there"}}],
            "else": [
                {
                    "id": "add",
                    "type": "shell.command",
                    "with": {"argv": ["echo", "added ${inputs.host}"]},
                },
            ],
        },
        {
            "id": "both",
            "parallel": [
                [{"id": "a", "type": "sleep", "with": {"seconds": 0.3}}],
                [
                    {
                        "id": "b",
                        "type": "noop",
                        "with": {"said": "${steps.add.output.stdout}", "n": "${inputs.known + 1}"},
                    }
                ],
            ],
        },
        {"id": "last", "type": "noop", "with": {"slept": "${steps.a.output.slept}"}},
    ],
}


async def test_definition_with_sequence_condition_and_parallel_completes(
    api: httpx.AsyncClient, env: StackEnv
) -> None:
    created = await api.post("/v1/definitions", json=FLOW)
    assert created.status_code == 201, created.text
    started = await api.post(
        "/v1/instances", json={"definition": "add-device", "inputs": {"host": "sw1"}}
    )
    assert started.status_code == 202, started.text
    instance_id = started.json()["id"]

    instance = (await wait_final(api, [instance_id]))[instance_id]

    assert instance["status"] == "COMPLETED", instance
    steps = {a["step"]: a for a in instance["activities"]}
    assert set(steps) == {"lookup", "add", "a", "b", "last"}  # `note` was on the other branch
    assert all(a["status"] == "COMPLETED" and a["attempts"] == 1 for a in steps.values())
    assert steps["add"]["restartable"] is False and steps["lookup"]["restartable"] is True
    # Outputs flowed from step to step, keeping their types.
    assert steps["add"]["output"]["stdout"] == "added sw1\n"
    assert steps["b"]["output"] == {"said": "added sw1\n", "n": 405}
    assert steps["last"]["output"] == {"slept": 0.3}
    assert instance["outputs"]["b"] == {"said": "added sw1\n", "n": 405}
    assert len(instance["trace_id"]) == 32

    history = (await api.get(f"/v1/instances/{instance_id}/history")).json()
    kinds = [h["kind"] for h in (history["items"] if isinstance(history, dict) else history)]
    assert kinds[0] == "started" and kinds[-1] == "instance_completed"
    assert "branch_taken" in kinds

    report = await _report_row(env, instance_id)
    assert report["status"] == "COMPLETED"
    assert report["definition"] == "add-device" and report["version"] >= 1
    assert report["started_how"] == "api"
    started_at = datetime.fromisoformat(instance["started_at"])
    finished_at = datetime.fromisoformat(instance["finished_at"])
    expected_ms = (finished_at - started_at).total_seconds() * 1000
    assert report["duration_ms"] >= 300  # the parallel sleep alone takes 0.3 s
    assert abs(report["duration_ms"] - expected_ms) <= 1


async def _report_row(env: StackEnv, instance_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(env.reporting_url)
    try:

        async def row() -> asyncpg.Record | None:
            r = await conn.fetchrow(
                "SELECT * FROM instance_reports WHERE instance_id = $1::uuid", instance_id
            )
            return r if r is not None and r["status"] == "COMPLETED" else None

        return await wait_for(row, 30, "the reporting row")
    finally:
        await conn.close()


async def test_500_instances_started_at_once_all_complete_and_queues_drain(
    api: httpx.AsyncClient, env: StackEnv, stack: Stack
) -> None:
    flow = {
        "name": "burst",
        "inputs": {"n": {"type": "integer"}},
        "steps": [
            {"id": "one", "type": "noop", "with": {"n": "${inputs.n}"}},
            {
                "id": "fan",
                "parallel": [
                    [{"id": "two", "type": "noop", "with": {"n": "${steps.one.output.n * 2}"}}],
                    [{"id": "three", "type": "noop", "with": {"n": "${steps.one.output.n * 3}"}}],
                ],
            },
        ],
    }
    assert (await api.post("/v1/definitions", json=flow)).status_code == 201
    limits = asyncio.Semaphore(50)

    async def start(n: int) -> str:
        async with limits:
            r = await api.post("/v1/instances", json={"definition": "burst", "inputs": {"n": n}})
            assert r.status_code == 202, r.text
            return str(r.json()["id"])

    ids = await asyncio.gather(*(start(n) for n in range(500)))
    assert len(set(ids)) == 500

    async def all_completed() -> bool:
        r = await api.get(
            "/v1/instances", params={"definition": "burst", "status": "COMPLETED", "limit": 500}
        )
        return len(r.json()["items"]) == 500

    await wait_for(all_completed, 120, "500 instances to complete", interval=1.0)
    sample = (await api.get(f"/v1/instances/{ids[7]}")).json()
    assert {a["step"]: a["output"] for a in sample["activities"]} == {
        "one": {"n": 7},
        "two": {"n": 14},
        "three": {"n": 21},
    }

    async def drained() -> dict[str, int] | None:
        depths = await queue_depths(env.namespace)
        # Dead-letter queues included: the garbled-message tests take theirs back out.
        expected = {queue_name(env.namespace, q) for q in Queue}
        expected |= {dead_queue_name(env.namespace, q) for q in Queue}
        # (The namespace's cancellations stream keeps what it got: it is never empty.)
        return (
            depths if expected <= depths.keys() and not any(depths[q] for q in expected) else None
        )

    await wait_for(drained, 30, "every queue to be empty", interval=1.0)
    for service in stack.services.values():
        assert service.alive(), f"{service.name} died"
