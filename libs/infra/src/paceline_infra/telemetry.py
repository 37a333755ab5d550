"""OpenTelemetry: one tracer provider per service; W3C trace context in message headers.

Span shapes follow the OpenTelemetry semantic conventions: messaging spans
(https://opentelemetry.io/docs/specs/semconv/messaging/ and its RabbitMQ page: the destination
is the exchange, the routing key says which queue) and `error.type` on failures. Paceline's own
attributes are under `paceline.*` (see docs/observability.md).

Why not `opentelemetry-instrumentation-aio-pika`: it injects the *current* context when a
message is published, but Paceline publishes most messages from the outbox after the commit
(often from the relay, long after), so the context they must carry is the one stored with the
row when it was staged. `produced` makes that PRODUCER span at staging time instead.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes

from paceline_infra.identity import ServerIdentity
from paceline_infra.settings import Settings

SCHEDULE_DELAY_MS = 500
"""Default `OTEL_BSP_SCHEDULE_DELAY`: the SDK's 5 s would lose the last seconds of spans of a
process that is killed, which is exactly when an operator needs them."""

_state = {"exchange": "paceline.x"}


class _NoBareClientSpans(Sampler):
    """Records every span, whatever its parent's sampled flag says (an instance's trace is
    recorded whole, even when a caller or a service without an exporter marked it unsampled),
    except CLIENT spans without a parent: database calls of heartbeat and relay loops, which
    would each make a trace of one span."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if kind is SpanKind.CLIENT and not parent.is_valid:
            return SamplingResult(Decision.DROP)
        return ALWAYS_ON.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "NoBareClientSpans"


def redacted_url(url: str) -> str:
    """`url` without user info and with every query value replaced by `REDACTED`."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, redacted_query(parts.query), ""))


def redacted_query(query: str) -> str:
    """A URL query with every value replaced by `REDACTED` (the names kept)."""
    return urlencode([(k, "REDACTED") for k, _ in parse_qsl(query, keep_blank_values=True)])


class RedactUrls(SpanProcessor):
    """Blanks every query value and the user info of URLs in span attributes, whoever set
    them: FastAPI's server spans (`url.query`: a caller may put a token in any query), httpx's
    client spans (`url.full`: a step's URL is its author's). The official instrumentations
    redact only a few well-known names (`opentelemetry.util.http.redact_url`). Runs when a
    span starts, while it is still writable: these attributes are set at its creation."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        attributes = span.attributes or {}
        for name in ("url.full", "http.url"):
            if isinstance(value := attributes.get(name), str):
                span.set_attribute(name, redacted_url(value))
        if isinstance(value := attributes.get("url.query"), str):
            span.set_attribute("url.query", redacted_query(value))


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _schedule_delay_ms() -> int:
    raw = os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "")
    return int(raw) if raw.isdigit() else SCHEDULE_DELAY_MS


def setup_tracing(identity: ServerIdentity, settings: Settings) -> TracerProvider:
    """Install the global tracer provider of this service.

    Resource: `service.name` (`paceline-<kind>`), `service.version`, `service.instance.id`
    (the server id), `service.namespace`, `host.name`, plus `OTEL_RESOURCE_ATTRIBUTES` (e.g.
    `deployment.environment.name=prod`). Spans are exported over OTLP/HTTP to
    `PACELINE_OTLP_ENDPOINT` + `/v1/traces` every `OTEL_BSP_SCHEDULE_DELAY` ms (default 500);
    with no endpoint nothing is exported (spans still carry the instance's trace id). Database
    calls are traced (asyncpg's instrumentation, without parameters) only when exporting.
    """
    # The current HTTP and database conventions (`url.full`, `db.system.name`...) from the
    # official instrumentations, unless the operator chose otherwise.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http,database")
    package = f"paceline-{identity.kind.value}"
    resource = Resource.create(
        {
            "service.name": package,
            "service.version": _version(package),
            "service.instance.id": identity.id,
            "service.namespace": settings.namespace,
            "host.name": identity.host,
        }
    )
    _state["exchange"] = f"{settings.namespace}.x"
    # Without an endpoint nothing is recorded, but spans still get real ids (ALWAYS_OFF makes
    # non-recording spans with fresh contexts): an instance still has a trace id, messages
    # still carry it, and recording costs no CPU.
    sampler = _NoBareClientSpans() if settings.otlp_endpoint else ALWAYS_OFF
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(RedactUrls())
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=_schedule_delay_ms()
            )
        )
        instrumentor = AsyncPGInstrumentor(capture_parameters=False)  # type: ignore[no-untyped-call]
        instrumentor.instrument(tracer_provider=provider)
    trace.set_tracer_provider(provider)
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer("paceline")


