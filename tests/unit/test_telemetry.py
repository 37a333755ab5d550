"""The pure parts of Paceline's telemetry: what is redacted, what is traced, how spans and log
lines are shaped. (What the services really export is checked in tests/failover/test_traces.py
with an OTLP receiver.)"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import SpanKind

from paceline_admin.http_telemetry import untraced
from paceline_infra import telemetry
from paceline_infra.logs import TraceFormatter


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Spans of `telemetry.tracer()` recorded in memory, by a provider of the test's own (the
    process's global one may be another test's, exporting nothing)."""
    provider = TracerProvider(sampler=telemetry._NoBareClientSpans())
    provider.add_span_processor(telemetry.RedactUrls())
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", lambda: provider.get_tracer("paceline"))
    yield exporter
    provider.shutdown()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://u:pw@h:8/p?token=abc&x=1", "http://h:8/p?token=REDACTED&x=REDACTED"),
        ("https://h/p", "https://h/p"),
        ("http://h/p?flag", "http://h/p?flag=REDACTED"),
        ("http://user@h/p#frag", "http://h/p"),
    ],
)
def test_an_outbound_url_loses_its_userinfo_and_every_query_value(url: str, expected: str) -> None:
    assert telemetry.redacted_url(url) == expected


def _scope(path: str, method: str, traceparent: str | None = None) -> dict:
    headers = [(b"traceparent", traceparent.encode())] if traceparent else []
    return {"type": "http", "path": path, "method": method, "headers": headers}


TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8


@pytest.mark.parametrize(
    ("scope", "skipped"),
    [
        (_scope("/healthz", "GET"), True),
        (_scope("/readyz", "GET", TRACEPARENT + "-01"), True),
        (_scope("/v1/instances/x", "GET"), True),
        (_scope("/v1/instances/x", "GET", TRACEPARENT + "-00"), True),
        (_scope("/v1/instances/x", "GET", TRACEPARENT + "-zz"), True),
        (_scope("/v1/instances/x", "GET", TRACEPARENT + "-01"), False),
        (_scope("/v1/instances", "POST"), False),
        (_scope("/v1/servers/x", "DELETE"), False),
        ({"type": "lifespan"}, True),
    ],
)
def test_polls_and_probes_are_not_traced_unless_asked(scope: dict, skipped: bool) -> None:
    assert untraced(scope) is skipped


def test_a_produced_message_carries_its_own_producer_span(
    exported: InMemorySpanExporter,
) -> None:
    with telemetry.tracer().start_as_current_span("decide") as parent:
        headers = telemetry.produced("activities", "m-1", conversation_id="c-1")
    producer = next(s for s in exported.get_finished_spans() if s.name == "send activities")
    assert producer.kind is SpanKind.PRODUCER
    assert producer.parent is not None
    assert producer.parent.span_id == parent.get_span_context().span_id
    attributes = dict(producer.attributes or {})
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.operation.type"] == "send"
    assert attributes["messaging.rabbitmq.destination.routing_key"] == "activities"
    assert attributes["messaging.message.id"] == "m-1"
    assert attributes["messaging.message.conversation_id"] == "c-1"
    # The consumer's parent is the producer span, not the span that decided to send.
    assert headers["traceparent"].split("-")[2] == format(producer.context.span_id, "016x")


def test_bare_client_spans_are_dropped_and_everything_else_is_kept() -> None:
    sampler = telemetry._NoBareClientSpans()
    assert sampler.should_sample(None, 1, "SELECT", SpanKind.CLIENT).decision is Decision.DROP
    for kind in (SpanKind.SERVER, SpanKind.CONSUMER, SpanKind.INTERNAL, SpanKind.PRODUCER):
        decision = sampler.should_sample(None, 1, "x", kind).decision
        assert decision is Decision.RECORD_AND_SAMPLE
    # A parent marked unsampled (a caller, a service that exports nothing) changes nothing:
    # the instance's trace is recorded whole.
    unsampled = trace.set_span_in_context(
        trace.NonRecordingSpan(
            trace.SpanContext(1, 2, is_remote=True, trace_flags=trace.TraceFlags(0))
        )
    )
    for kind in (SpanKind.CLIENT, SpanKind.CONSUMER):
        decision = sampler.should_sample(unsampled, 1, "x", kind).decision
        assert decision is Decision.RECORD_AND_SAMPLE


def test_a_lost_attempt_span_covers_the_past_interval(exported: InMemorySpanExporter) -> None:
    with telemetry.span_at("attempt 1 on w: outcome unknown", start_time_ns=10, end_time_ns=5) as s:
        telemetry.fail(s, "outcome_unknown", "lost")
    [span] = [x for x in exported.get_finished_spans() if x.name.startswith("attempt 1")]
    assert (span.start_time, span.end_time) == (10, 10)  # never ends before it starts
    assert span.status.status_code is trace.StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "outcome_unknown"


def test_a_log_line_inside_a_span_names_its_trace(exported: InMemorySpanExporter) -> None:
    formatter = TraceFormatter("%(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    assert formatter.format(record) == "hello"
    with telemetry.tracer().start_as_current_span("work") as span:
        line = formatter.format(record)
    context = span.get_span_context()
    assert line == f"hello trace_id={context.trace_id:032x} span_id={context.span_id:016x}"


def test_a_message_carries_its_definition_to_the_consumer(exported: InMemorySpanExporter) -> None:
    attributes = {"paceline.definition": "add-device", "paceline.version": 3, "other": "x"}
    with telemetry.tracer().start_as_current_span("decide", attributes=attributes):
        headers = telemetry.produced("activities", "m-2")
    assert headers["paceline-definition"] == "add-device"
    assert telemetry.carried(headers) == {
        "paceline.definition": "add-device",
        "paceline.version": 3,
    }
    producer = next(s for s in exported.get_finished_spans() if s.name == "send activities")
    assert dict(producer.attributes or {})["paceline.version"] == 3
    assert telemetry.carried({"paceline-version": b"7"}) == {"paceline.version": 7}
    assert telemetry.carried(None) == {}


def test_urls_in_any_span_lose_credentials_and_query_values(
    exported: InMemorySpanExporter,
) -> None:
    # As FastAPI's server spans and httpx's client spans set them: at the span's creation.
    attributes = {
        "url.query": "token=s3cret&api_key=k3y&flag",
        "url.full": "http://ops:pw@h/p?sig=abc",
        "http.url": "http://h/p?password=pw",
        "url.path": "/v1/instances",
    }
    with telemetry.tracer().start_as_current_span("POST", attributes=attributes):
        pass
    [span] = [s for s in exported.get_finished_spans() if s.name == "POST"]
    recorded = dict(span.attributes or {})
    assert recorded["url.query"] == "token=REDACTED&api_key=REDACTED&flag=REDACTED"
    assert recorded["url.full"] == "http://h/p?sig=REDACTED"
    assert recorded["http.url"] == "http://h/p?password=REDACTED"
    assert recorded["url.path"] == "/v1/instances"
