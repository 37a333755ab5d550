"""Traces as an operator reads them in Tempo, checked on what the services really export: an
in-process OTLP/HTTP receiver decodes every span (opentelemetry-proto), as a collector would.

One trace per instance, no orphan spans, the attempt that died with its worker drawn by the
scheduler, flags with their details, error statuses, messaging spans Tempo can draw a service
graph from, and no secret anywhere in spans or logs."""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
import pytest
from effect_sink import Sink
from otlp_receiver import Receiver, Span, by_trace, orphans

from failover.conftest import (
    StackFactory,
    define_and_start,
    service_of,
    unique_name,
    wait_running,
    wait_settled,
    wait_status,
)
from integration.harness import wait_for
from stack import Stack

pytestmark = pytest.mark.integration

SECRET = f"mArKeR{secrets.token_hex(6)}"
"""Put in definitions, inputs, URLs and headers: it must appear in no span and no log line."""


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


async def _traced_stack(
    make_stack: StackFactory, receiver: Receiver
) -> tuple[Stack, httpx.AsyncClient]:
    return await make_stack(extra_env={"PACELINE_OTLP_ENDPOINT": receiver.url})


def _of_instance(spans: Iterable[Span], instance_id: str) -> list[Span]:
    return [s for s in spans if s.attributes.get("paceline.instance_id") == instance_id]


async def _trace_of(
    receiver: Receiver, trace_id: str, *, status: str, timeout: float = 20
) -> list[Span]:
    """The spans of `trace_id` once the scheduler's span of the instance's move to `status`
    arrived, and the exporters had a moment to send what they still held."""

    def arrived() -> bool:
        return any(
            s.trace_id == trace_id and s.attributes.get("paceline.instance.status") == status
            for s in receiver.spans()
        )

    await wait_for(arrived, timeout, f"the span of {status} in trace {trace_id}")
    await asyncio.sleep(1.5)  # OTEL_BSP_SCHEDULE_DELAY is 0.5 s: the rest of the batch
    return [s for s in receiver.spans() if s.trace_id == trace_id]


def _assert_one_trace(spans: list[Span], instance_id: str, trace_id: str) -> None:
    tagged = _of_instance(spans, instance_id)
    assert tagged, f"no span names instance {instance_id}"
    assert {s.trace_id for s in tagged} == {trace_id}, "the instance's spans are in several traces"


def _assert_no_orphans(trace: list[Span]) -> None:
    lost = orphans(trace)
    assert not lost, "orphan spans (parent never exported): " + ", ".join(
        f"{s.service}:{s.name}" for s in lost
    )


def _logs(stack: Stack) -> str:
    return "\n".join(
        p.read_text(errors="replace") for p in Path(stack.log_dir).glob("*.log") if p.is_file()
    )


def _assert_no_secret(receiver: Receiver, stack: Stack) -> None:
    leaked = [f"{s.service}:{s.name}" for s in receiver.spans() if SECRET in s.text()]
    assert not leaked, f"the marker secret is in spans: {leaked}"
    assert SECRET not in _logs(stack), "the marker secret is in a log line"