def inject(context: Context | None = None) -> dict[str, str]:
    """The current (or given) trace context as message headers (`traceparent`)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def extract(headers: Mapping[str, object] | None) -> Context:
    carrier = {
        k: v.decode() if isinstance(v, bytes) else str(v) for k, v in (headers or {}).items()
    }
    return propagate.extract(carrier)


def stored(traceparent: str | None) -> Context | None:
    """The context of a stored `traceparent` (an instance's root span), None without one."""
    return extract({"traceparent": traceparent}) if traceparent else None


def trace_id_hex(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


def exchange() -> str:
    """The exchange every message goes through (`messaging.destination.name` for RabbitMQ)."""
    return _state["exchange"]


def messaging(operation: str, routing_key: str, message_id: str | None = None) -> dict[str, Any]:
    """Messaging semantic-convention attributes of one operation (`send`, `receive`,
    `process`) on the queue that `routing_key` names."""
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation,
        "messaging.operation.name": {"send": "publish", "process": "consume"}.get(
            operation, operation
        ),
        "messaging.destination.name": exchange(),
        "messaging.rabbitmq.destination.routing_key": routing_key,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    return attributes


CARRIED = {"paceline.definition": "paceline-definition", "paceline.version": "paceline-version"}
"""Attributes a message carries in its headers to its consumer's spans (a worker knows an
activity's instance and step from the task, but not its definition)."""


def carried(headers: Mapping[str, object] | None) -> dict[str, Any]:
    """The `CARRIED` attributes a message's headers hold."""
    found: dict[str, Any] = {}
    for attribute, header in CARRIED.items():
        value = (headers or {}).get(header)
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value:
            found[attribute] = int(value) if value.isdigit() else value
    return found


def produced(
    routing_key: str,
    message_id: str,
    *,
    context: Context | None = None,
    conversation_id: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """A PRODUCER span `send <routing_key>` for one message, child of `context` (default: the
    current one), ended at once; returns the headers that carry it to the consumer, with the
    parent's `CARRIED` attributes.

    Ended at once because the message is committed to be sent here (staged in the outbox, or
    published right after): a consumer span is its child whenever the message is delivered.
    """
    parent = trace.get_current_span(context)
    inherited = {
        k: v for k, v in (getattr(parent, "attributes", None) or {}).items() if k in CARRIED
    }
    extra = {**inherited, **(attributes or {}), "messaging.message.id": message_id}
    if conversation_id:
        extra["messaging.message.conversation_id"] = conversation_id
    with tracer().start_as_current_span(
        f"send {routing_key}",
        context=context,
        kind=SpanKind.PRODUCER,
        attributes={**messaging("send", routing_key), **extra},
    ):
        headers = inject()
    headers.update({CARRIED[k]: str(v) for k, v in inherited.items()})
    return headers


def batch_links(headers: Sequence[Mapping[str, object] | None]) -> list[Link]:
    """One span link per message of a batch, to the context each one carries."""
    links = []
    for h in headers:
        context = trace.get_current_span(extract(h)).get_span_context()
        if context.is_valid:
            links.append(Link(context))
    return links


def fail(span: trace.Span, error_type: str, description: str | None = None) -> None:
    """Status ERROR with `error.type` (a kind: `timeout`, `outcome_unknown`, `FAILED`...)."""
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, description))


@contextmanager
def span_at(
    name: str,
    *,
    start_time_ns: int,
    end_time_ns: int,
    attributes: Mapping[str, Any] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Iterator[trace.Span]:
    """A span over a past interval (child of the current span): e.g. an attempt that was lost
    with its worker, drawn from its claim to the moment the loss was noticed."""
    span = tracer().start_span(
        name, kind=kind, attributes=dict(attributes or {}), start_time=start_time_ns
    )
    try:
        yield span
    finally:
        span.end(end_time=max(end_time_ns, start_time_ns))


@contextmanager
def in_instance(
    name: str, traceparent: str | None, attributes: Mapping[str, Any]
) -> Iterator[trace.Span]:
    """A span in an instance's own trace (a child of its stored root span), linked to the
    caller's span (e.g. the HTTP request that asked for a cancel)."""
    with tracer().start_as_current_span(
        name, context=stored(traceparent), links=caller_links(), attributes=dict(attributes)
    ) as span:
        yield span


def caller_links() -> list[Link]:
    """A link to the current span (the caller's request), when there is one."""
    caller = trace.get_current_span().get_span_context()
    return [Link(caller)] if caller.is_valid else []
