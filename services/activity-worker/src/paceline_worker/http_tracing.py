"""Outbound HTTP of `http.request` steps, traced by the official httpx instrumentation.

The instrumentation adds a CLIENT span per request and the `traceparent` header, so the
called service joins the instance's trace. Its own redaction (`opentelemetry.util.http.
redact_url`) removes credentials but only four well-known query parameters; a step's URL is its
author's, and any query value may be a token, so every query value is blanked here. Request
and response headers are never recorded (the instrumentation records none unless told to by
`OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*`, which Paceline never sets).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor


def redacted_url(url: str) -> str:
    """`url` without user info and with every query value replaced by `REDACTED`."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    query = urlencode([(k, "REDACTED") for k, _ in parse_qsl(parts.query, keep_blank_values=True)])
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


async def _redact(span: trace.Span, request: Any) -> None:
    recorded = getattr(span, "attributes", None) or {}
    # `url.full` in the current HTTP conventions, `http.url` in the older ones.
    for name in ("url.full", "http.url"):
        if name in recorded:
            span.set_attribute(name, redacted_url(str(request.url)))


def instrument(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """Trace `client`'s requests (no-op spans when no tracer provider exports them)."""
    HTTPXClientInstrumentor.instrument_client(client, request_hook=_redact)
    return client
