"""OpenTelemetry: one tracer provider per service; W3C trace context in message headers."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from paceline_infra.identity import ServerIdentity
from paceline_infra.settings import Settings


def setup_tracing(identity: ServerIdentity, settings: Settings) -> TracerProvider:
    resource = Resource.create(
        {
            "service.name": f"paceline-{identity.kind.value}",
            "service.instance.id": identity.id,
            "service.namespace": settings.namespace,
            "host.name": identity.host,
        }
    )
    provider = TracerProvider(resource=resource)
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
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


def trace_id_hex(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")