async def test_one_trace_per_instance_with_messaging_spans_and_no_secret(
    make_stack: StackFactory, receiver: Receiver, effects: Sink
) -> None:
    stack, api = await _traced_stack(make_stack, receiver)
    path = f"/read/{uuid.uuid4().hex[:8]}"
    host = effects.url.removeprefix("http://")
    definition = {
        "name": unique_name("shape"),
        "inputs": {"n": {"type": "integer"}, "password": {"type": "string"}},
        "steps": [
            {"id": "first", "type": "noop", "with": {"pw": "${inputs.password}"}},
            {
                "id": "check",
                "if": "inputs.n > 1",
                "then": [{"id": "big", "type": "noop", "with": {}}],
                "else": [{"id": "small", "type": "noop", "with": {}}],
            },
            {
                "id": "both",
                "parallel": [
                    [{"id": "a", "type": "sleep", "with": {"seconds": 0.2}}],
                    [
                        {
                            "id": "b",
                            "type": "http.request",
                            "with": {
                                "method": "GET",
                                "url": f"http://ops:{SECRET}@{host}{path}?token={SECRET}",
                                "headers": {"Authorization": f"Bearer {SECRET}"},
                            },
                        }
                    ],
                ],
            },
        ],
    }
    assert (await api.post("/v1/definitions", json=definition)).status_code == 201
    caller_trace = secrets.token_hex(16)
    caller_span = secrets.token_hex(8)
    started = []
    for flags in ("01", "00"):  # a sampled caller, then one that asks not to be sampled
        r = await api.post(
            "/v1/instances",
            json={"definition": definition["name"], "inputs": {"n": 2, "password": SECRET}},
            headers={"traceparent": f"00-{caller_trace}-{caller_span}-{flags}"},
            params={"api_key": SECRET},  # a caller's query is theirs: never in a span
        )
        assert r.status_code == 202, r.text
        started.append(r.json())
    failing = await define_and_start(
        api,
        {
            "name": unique_name("fails"),
            "steps": [
                {
                    "id": "boom",
                    "type": "shell.command",
                    "restartable": True,
                    "with": {"argv": ["sh", "-c", f"echo {SECRET} >&2; exit 3"]},
                }
            ],
        },
    )
    napping = await define_and_start(
        api,
        {
            "name": unique_name("nap"),
            "steps": [{"id": "nap", "type": "sleep", "with": {"seconds": 60}}],
        },
    )
    await wait_running(api, napping, "nap")
    assert (await api.post(f"/v1/instances/{napping}/cancel", json={})).status_code == 202
    for s in started:
        await wait_status(api, s["id"], "COMPLETED")
    await wait_settled(api, failing, "FAILED")
    await wait_status(api, napping, "CANCELLED")

    # Each instance is a trace of its own, never the caller's, sampled or not.
    ids = [s["trace_id"] for s in started]
    assert len(set(ids)) == 2 and caller_trace not in ids
    for s in started:
        trace = await _trace_of(receiver, s["trace_id"], status="COMPLETED")
        _assert_one_trace(receiver.spans(), s["id"], s["trace_id"])
        _assert_no_orphans(trace)
        services = {x.service for x in trace}
        assert {"paceline-admin", "paceline-scheduler", "paceline-activity-worker"} <= services
        [root] = [x for x in trace if not x.parent_span_id]
        assert root.name == f"instance {definition['name']}"
        assert root.service == "paceline-admin"
        assert root.attributes["paceline.definition"] == definition["name"]
        assert (caller_trace, caller_span) in root.links or any(
            link[0] == caller_trace for link in root.links
        ), "the root span is not linked to the caller's span"
        # Messages: every consumer span continues a producer span of another service.
        spans = {x.span_id: x for x in trace}
        consumers = [x for x in trace if x.kind == "CONSUMER"]
        assert consumers
        for c in consumers:
            assert c.attributes["messaging.system"] == "rabbitmq"
            assert c.attributes["messaging.operation.type"] == "process"
            assert c.attributes["messaging.rabbitmq.destination.routing_key"]
            producer = spans[c.parent_span_id]
            assert producer.kind == "PRODUCER", (c.name, producer.name)
            assert producer.attributes["messaging.operation.type"] == "send"
            assert producer.attributes["messaging.message.id"]
        assert {c.service for c in consumers} >= {"paceline-scheduler", "paceline-activity-worker"}
        for x in trace:
            if x.service in {"paceline-scheduler", "paceline-activity-worker"} and x.kind in {
                "CONSUMER",
                "INTERNAL",
            }:
                assert x.attributes.get("paceline.instance_id") == s["id"], x.name
                assert x.attributes.get("paceline.definition") == definition["name"], x.name
                assert x.attributes.get("paceline.version") == 1, x.name
        scheduler_spans = [x for x in trace if x.service == "paceline-scheduler"]
        assert all(
            x.attributes.get("paceline.definition") for x in scheduler_spans if x.kind == "CONSUMER"
        )
        # The outbound request: a CLIENT span, redacted, and the traceparent went out with it.
        [client] = [x for x in trace if x.kind == "CLIENT" and "url.full" in x.attributes]
        assert "REDACTED" in client.attributes["url.full"]
        activity = [x for x in trace if x.name == "activity http.request"]
        assert activity and client.parent_span_id == activity[0].span_id
        # Database calls are inside the scheduler's spans, never a trace of their own.
        assert any(x.attributes.get("db.system") == "postgresql" for x in trace) or any(
            x.attributes.get("db.system.name") == "postgresql" for x in trace
        )
    sent = [h.get("traceparent", "") for h in effects.headers(path)]
    assert sorted(t.split("-")[1] for t in sent) == sorted(ids)

    # A failed activity and a FAILED instance: status ERROR with error.type.
    failed = (await api.get(f"/v1/instances/{failing}")).json()
    trace = await _trace_of(receiver, failed["trace_id"], status="FAILED")
    _assert_no_orphans(trace)
    [run] = [x for x in trace if x.name == "activity shell.command"]
    assert run.status == "ERROR" and run.attributes["error.type"]
    assert any(
        x.status == "ERROR" and x.attributes.get("error.type") == "FAILED"
        for x in trace
        if x.service == "paceline-scheduler"
    )

    # A cancel continues the instance's trace.
    cancelled = (await api.get(f"/v1/instances/{napping}")).json()
    trace = await _trace_of(receiver, cancelled["trace_id"], status="CANCELLED")
    [cancel] = [x for x in trace if x.name == "cancel instance"]
    assert cancel.attributes["paceline.by"] == "admin"
    _assert_one_trace(receiver.spans(), napping, cancelled["trace_id"])

    every = receiver.spans()
    # Polls and probes: no SERVER span for a GET, none for a health check.
    servers = [x for x in every if x.kind == "SERVER"]
    assert servers, "the admin's POSTs are traced"
    assert not [x for x in servers if x.attributes.get("http.request.method") == "GET"]
    assert not [x for x in every if str(x.attributes.get("url.path", "")).endswith("z")]
    # Reporting traces its batches.
    assert any(x.service == "paceline-reporting" and x.kind == "CONSUMER" for x in every)
    assert all(x.resource.get("service.version") for x in every)
    # No trace from a loop: every trace is an instance's, a reporting batch's or an API
    # request's (a POST), and database calls have a parent.
    for trace_id, trace in by_trace(every).items():
        if trace_id == caller_trace:
            continue
        roots = [x for x in trace if not x.parent_span_id]
        assert len(roots) == 1, [x.name for x in roots]
        assert roots[0].kind in {"SERVER", "CONSUMER"} or roots[0].name.startswith("instance ")
        assert roots[0].kind != "SERVER" or roots[0].attributes["http.request.method"] != "GET"
    # Log lines inside spans carry the trace id.
    logs = _logs(stack)
    assert re.search(rf"attempt 1 ended FAILED .* trace_id={failed['trace_id']} span_id=", logs)
    assert re.search(rf"cancel of {napping} requested .* trace_id={cancelled['trace_id']}", logs)
    _assert_no_secret(receiver, stack)


