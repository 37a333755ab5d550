"""Durable waits and signals (issue 9, section 2) with services as real processes: timers that
outlive a SIGKILLed scheduler and fire exactly once, signals sent before their wait, signals
racing a timeout, idempotent signals, a wait's `when`, and the cancel of a WAITING instance.

Every time compared here is the database's (the history's `at`, `waiting_for.due_at`), except
where a test strikes at a moment: the database runs on this machine, so its clock is ours."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from stack_env import StackEnv, drop_everything

from integration.conftest import start_stack, wait_ready
from integration.harness import wait_final, wait_for
from stack import Stack

pytestmark = pytest.mark.integration

_DUE_AT = re.compile(r"due at (\S+)$")


# --- helpers -------------------------------------------------------------------------------------


async def define(api: httpx.AsyncClient, steps: list[dict], inputs: dict | None = None) -> str:
    name = f"wait-{uuid.uuid4().hex[:8]}"
    body: dict[str, Any] = {"name": name, "steps": steps}
    if inputs:
        body["inputs"] = inputs
    created = await api.post("/v1/definitions", json=body)
    assert created.status_code == 201, created.text
    return name


async def start(api: httpx.AsyncClient, definition: str, inputs: dict | None = None) -> str:
    started = await api.post(
        "/v1/instances", json={"definition": definition, "inputs": inputs or {}}
    )
    assert started.status_code == 202, started.text
    return str(started.json()["id"])


async def instance(api: httpx.AsyncClient, instance_id: str) -> dict:
    r = await api.get(f"/v1/instances/{instance_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def history(api: httpx.AsyncClient, instance_id: str) -> list[dict]:
    r = await api.get(f"/v1/instances/{instance_id}/history")
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def signals_of(api: httpx.AsyncClient, instance_id: str) -> list[dict]:
    r = await api.get(f"/v1/instances/{instance_id}/signals")
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def send(
    api: httpx.AsyncClient,
    instance_id: str,
    name: str,
    payload: dict | None = None,
    key: str | None = None,
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await api.post(
        f"/v1/instances/{instance_id}/signals/{name}",
        json={"payload": payload or {}},
        headers=headers,
    )


async def wait_waiting(api: httpx.AsyncClient, instance_id: str, timeout: float = 30) -> dict:
    """Wait until the instance is WAITING; returns it (with its `waiting_for`)."""

    async def waiting() -> dict | None:
        body = await instance(api, instance_id)
        assert body["status"] not in ("COMPLETED", "FAILED", "CANCELLED"), body
        return body if body["status"] == "WAITING" and body["waiting_for"] else None

    return dict(await wait_for(waiting, timeout, f"{instance_id} to be WAITING", interval=0.05))


def step_of(body: dict, step: str) -> dict:
    found = [a for a in body["activities"] if a["step"] == step]
    assert len(found) == 1, (step, body["activities"])
    return found[0]


def entries(events: list[dict], kind: str, step: str | None = None) -> list[dict]:
    return [e for e in events if e["kind"] == kind and (step is None or e["step"] == step)]


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


# --- 1. timers across a scheduler's SIGKILL ------------------------------------------------------

TIMER_STEPS = [
    {"id": "settle", "wait": {"for": "3s"}},
    {"id": "after", "type": "noop", "with": {"waited": "${steps.settle.output.waited_s}"}},
]
TIMER_S = 3.0
BATCH = 20


@pytest.fixture
async def own_stack(tmp_path: Path) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    """A stack of its own with two schedulers (the session's stack is not for killing)."""
    env = StackEnv.fresh("plwait")
    stack = start_stack(env, tmp_path / "logs", workers=1)
    stack.add("scheduler")
    try:
        await wait_ready(env, stack)
        async with httpx.AsyncClient(
            base_url=env.base_url, headers={"Authorization": f"Bearer {env.token}"}, timeout=30
        ) as api:
            yield stack, api
    finally:
        stack.stop_all(timeout=30)
        if not os.environ.get("PACELINE_KEEP_TEST_DATA"):
            await drop_everything(env)


async def start_timer_batch(api: httpx.AsyncClient, definition: str) -> dict[str, datetime]:
    """Start BATCH instances; returns each one's due time as `waiting_for` shows it."""
    ids = await asyncio.gather(*(start(api, definition) for _ in range(BATCH)))
    bodies = await asyncio.gather(*(wait_waiting(api, i) for i in ids))
    due: dict[str, datetime] = {}
    for instance_id, body in zip(ids, bodies, strict=True):
        [wait] = body["waiting_for"]
        assert wait["kind"] == "timer" and wait["step"] == "settle", wait
        assert wait["signal"] is None
        due[instance_id] = moment(wait["due_at"])
    return due


async def check_timer_batch(
    api: httpx.AsyncClient, due: dict[str, datetime]
) -> dict[str, tuple[datetime, float]]:
    """Every instance COMPLETED, its timer fired exactly once, not early, its due time what it
    was before the crash; returns (when it fired, the lateness recorded) by instance."""
    done = await wait_final(api, due, timeout=60)
    fired: dict[str, tuple[datetime, float]] = {}
    for instance_id, due_at in due.items():
        body = done[instance_id]
        assert body["status"] == "COMPLETED", body
        assert body["waiting_for"] == []
        settle, after = step_of(body, "settle"), step_of(body, "after")
        assert settle["status"] == "COMPLETED" and settle["output"]["resolved_by"] == "timer"
        assert settle["output"]["waited_s"] >= TIMER_S - 0.001, settle
        assert after["status"] == "COMPLETED" and after["attempts"] == 1, after
        events = await history(api, instance_id)
        # The wait started once: one `waiting`, its due time started + 3 s, as before the crash.
        [waiting] = entries(events, "waiting", "settle")
        match = _DUE_AT.search(waiting["reason"])
        assert match, waiting
        recorded_due = moment(match.group(1))
        assert abs(recorded_due - (moment(waiting["at"]) + timedelta(seconds=TIMER_S))) < (
            timedelta(milliseconds=1)
        ), waiting
        assert abs(recorded_due - due_at) < timedelta(milliseconds=1), (waiting, due_at)
        assert moment(settle["started_at"]) == moment(waiting["at"])
        # Fired exactly once: one `wait_ended`; a duplicate timer may only be `ignored`.
        ended = entries(events, "wait_ended", "settle")
        assert len(ended) == 1, ended
        [end] = ended
        assert end["data"]["resolved_by"] == "timer", end
        fired_at = moment(end["at"])
        lateness = end["data"]["lateness_s"]
        assert fired_at >= due_at, (end, due_at)
        assert lateness >= 0
        assert abs(lateness - (fired_at - due_at).total_seconds()) < 0.005, (end, due_at)
        for ignored in entries(events, "ignored", "settle"):
            assert "after the wait had ended" in ignored["reason"], ignored
        assert len(entries(events, "dispatched", "after")) == 1
        assert len(entries(events, "instance_completed")) == 1
        fired[instance_id] = (fired_at, lateness)
    return fired


async def test_timers_fire_exactly_once_across_a_scheduler_sigkill(
    own_stack: tuple[Stack, httpx.AsyncClient],
) -> None:
    stack, api = own_stack
    definition = await define(api, TIMER_STEPS)

    # (a) Every scheduler is SIGKILLed right before the timers come due; they come due while
    # none runs; one scheduler is started again and fires each of them once, late.
    due = await start_timer_batch(api, definition)
    first_due = min(due.values()).timestamp()
    await sleep_until(first_due - 0.2)
    killed_at = time.time()
    stack.kill("scheduler-1")
    stack.kill("scheduler-2")
    await sleep_until(max(due.values()).timestamp() + 1.0)
    restarted_at = time.time()
    stack.start("scheduler-1")
    fired = await check_timer_batch(api, due)
    held = [i for i, d in due.items() if d.timestamp() > killed_at + 0.05]
    assert len(held) >= BATCH // 2, (
        f"the test was too slow: only {len(held)} timers were due after the kill"
    )
    for instance_id in held:
        fired_at, lateness = fired[instance_id]
        # Nothing fires while no scheduler runs; its lateness says how long it waited for one.
        assert fired_at.timestamp() >= restarted_at - 0.05, (fired_at, restarted_at)
        assert lateness >= restarted_at - due[instance_id].timestamp() - 0.05, lateness

    # (b) Two schedulers; one is SIGKILLed while the timers come due; the survivor fires them.
    stack.start("scheduler-2")
    await asyncio.sleep(1.0)
    due = await start_timer_batch(api, definition)
    window = sorted(d.timestamp() for d in due.values())
    await sleep_until(window[len(window) // 2])
    stack.kill("scheduler-1")
    await check_timer_batch(api, due)
    assert not stack.services["scheduler-1"].alive()
    assert stack.services["scheduler-2"].alive()


# --- 2. a signal before its wait -----------------------------------------------------------------


async def test_signal_sent_before_its_wait_is_buffered_then_delivered(
    api: httpx.AsyncClient,
) -> None:
    definition = await define(
        api,
        [
            {"id": "first", "type": "sleep", "with": {"seconds": 2}},
            {"id": "ready", "wait": {"signal": "go", "timeout": "30s"}},
            {
                "id": "after",
                "type": "noop",
                "with": {"x": "${steps.ready.output.signal.payload.x}"},
            },
        ],
    )
    instance_id = await start(api, definition)

    async def sleeping() -> bool:
        body = await instance(api, instance_id)
        return any(a["step"] == "first" and a["status"] == "RUNNING" for a in body["activities"])

    await wait_for(sleeping, 30, "the sleep to run", interval=0.05)
    sent = await send(api, instance_id, "go", {"x": 7}, key="early-1")
    assert sent.status_code == 202, sent.text
    assert sent.json()["status"] == "BUFFERED", sent.text
    signal_id = sent.json()["signal_id"]
    [buffered] = await signals_of(api, instance_id)
    assert buffered["signal_id"] == signal_id
    assert buffered["status"] == "BUFFERED" and buffered["step"] is None, buffered
    body = await instance(api, instance_id)
    assert body["status"] == "RUNNING" and body["waiting_for"] == [], body

    done = (await wait_final(api, [instance_id], timeout=30))[instance_id]
    assert done["status"] == "COMPLETED", done
    ready = step_of(done, "ready")
    assert ready["status"] == "COMPLETED"
    assert ready["output"]["resolved_by"] == "signal"
    assert ready["output"]["signal"]["id"] == signal_id
    assert ready["output"]["signal"]["payload"] == {"x": 7}
    assert ready["output"]["waited_s"] < 0.5, ready  # taken as the wait started
    assert step_of(done, "after")["output"]["x"] == 7

    [delivered] = await signals_of(api, instance_id)
    assert delivered["signal_id"] == signal_id
    assert delivered["status"] == "DELIVERED" and delivered["step"] == "ready", delivered
    assert delivered["payload"] == {"x": 7} and delivered["name"] == "go"
    assert moment(delivered["decided_at"]) >= moment(delivered["received_at"])
    events = await history(api, instance_id)
    fates = [e["data"]["fate"] for e in entries(events, "signal")]
    assert fates == ["BUFFERED", "DELIVERED"], fates
    [end] = entries(events, "wait_ended", "ready")
    assert end["data"]["resolved_by"] == "signal"
    # The retry of the first request answers as it does now: the same signal, delivered.
    again = await send(api, instance_id, "go", {"x": 7}, key="early-1")
    assert again.status_code == 202, again.text
    assert again.json() == {"signal_id": signal_id, "status": "DELIVERED"}


# --- 3. a signal racing a timeout ----------------------------------------------------------------

RACE_OFFSETS = (-0.6, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 1.2)
"""When each instance's signal is sent, in seconds after its timeout is due. The instance
lingers (a sleep) after the wait, so a signal that lost the race still finds it running."""


async def test_signal_racing_a_timeout_exactly_one_wins(api: httpx.AsyncClient) -> None:
    definition = await define(
        api,
        [
            {"id": "gate", "wait": {"signal": "go", "timeout": "2s", "on_timeout": "continue"}},
            {"id": "after", "type": "noop", "with": {"by": "${steps.gate.output.resolved_by}"}},
            {"id": "linger", "type": "sleep", "with": {"seconds": 2}},
        ],
    )
    ids = await asyncio.gather(*(start(api, definition) for _ in RACE_OFFSETS))
    bodies = await asyncio.gather(*(wait_waiting(api, i) for i in ids))
    due: dict[str, datetime] = {}
    for instance_id, body in zip(ids, bodies, strict=True):
        [wait] = body["waiting_for"]
        assert wait["kind"] == "signal" and wait["signal"] == "go" and wait["step"] == "gate"
        due[instance_id] = moment(wait["due_at"])

    async def send_at(instance_id: str, offset: float) -> dict:
        await sleep_until(due[instance_id].timestamp() + offset)
        r = await send(api, instance_id, "go", {"offset": offset})
        assert r.status_code == 202, r.text
        return dict(r.json())

    answers = await asyncio.gather(
        *(send_at(i, offset) for i, offset in zip(ids, RACE_OFFSETS, strict=True))
    )
    done = await wait_final(api, ids, timeout=30)
    winners = []
    for instance_id, answer, offset in zip(ids, answers, RACE_OFFSETS, strict=True):
        body = done[instance_id]
        assert body["status"] == "COMPLETED", body
        gate = step_of(body, "gate")
        resolved_by = gate["output"]["resolved_by"]
        [signal] = await signals_of(api, instance_id)
        assert signal["signal_id"] == answer["signal_id"]
        assert answer["status"] in (signal["status"], "BUFFERED"), (answer, signal)
        events = await history(api, instance_id)
        ended = entries(events, "wait_ended", "gate")
        assert len(ended) == 1, (offset, ended)
        assert ended[0]["data"]["resolved_by"] == resolved_by
        assert step_of(body, "after")["output"]["by"] == resolved_by
        if resolved_by == "signal":
            assert signal["status"] == "DELIVERED" and signal["step"] == "gate", signal
            assert gate["output"]["signal"]["id"] == signal["signal_id"]
            # Delivered in the transaction that ended the wait.
            assert moment(signal["decided_at"]) == moment(ended[0]["at"]), (signal, ended)
        else:
            assert resolved_by == "timeout", gate
            assert signal["status"] == "LATE" and signal["step"] is None, (offset, signal)
            assert "signal" not in gate["output"], gate
            assert gate["output"]["waited_s"] >= 2.0 - 0.001, gate
            # The timeout was decided first, in its own transaction; the signal came after.
            assert moment(signal["decided_at"]) >= moment(ended[0]["at"]), (signal, ended)
            late = [e for e in entries(events, "signal") if e["data"]["fate"] == "LATE"]
            assert [e["data"]["signal_id"] for e in late] == [signal["signal_id"]], events
        winners.append(resolved_by)

    # The loser is in the history too: a timer that fired after the signal won is ignored.
    async def timers_recorded() -> bool:
        for instance_id, winner in zip(ids, winners, strict=True):
            if winner == "signal" and not entries(
                await history(api, instance_id), "ignored", "gate"
            ):
                return False
        return True

    await wait_for(timers_recorded, 15, "the losing timers to be recorded as ignored")
    # The race was run from both sides (the earliest and the latest signal cannot tie).
    assert winners[0] == "signal" and winners[-1] == "timeout", list(zip(RACE_OFFSETS, winners))


# --- 4. idempotency, unknown and finished instances ----------------------------------------------


async def test_signal_idempotency_and_refusals(api: httpx.AsyncClient) -> None:
    definition = await define(
        api,
        [
            {"id": "gate", "wait": {"signal": "go", "timeout": "none"}},
            {"id": "after", "type": "noop", "with": {}},
            {"id": "hold", "wait": {"signal": "done", "timeout": "none"}},
        ],
    )
    instance_id = await start(api, definition)
    await wait_waiting(api, instance_id)

    first = await send(api, instance_id, "go", {"n": 1}, key="k-1")
    assert first.status_code == 202, first.text
    assert first.json()["status"] == "DELIVERED", first.text
    signal_id = first.json()["signal_id"]
    again = await send(api, instance_id, "go", {"n": 1}, key="k-1")
    assert again.status_code == 202, again.text
    assert again.json()["signal_id"] == signal_id
    reused = await send(api, instance_id, "go", {"n": 2}, key="k-1")
    assert reused.status_code == 422, reused.text
    assert reused.json()["type"] == "urn:paceline:problem:idempotency-key-reused", reused.text
    # The same key at the same moment: one signal, both answers name it.
    both = await asyncio.gather(*(send(api, instance_id, "go", {"n": 3}, key="k-2") for _ in "ab"))
    assert [r.status_code for r in both] == [202, 202], [r.text for r in both]
    assert both[0].json()["signal_id"] == both[1].json()["signal_id"]
    listed = await signals_of(api, instance_id)
    assert [s["signal_id"] for s in listed] == [signal_id, both[0].json()["signal_id"]], listed
    assert [s["status"] for s in listed] == ["DELIVERED", "LATE"], listed

    body = await wait_waiting(api, instance_id)
    assert [w["signal"] for w in body["waiting_for"]] == ["done"], body
    other_name = await send(api, instance_id, "done", {"n": 1}, key="k-1")
    assert other_name.status_code == 422, other_name.text  # the key names one signal
    finish = await send(api, instance_id, "done", key="k-3")
    assert finish.status_code == 202 and finish.json()["status"] == "DELIVERED", finish.text
    done = (await wait_final(api, [instance_id], timeout=30))[instance_id]
    assert done["status"] == "COMPLETED", done
    events = await history(api, instance_id)
    assert len(entries(events, "wait_ended", "gate")) == 1
    assert len(entries(events, "signal")) == 3, events  # each signal applied once

    ended = await send(api, instance_id, "go", {"n": 4})
    assert ended.status_code == 409, ended.text
    unknown = await send(api, str(uuid.uuid4()), "go", {"n": 5})
    assert unknown.status_code == 404, unknown.text
    assert len(await signals_of(api, instance_id)) == 3


# --- 5. a wait's `when` --------------------------------------------------------------------------


async def test_when_refuses_signals_that_do_not_match(api: httpx.AsyncClient) -> None:
    definition = await define(
        api,
        [
            {
                "id": "ready",
                "wait": {
                    "signal": "device_ready",
                    "timeout": "60s",
                    "on_timeout": "fail",
                    "when": "signal.payload.host == inputs.host",
                },
            },
            {
                "id": "after",
                "type": "noop",
                "with": {"h": "${steps.ready.output.signal.payload.host}"},
            },
        ],
        inputs={"host": {"type": "string"}},
    )
    instance_id = await start(api, definition, {"host": "sw-7"})
    await wait_waiting(api, instance_id)

    for other in ("sw-1", "sw-2"):
        r = await send(api, instance_id, "device_ready", {"host": other})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "LATE", r.text
    body = await instance(api, instance_id)
    assert body["status"] == "WAITING", body
    assert [w["step"] for w in body["waiting_for"]] == ["ready"]
    match = await send(api, instance_id, "device_ready", {"host": "sw-7"})
    assert match.status_code == 202, match.text
    assert match.json()["status"] == "DELIVERED", match.text

    done = (await wait_final(api, [instance_id], timeout=30))[instance_id]
    assert done["status"] == "COMPLETED", done
    ready = step_of(done, "ready")
    assert ready["output"]["resolved_by"] == "signal"
    assert ready["output"]["signal"]["id"] == match.json()["signal_id"]
    assert step_of(done, "after")["output"]["h"] == "sw-7"
    listed = await signals_of(api, instance_id)
    assert [(s["payload"]["host"], s["status"]) for s in listed] == [
        ("sw-1", "LATE"),
        ("sw-2", "LATE"),
        ("sw-7", "DELIVERED"),
    ], listed
    for refused in listed[:2]:
        assert "when" in refused["reason"] and "ready" in refused["reason"], refused
        assert refused["step"] is None
    assert listed[2]["step"] == "ready"
    assert len(entries(await history(api, instance_id), "wait_ended", "ready")) == 1


# --- 6. cancel while WAITING ---------------------------------------------------------------------


async def test_cancel_of_a_waiting_instance_is_immediate(api: httpx.AsyncClient) -> None:
    definition = await define(
        api,
        [
            {"id": "settle", "wait": {"for": "3s"}},
            {"id": "ready", "wait": {"signal": "go", "timeout": "none"}},
            {"id": "after", "type": "noop", "with": {}},
        ],
    )
    on_timer, on_signal = await asyncio.gather(start(api, definition), start(api, definition))
    await wait_waiting(api, on_timer)
    await wait_waiting(api, on_signal)
    r = await send(api, on_signal, "go")
    assert r.json()["status"] == "BUFFERED", r.text  # its wait for `go` has not started

    cancelled = await asyncio.gather(
        api.post(f"/v1/instances/{on_timer}/cancel", json={"reason": "not needed"}),
        api.post(f"/v1/instances/{on_signal}/cancel", json={"reason": "not needed"}),
    )
    for r in cancelled:
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "CANCELLED", r.text
        assert r.json()["waiting_for"] == [], r.text
    for instance_id in (on_timer, on_signal):
        body = await instance(api, instance_id)
        assert body["status"] == "CANCELLED", body
        assert body["waiting_for"] == [], body
        settle = step_of(body, "settle")
        assert settle["status"] == "CANCELLED", settle
        assert [a["step"] for a in body["activities"]] == ["settle"], body["activities"]

    # Its timer comes due after the cancel: recorded as ignored, nothing more happens.
    async def timer_ignored() -> bool:
        return bool(entries(await history(api, on_timer), "ignored", "settle"))

    await wait_for(timer_ignored, 10, "the timer of the cancelled wait to be ignored")
    for instance_id in (on_timer, on_signal):
        body = await instance(api, instance_id)
        assert body["status"] == "CANCELLED", body
        assert [a["step"] for a in body["activities"]] == ["settle"], body["activities"]
        events = await history(api, instance_id)
        assert not entries(events, "dispatched"), events
        assert not entries(events, "wait_ended"), events
    assert (await send(api, on_signal, "go")).status_code == 409
    # The signal buffered before the cancel: the instance has ended, no wait will take it, so
    # it is late now, not still buffered.
    [kept] = await signals_of(api, on_signal)
    assert kept["status"] == "LATE", kept
