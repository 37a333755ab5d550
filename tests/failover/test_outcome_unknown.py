"""Outcome unknown (DESIGN.md): for a non-restartable activity only an ending that proves the
effect did not happen is a failure its step's `retry` may repeat; an ending that may have had
its effect (a request sent with no answer, a program killed by a signal) is flagged for an
operator, like a crash. Restartable work is retried as its step says."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from effect_sink import Sink

from failover.conftest import (
    StackFactory,
    as_principal,
    assert_work_queues_empty,
    effect_path,
    history,
    post_command,
    sleep_until,
    start_flow,
    step_of,
    wait_settled,
    wait_status,
)
from integration.harness import wait_for

pytestmark = pytest.mark.integration


def _post(url: str, *, timeout: float, retry: int | None = None, **extra: object) -> dict:
    step: dict = {
        "id": "push",
        "type": "http.request",
        "with": {"method": "POST", "url": url, "json": {"n": 1}, "timeout": timeout},
        **extra,
    }
    if retry is not None:
        step["retry"] = {"max_attempts": retry}
    return step


def _shell(script: str, *, retry: int | None = None) -> dict:
    step: dict = {"id": "run", "type": "shell.command", "with": {"argv": ["sh", "-c", script]}}
    if retry is not None:
        step["retry"] = {"max_attempts": retry}
    return step


def _closed_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _settled_step(
    api: httpx.AsyncClient, instance_id: str, status: str, step: str, timeout: float = 60
) -> dict:
    """`step` of the instance once it has settled as `status` (`wait_settled`)."""
    return step_of(await wait_settled(api, instance_id, status, timeout=timeout), step)


async def _kinds(api: httpx.AsyncClient, instance_id: str) -> list[str]:
    return [h["kind"] for h in await history(api, instance_id)]


async def test_post_sent_without_answer_is_flagged_not_retried_then_operator_retry_completes(
    make_stack: StackFactory, first_held_effects: Sink
) -> None:
    effects = first_held_effects
    stack, api = await make_stack()
    path = effect_path()
    instance_id = await start_flow(
        api,
        "unknown",
        [
            _post(f"{effects.url}{path}?hold=6", timeout=2, retry=3),
            {"id": "after", "type": "noop", "with": {"pushed": "${steps.push.output.status}"}},
        ],
    )

    push = await _settled_step(api, instance_id, "FLAGGED", "push")
    assert push["status"] == "INTERRUPTED"
    assert push["attempts"] == 1
    assert push["restartable"] is False
    flag = push["flag"]
    assert flag["kind"] == "outcome_unknown"
    assert flag["attempt"] == 1
    reason = flag["reason"]
    assert "attempt 1" in reason, reason
    assert flag["server"] and flag["server"] in reason, reason
    assert push["server"] == flag["server"]
    assert "http_timeout" in reason and "within 2s" in reason, reason
    assert f"{effects.url}{path}" in reason, "the reason names where the request went"
    assert "outcome unknown" in reason or "outcome is unknown" in reason, reason
    # The worker itself reported the end of the attempt: it will not finish later.
    assert flag["holder"]["may_still_finish"] is False

    # The server's hold ends (its answer comes to nobody); the step's retry of 3 was not used.
    (arrived,) = effects.arrivals(path)
    await sleep_until(arrived + 6 + 4)
    assert effects.count(path) == 1, "a request that may have had its effect was retried"
    still = (await api.get(f"/v1/instances/{instance_id}")).json()
    assert still["status"] == "FLAGGED"
    assert step_of(still, "push")["attempts"] == 1
    events = await history(api, instance_id)
    kinds = [h["kind"] for h in events]
    assert "retry_scheduled" not in kinds
    assert "activity_failed" not in kinds
    (flag_entry,) = [h for h in events if h["kind"] == "flagged"]
    assert flag_entry["data"]["flag"] == "outcome_unknown"
    assert flag_entry["reason"] == reason

    r = await api.post(
        f"/v1/instances/{instance_id}/activities/push/resolve",
        json={"action": "retry"},
        headers=as_principal(api, "ops-ann"),
    )
    assert r.status_code == 202, r.text
    done = await wait_status(api, instance_id, "COMPLETED", timeout=60)
    push = step_of(done, "push")
    assert push["status"] == "COMPLETED"
    assert push["attempts"] == 2
    assert push["output"]["status"] == 200
    assert push["output"]["json"]["count"] == 2
    assert step_of(done, "after")["output"] == {"pushed": 200}
    assert effects.count(path) == 2, "the operator's retry sent the second POST"
    resolved = [h for h in await history(api, instance_id) if h["kind"] == "resolved"]
    assert [h["reason"] for h in resolved] == ["ops-ann chose retry"]
    await assert_work_queues_empty(stack)


async def test_post_sent_without_answer_and_no_retry_is_flagged_not_failed(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api = await make_stack()
    path = effect_path()
    instance_id = await start_flow(
        api, "unknown1", [_post(f"{effects.url}{path}?hold=6", timeout=2)]
    )
    push = await _settled_step(api, instance_id, "FLAGGED", "push")
    assert push["status"] == "INTERRUPTED"
    assert push["flag"]["kind"] == "outcome_unknown"
    assert "attempt 1" in push["flag"]["reason"]

    (arrived,) = effects.arrivals(path)
    await sleep_until(arrived + 6 + 4)
    body = (await api.get(f"/v1/instances/{instance_id}")).json()
    assert body["status"] == "FLAGGED", "an unknown outcome is not a failure"
    assert body["error"] is None
    assert step_of(body, "push")["status"] == "INTERRUPTED"
    kinds = await _kinds(api, instance_id)
    assert "instance_failed" not in kinds
    assert "activity_failed" not in kinds
    assert effects.count(path) == 1
    await assert_work_queues_empty(stack)


async def test_post_to_a_closed_port_was_not_sent_so_its_retry_applies_then_it_fails(
    make_stack: StackFactory,
) -> None:
    stack, api = await make_stack()
    port = _closed_port()
    instance_id = await start_flow(
        api, "refused", [_post(f"http://127.0.0.1:{port}/effect/x", timeout=5, retry=3)]
    )
    push = await _settled_step(api, instance_id, "FAILED", "push")
    assert push["status"] == "FAILED"
    assert push["attempts"] == 3
    assert push["flag"] is None
    assert push["error"]["kind"] == "http_transport"
    assert "not sent" in push["error"]["message"], push["error"]
    assert push["error"]["outcome_unknown"] is False
    events = await history(api, instance_id)
    kinds = [h["kind"] for h in events]
    assert kinds.count("activity_failed") == 3, kinds
    assert kinds.count("retry_scheduled") == 2, kinds
    assert "flagged" not in kinds
    for h in events:
        if h["kind"] == "activity_failed":
            assert "not sent" in h["reason"], h
    await assert_work_queues_empty(stack)


async def test_shell_command_killed_by_a_signal_is_flagged_outcome_unknown(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api = await make_stack()
    path = effect_path()
    # It does its effect, then dies by a signal: nothing tells how far it got.
    script = f"{post_command(effects.url + path)}; kill -KILL $$"
    instance_id = await start_flow(api, "killed", [_shell(script, retry=3)])
    run = await _settled_step(api, instance_id, "FLAGGED", "run")
    assert run["status"] == "INTERRUPTED"
    assert run["attempts"] == 1
    assert run["flag"]["kind"] == "outcome_unknown"
    reason = run["flag"]["reason"]
    assert "attempt 1" in reason and "SIGKILL" in reason, reason
    assert run["flag"]["server"] in reason
    await asyncio.sleep(3)
    assert effects.count(path) == 1, "the step's retry was not applied"
    body = (await api.get(f"/v1/instances/{instance_id}")).json()
    assert body["status"] == "FLAGGED"
    assert "retry_scheduled" not in await _kinds(api, instance_id)
    await assert_work_queues_empty(stack)


async def test_shell_command_exiting_with_an_error_code_is_retried_then_fails(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api = await make_stack()
    path = effect_path()
    # An exit code is an answer: a known outcome, which the step's retry may repeat.
    script = f"{post_command(effects.url + path)}; exit 3"
    instance_id = await start_flow(api, "exit3", [_shell(script, retry=2)])
    run = await _settled_step(api, instance_id, "FAILED", "run")
    assert run["status"] == "FAILED"
    assert run["attempts"] == 2
    assert run["flag"] is None
    assert run["error"]["kind"] == "exit_code"
    assert "exited with code 3" in run["error"]["message"]
    assert effects.count(path) == 2, "it ran twice"
    kinds = await _kinds(api, instance_id)
    assert kinds.count("activity_failed") == 2, kinds
    assert "flagged" not in kinds
    await assert_work_queues_empty(stack)


async def test_restartable_post_without_answer_is_retried_by_its_step_then_fails(
    make_stack: StackFactory, effects: Sink
) -> None:
    stack, api = await make_stack()
    path = effect_path()
    step = _post(f"{effects.url}{path}?hold=3", timeout=1, retry=3, restartable=True)
    instance_id = await start_flow(api, "again", [step])
    push = await _settled_step(api, instance_id, "FAILED", "push", timeout=90)
    assert push["status"] == "FAILED"
    assert push["restartable"] is True
    assert push["attempts"] == 3
    assert push["flag"] is None
    assert push["error"]["kind"] == "http_timeout"
    await wait_for(lambda: effects.count(path) == 3, 10, "the third POST to be counted")
    await sleep_until(effects.arrivals(path)[-1] + 3 + 3)
    assert effects.count(path) == 3, "three attempts, three POSTs"
    kinds = await _kinds(api, instance_id)
    assert kinds.count("activity_failed") == 3, kinds
    assert kinds.count("retry_scheduled") == 2, kinds
    assert "flagged" not in kinds
    await assert_work_queues_empty(stack)