async def test_killed_restartable_attempt_is_in_the_trace(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    stack, api = await _traced_stack(make_stack, receiver)
    instance_id = await define_and_start(
        api,
        {
            "name": unique_name("nap"),
            "steps": [
                {"id": "nap", "type": "sleep", "with": {"seconds": 3}},
                {"id": "after", "type": "noop", "with": {}},
            ],
        },
    )
    held = await wait_running(api, instance_id, "nap")
    await asyncio.sleep(1)  # its claim span is exported by then (0.5 s batches)
    dead = held["claimed_by"]
    stack.kill(service_of(stack, dead).name)
    done = await wait_status(api, instance_id, "COMPLETED")

    trace = await _trace_of(receiver, done["trace_id"], status="COMPLETED")
    _assert_one_trace(receiver.spans(), instance_id, done["trace_id"])
    _assert_no_orphans(trace)
    [lost] = [x for x in trace if x.name == f"attempt 1 on {dead}: outcome unknown"]
    assert lost.status == "ERROR"
    assert lost.attributes["error.type"] == "outcome_unknown"
    assert lost.attributes["paceline.holder"] == dead
    assert lost.attributes["paceline.step"] == "nap"
    assert lost.start_ns < lost.end_ns
    assert lost.attributes["paceline.redelivered_to"] not in {"", dead}
    assert lost.service == "paceline-scheduler"
    redelivered = [attrs for x in trace for name, attrs in x.events if name == "redelivered"]
    assert redelivered and redelivered[0]["paceline.holder"] == dead
    assert redelivered[0]["paceline.delivery_count"] >= 2
    assert redelivered[0]["paceline.redelivered_to"] != dead
    # The survivor's run of attempt 2 is there, ended normally.
    [second] = [
        x for x in trace if x.name == "activity sleep" and x.attributes["paceline.attempt"] == 2
    ]
    assert second.status == "UNSET"
    assert second.attributes["paceline.server"] != dead


async def test_flagged_then_retried_post_in_one_trace(
    make_stack: StackFactory, receiver: Receiver, first_held_effects: Sink
) -> None:
    stack, api = await _traced_stack(make_stack, receiver)
    effects = first_held_effects
    key = uuid.uuid4().hex[:8]
    definition = {
        "name": unique_name("push"),
        "inputs": {"key": {"type": "string"}},
        "steps": [
            {
                "id": "push",
                "type": "http.request",
                "with": {
                    "method": "POST",
                    "url": f"{effects.url}/effect/${{inputs.key}}?hold=20&sig={SECRET}",
                    "json": {"key": "${inputs.key}"},
                },
            }
        ],
    }
    instance_id = await define_and_start(api, definition, {"key": key})
    held = await wait_running(api, instance_id, "push")
    await wait_for(lambda: effects.count(f"/effect/{key}") == 1, 10, "the POST to arrive")
    await asyncio.sleep(1)
    dead = held["claimed_by"]
    stack.kill(service_of(stack, dead).name)
    await wait_status(api, instance_id, "FLAGGED")
    r = await api.post(
        f"/v1/instances/{instance_id}/activities/push/resolve", json={"action": "retry"}
    )
    assert r.status_code == 202, r.text
    done = await wait_status(api, instance_id, "COMPLETED")

    trace = await _trace_of(receiver, done["trace_id"], status="COMPLETED")
    _assert_one_trace(receiver.spans(), instance_id, done["trace_id"])
    _assert_no_orphans(trace)
    [lost] = [x for x in trace if x.name == f"attempt 1 on {dead}: outcome unknown"]
    assert lost.status == "ERROR" and lost.attributes["paceline.restartable"] is False
    flagged = [(x, attrs) for x in trace for name, attrs in x.events if name == "flagged"]
    assert flagged, "no flagged event"
    span, attrs = flagged[0]
    assert attrs["paceline.flag.kind"] == "redelivered"
    assert attrs["paceline.flag.holder"] == dead
    assert attrs["paceline.flag.since"]
    assert attrs["paceline.step"] == "push" and attrs["paceline.attempt"] == 1
    assert span.status == "ERROR" and span.attributes["error.type"] == "FLAGGED"
    logs = _logs(stack)
    assert re.search(
        rf"WARNING .* flagged {instance_id}/push attempt 1: .* trace_id={done['trace_id']}", logs
    )
    assert re.search(rf"admin chose retry .* of {instance_id} trace_id={done['trace_id']}", logs)
    [resolve] = [x for x in trace if x.name == "resolve activity"]
    assert resolve.attributes["paceline.by"] == "admin"
    assert resolve.attributes["paceline.action"] == "retry"
    runs = [x for x in trace if x.name == "activity http.request"]
    assert [x.attributes["paceline.attempt"] for x in runs] == [2], "only the survivor's run"
    assert runs[0].status == "UNSET"
    # Both POSTs went out in the instance's trace.
    sent = [h.get("traceparent", "") for h in effects.headers(f"/effect/{key}")]
    assert len(sent) == 2 and all(t.split("-")[1] == done["trace_id"] for t in sent)
    _assert_no_secret(receiver, stack)
