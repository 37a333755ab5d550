"""Outbound HTTP of `http.request` steps, traced by the official httpx instrumentation.

The instrumentation adds a CLIENT span per request and the `traceparent` header, so the
called service joins the instance's trace. The URL it records is redacted by the tracer
provider's `RedactUrls` (paceline_infra.telemetry): no user info, no query value. Request and
response headers are never recorded (the instrumentation records none unless told to by
`OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*`, which Paceline never sets).
"""

from __future__ import annotations

import httpx
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor


def instrument(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """Trace `client`'s requests (no-op spans when no tracer provider records them)."""
    HTTPXClientInstrumentor.instrument_client(client)
    return client
