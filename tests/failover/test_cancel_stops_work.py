"""Cancel stops work (DESIGN.md): nothing of a cancelled instance starts after the cancel is
answered (workers learn of cancels from the cancellations stream, with no round trip per
activity), and what runs is told to stop; the instance is CANCELLING until it has. A
non-restartable activity stopped while running may have had its effect: the history says so."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from effect_sink import Sink
from stack_env import queue_details

from failover.conftest import (
    StackFactory,
    as_principal,
    assert_work_queues_empty,
    busy_single_slot_worker,
    effect_path,
    history,
    post_command,
    sleep_until,
    start_flow,
    step_of,
    wait_running,
    wait_status,
)
from integration.harness import wait_for
from paceline_contracts.queues import Queue, queue_name

pytestmark = pytest.mark.integration

ONE_SLOT = {"PACELINE_WORKER_CONCURRENCY": "1"}


async def _cancel(
    api: httpx.AsyncClient, instance_id: str, by: str | None = None, reason: str | None = None
) -> httpx.Response:
    return await api.post(
        f"/v1/instances/{instance_id}/cancel",
        json={"reason": reason} if reason else None,
        headers=as_principal(api, by) if by else None,
    )


async def _noop_flow(api: httpx.AsyncClient) -> str:
    return await start_flow(api, "next", [{"id": "hello", "type": "noop", "with": {"x": 1}}])


async def _stop_note(api: httpx.AsyncClient, instance_id: str) -> dict | None:
    """The worker's own report that it dropped the instance's activity without starting it."""
    for h in await history(api, instance_id):
        said = h["reason"]
        if h["kind"] == "activity_cancelled" and "stopped by" in said and "before it" in said:
            return h
    return None


async def _dropped_unstarted(api: httpx.AsyncClient, instance_id: str, effects: Sink) -> dict:
    """Wait until a worker has handled the instance's activity message: dropped it (its report
    is in the history) or, wrongly, run it (a request arrived); returns the report."""

    async def handled() -> bool:
        return bool(effects.posts() or effects.gets() or await _stop_note(api, instance_id))

    await wait_for(handled, 60, f"a worker to handle the activity of {instance_id}")
    assert effects.posts() == {}, f"a POST of a cancelled instance was sent: {effects.posts()}"
    assert effects.gets() == 0, "a GET of a cancelled instance was sent"
    note = await _stop_note(api, instance_id)
    assert note is not None
    return note


def _trapping_shell(cleanup_s: float, kill_grace: float) -> dict:
    """A shell step that, told to stop (SIGTERM), keeps running `cleanup_s` before it exits."""
    script = f'trap "sleep {cleanup_s:g}; exit 0" TERM; sleep 60 & wait'
    return {
        "id": "run",
        "type": "shell.command",
        "with": {"argv": ["sh", "-c", script], "kill_grace": kill_grace},
    }


async def test_cancelled_running_shell_command_is_stopped_its_late_effect_never_happens(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api = await make_stack(workers=[ONE_SLOT])
    path = effect_path()
    script = f"sleep 10; {post_command(effects.url + path)}"
    step = {"id": "run", "type": "shell.command", "with": {"argv": ["sh", "-c", script]}}
    instance_id = await start_flow(api, "late", [step])
    holder = (await wait_running(api, instance_id, "run"))["claimed_by"]
    running_seen = time.time()
    # A second instance waits for the worker's only slot.
    follower = await _noop_flow(api)
    await asyncio.sleep(1)
    assert (await api.get(f"/v1/instances/{follower}")).json()["status"] != "COMPLETED"

    r = await _cancel(api, instance_id)
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("CANCELLING", "CANCELLED")
    done = await wait_status(api, instance_id, "CANCELLED", timeout=15)
    # Its slot is free: the follower runs long before the 10 s sleep would have ended.
    await wait_status(api, follower, "COMPLETED", timeout=20)

    run = step_of(done, "run")
    assert run["status"] == "CANCELLED"
    expected = f"cancelled while running on {holder}: outcome unknown"
    assert expected in run["reason"], run
    cancelled = [h for h in await history(api, instance_id) if h["kind"] == "activity_cancelled"]
    assert any(expected in h["reason"] for h in cancelled), cancelled
    # Had the command gone on, its POST would arrive 10 s after it started.
    await sleep_until(running_seen + 15)
    assert effects.count(path) == 0, "the cancelled command went on and had its effect"
    await assert_work_queues_empty(stack)


async def test_cancelled_long_sleep_frees_its_slot(make_stack: StackFactory) -> None:
    stack, api = await make_stack(workers=[ONE_SLOT])
    sleeper = await start_flow(
        api, "long", [{"id": "nap", "type": "sleep", "with": {"seconds": 60}}]
    )
    holder = (await wait_running(api, sleeper, "nap"))["claimed_by"]
    follower = await _noop_flow(api)
    await asyncio.sleep(1)
    assert (await api.get(f"/v1/instances/{follower}")).json()["status"] != "COMPLETED"

    r = await _cancel(api, sleeper)
    assert r.status_code == 202, r.text
    done = await wait_status(api, sleeper, "CANCELLED", timeout=15)
    # Well before the 60 s sleep would have ended.
    await wait_status(api, follower, "COMPLETED", timeout=20)
    nap = step_of(done, "nap")
    assert nap["status"] == "CANCELLED"
    assert f"cancelled while running on {holder}" in nap["reason"], nap
    assert "outcome unknown" not in nap["reason"], "a sleep has no effect to lose"
    await assert_work_queues_empty(stack)


async def test_cancelled_prefetched_activities_never_start(
    make_stack: StackFactory, effects: Sink
) -> None:
    # One slot; the worker also holds (prefetches) every message behind the running one.
    stack, api, sleeper, _ = await busy_single_slot_worker(make_stack, prefetch=4, nap_s=60)
    namespace = stack.env["PACELINE_NAMESPACE"]

    key = uuid.uuid4().hex[:8]
    waiting = {
        "get": await start_flow(
            api,
            "get",
            [{"id": "go", "type": "http.request", "with": {"url": f"{effects.url}/read/{key}"}}],
        ),
        "restartable-post": await start_flow(
            api,
            "rpost",
            [
                {
                    "id": "go",
                    "type": "http.request",
                    "restartable": True,
                    "with": {"method": "POST", "url": f"{effects.url}/effect/r-{key}"},
                }
            ],
        ),
        "post": await start_flow(
            api,
            "post",
            [
                {
                    "id": "go",
                    "type": "http.request",
                    "with": {"method": "POST", "url": f"{effects.url}/effect/n-{key}"},
                }
            ],
        ),
    }

    async def all_prefetched() -> str | None:
        details = (await queue_details(namespace)).get(queue_name(namespace, Queue.ACTIVITIES))
        if details != "messages_ready 0, messages_unacknowledged 4, consumers 1":
            return None
        for instance_id in waiting.values():
            body = (await api.get(f"/v1/instances/{instance_id}")).json()
            if step_of(body, "go")["status"] != "SCHEDULED":
                return None
        return details

    await wait_for(all_prefetched, 30, "the three messages to sit prefetched by the worker")

    for what, instance_id in waiting.items():
        r = await _cancel(api, instance_id, by="ops-cat")
        assert r.status_code == 202, (what, r.text)
        assert r.json()["status"] == "CANCELLED", (what, r.text)
    r = await _cancel(api, sleeper)
    assert r.status_code == 202, r.text
    await wait_status(api, sleeper, "CANCELLED", timeout=15)

    for what, instance_id in waiting.items():
        note = await _dropped_unstarted(api, instance_id, effects)
        assert note["step"] == "go", what
        body = (await api.get(f"/v1/instances/{instance_id}")).json()
        assert body["status"] == "CANCELLED", what
        go = step_of(body, "go")
        assert go["status"] == "CANCELLED", what
        assert go["reason"] == "cancelled by ops-cat before it started", (what, go)
        kinds = [h["kind"] for h in await history(api, instance_id)]
        assert "claimed" not in kinds, (what, kinds)
        assert "activity_completed" not in kinds, (what, kinds)
    await asyncio.sleep(2)
    assert effects.posts() == {}, "a request of a cancelled instance was sent"
    assert effects.gets() == 0, "a request of a cancelled instance was sent"
    await assert_work_queues_empty(stack)


async def test_worker_started_after_the_cancel_never_starts_its_activity(
    make_stack: StackFactory, effects: Sink
) -> None:
    # No worker yet: the activity message waits in the queue while the cancel is answered.
    stack, api = await make_stack(workers=[])
    path = effect_path()
    instance_id = await start_flow(
        api,
        "before",
        [
            {
                "id": "go",
                "type": "http.request",
                "restartable": True,
                "with": {"method": "POST", "url": f"{effects.url}{path}"},
            },
            {"id": "after", "type": "noop", "with": {}},
        ],
    )

    async def dispatched() -> bool:
        body = (await api.get(f"/v1/instances/{instance_id}")).json()
        return any(a["step"] == "go" for a in body["activities"])

    await wait_for(dispatched, 30, "the first step to be dispatched")
    r = await _cancel(api, instance_id)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "CANCELLED", r.text

    stack.add("activity-worker")  # it replays the cancellations stream before taking work
    note = await _dropped_unstarted(api, instance_id, effects)
    assert note["step"] == "go"
    await asyncio.sleep(2)
    assert effects.count(path) == 0, "the worker started an activity of a cancelled instance"
    body = (await api.get(f"/v1/instances/{instance_id}")).json()
    assert body["status"] == "CANCELLED"
    assert [a["step"] for a in body["activities"]] == ["go"]
    assert step_of(body, "go")["status"] == "CANCELLED"
    await assert_work_queues_empty(stack)


async def test_cancel_of_an_ended_instance_is_refused_naming_its_status(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack()
    completed = await _noop_flow(api)
    failed = await start_flow(
        api, "fails", [{"id": "run", "type": "shell.command", "with": {"argv": ["false"]}}]
    )
    await wait_status(api, completed, "COMPLETED")
    await wait_status(api, failed, "FAILED")
    for instance_id, status in ((completed, "COMPLETED"), (failed, "FAILED")):
        r = await _cancel(api, instance_id, by="ops-dan")
        assert r.status_code == 409, r.text
        problem = r.json()
        assert problem["type"].endswith("instance-ended"), problem
        assert status in problem["detail"], problem
        body = (await api.get(f"/v1/instances/{instance_id}")).json()
        assert body["status"] == status
        assert body["cancel"] is None
        reasons = [h["reason"] for h in await history(api, instance_id)]
        assert not any("ops-dan" in reason for reason in reasons), reasons
    await assert_work_queues_empty(stack)


async def test_repeated_cancel_answers_as_the_first_and_the_history_names_who_asked(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack()
    # Told to stop, it takes 10 s: the instance stays CANCELLING meanwhile.
    instance_id = await start_flow(api, "twice", [_trapping_shell(10, kill_grace=20)])
    await wait_running(api, instance_id, "run")

    first = await _cancel(api, instance_id, by="ops-alice", reason="wrong inputs")
    assert first.status_code == 202, first.text
    first_body = first.json()
    assert first_body["status"] == "CANCELLING"
    assert first_body["cancel"]["by"] == "ops-alice"
    assert first_body["cancel"]["reason"] == "wrong inputs"
    requested_at = first_body["cancel"]["requested_at"]

    again = await _cancel(api, instance_id, by="ops-bob", reason="me too")
    assert again.status_code == 202, again.text
    assert again.json()["status"] == "CANCELLING"
    assert again.json()["cancel"] == first_body["cancel"], "answered as the first was"

    await wait_status(api, instance_id, "CANCELLED", timeout=60)
    late = await _cancel(api, instance_id, by="ops-carol")
    assert late.status_code == 202, late.text
    assert late.json()["status"] == "CANCELLED"
    assert late.json()["cancel"]["by"] == "ops-alice"
    assert late.json()["cancel"]["requested_at"] == requested_at

    body = (await api.get(f"/v1/instances/{instance_id}")).json()
    assert body["cancel"]["by"] == "ops-alice"
    events = await history(api, instance_id)
    (cancelling,) = [h for h in events if h["kind"] == "instance_cancelling"]
    assert "ops-alice" in cancelling["reason"] and "wrong inputs" in cancelling["reason"]
    (cancelled,) = [h for h in events if h["kind"] == "instance_cancelled"]
    assert "ops-alice" in cancelled["reason"], cancelled
    for h in events:
        assert "ops-bob" not in h["reason"] and "ops-carol" not in h["reason"], h
    await assert_work_queues_empty(stack)


async def test_cancelling_is_visible_until_the_running_step_has_stopped(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack()
    instance_id = await start_flow(api, "slowstop", [_trapping_shell(4, kill_grace=8)])
    holder = (await wait_running(api, instance_id, "run"))["claimed_by"]

    r = await _cancel(api, instance_id, by="ops-eve")
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "CANCELLING"
    body = (await api.get(f"/v1/instances/{instance_id}")).json()
    assert body["status"] == "CANCELLING"
    assert body["cancel"]["by"] == "ops-eve"
    assert body["cancel"]["recorded"] is True
    assert body["cancel"]["waiting_for"] == [{"step": "run", "attempt": 1, "server": holder}]
    run = step_of(body, "run")
    assert run["status"] == "RUNNING"
    assert holder in run["reason"] and "told to stop" in run["reason"], run

    done = await wait_status(api, instance_id, "CANCELLED", timeout=30)
    assert done["cancel"]["waiting_for"] == []
    run = step_of(done, "run")
    assert run["status"] == "CANCELLED"
    assert f"cancelled while running on {holder}: outcome unknown" in run["reason"], run
    events = await history(api, instance_id)
    kinds = [h["kind"] for h in events]
    assert kinds.index("instance_cancelling") < kinds.index("instance_cancelled")
    (cancelling,) = [h for h in events if h["kind"] == "instance_cancelling"]
    assert f"run on {holder}" in cancelling["reason"], cancelling
    await assert_work_queues_empty(stack)
