"""What FastAPI's own telemetry traces: requests that change something, not polls.

FastAPI (0.165) starts a SERVER span per request as soon as a tracer provider is set. A
dashboard or a CLI polling `GET /v1/instances/{id}` every second, and every health probe,
would each make a trace of their own (71% of all spans in a trial run). So: health checks and
the API description are never traced; GET, HEAD and OPTIONS only when the caller asks, by
sending a sampled W3C `traceparent` (flags `01`); everything else is. FastAPI's per-operation
spans (dependencies, serialization) and its log records (which quote request data) are off.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from fastapi.telemetry import TelemetryConfig
from opentelemetry import propagate, trace

NEVER_TRACED = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
READS = frozenset({"GET", "HEAD", "OPTIONS"})


def _asked(scope: MutableMapping[str, Any]) -> bool:
    """The request carries a valid, sampled W3C `traceparent` (parsed by OpenTelemetry's own
    propagator: a garbled one is no ask)."""
    carrier = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in scope.get("headers", [])
        if name == b"traceparent"
    }
    context = trace.get_current_span(propagate.extract(carrier)).get_span_context()
    return context.is_valid and context.trace_flags.sampled


def untraced(scope: MutableMapping[str, Any]) -> bool:
    """True for a request FastAPI should not trace (see the module's docstring)."""
    if scope.get("type") != "http" or scope.get("path") in NEVER_TRACED:
        return True
    return scope.get("method") in READS and not _asked(scope)


def config() -> TelemetryConfig:
    return {
        "exclude": untraced,
        "operation_spans": False,
        "metrics": False,
        "logs": False,
    }
