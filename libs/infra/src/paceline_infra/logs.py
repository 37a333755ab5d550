"""One log format for every service: a line per record, the service and server id in each."""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace


class TraceFormatter(logging.Formatter):
    """Appends ` trace_id=<32 hex> span_id=<16 hex>` to a line emitted inside a recorded
    span, so that a log line leads to its trace (Grafana's derived fields match on it)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line += f" trace_id={context.trace_id:032x} span_id={context.span_id:016x}"
        return line


def setup_logging(server_id: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        TraceFormatter(f"%(asctime)s %(levelname)s {server_id} %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The AMQP client logs every reconnect attempt at WARNING with a traceback; keep ours.
    logging.getLogger("aiormq").setLevel(logging.ERROR)
    logging.getLogger("aio_pika").setLevel(logging.ERROR)
    # On a reconnect it logs, at ERROR, each robust channel's close callback failing on the
    # dead transport (ChannelInvalidStateError): expected then, and our own consume callbacks
    # handle their errors themselves.
    logging.getLogger("aio_pika.tools").setLevel(logging.CRITICAL)
    # httpx logs every request at INFO with its whole URL: userinfo and query strings carry
    # secrets (an http.request step's URL is the author's). The worker reports outcomes itself.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
