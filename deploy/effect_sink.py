"""An HTTP sink where activities send their side effects, so they can be counted: the thing
non-restartable work must never do twice without an operator saying so (`make chaos`, tests).

A POST is a non-restartable side effect: the sink counts it per path the moment it arrives
(before any `?hold=`), because "may have started" is exactly what the failover rule is about.
A GET is a restartable read: answered, counted only for the record.

`?hold=S` holds every request S seconds before answering; `?hold_first=S` holds only the first
POST to its path (a caller with a shorter time-out gives up on it: its outcome is unknown),
so that a second one, an operator's retry, is answered at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_HOLD_S = 60.0
"""The longest `?hold=` honoured: long enough for a test to kill or freeze the caller."""


class _QuietServer(ThreadingHTTPServer):
    # The default backlog of 5 resets connections when hundreds of activities POST at once.
    request_queue_size = 1024

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a caller killed mid-request is what a chaos run does, not news


class Sink:
    def __init__(self) -> None:
        self._posts: Counter[str] = Counter()
        self._arrivals: dict[str, list[float]] = {}
        self._gets = 0
        self._headers: dict[str, list[dict[str, str]]] = {}
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        # Held requests of a killed worker must not keep the run from ending.
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def posts(self) -> dict[str, int]:
        """POSTs per path so far."""
        with self._lock:
            return dict(self._posts)

    def count(self, path: str) -> int:
        """POSTs to `path` so far."""
        with self._lock:
            return self._posts[path]

    def arrivals(self, path: str) -> list[float]:
        """When each POST to `path` arrived (`time.time()`, seconds), in order."""
        with self._lock:
            return list(self._arrivals.get(path, ()))

    def headers(self, path: str) -> list[dict[str, str]]:
        """The headers of each request to `path` (names in lowercase), in order."""
        with self._lock:
            return list(self._headers.get(path, ()))

    def gets(self) -> int:
        with self._lock:
            return self._gets

    def _record(self, method: str, path: str) -> int:
        with self._lock:
            if method == "POST":
                self._posts[path] += 1
                self._arrivals.setdefault(path, []).append(time.time())
                return self._posts[path]
            self._gets += 1
            return 0

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._answer("GET")

            def do_POST(self) -> None:
                self._answer("POST")

            def _answer(self, method: str) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                with sink._lock:
                    sink._headers.setdefault(url.path, []).append(
                        {k.lower(): v for k, v in self.headers.items()}
                    )
                count = sink._record(method, url.path)
                query = parse_qs(url.query)
                hold = float(query.get("hold", ["0"])[0])
                if count == 1:
                    hold += max(float(query.get("hold_first", ["0"])[0]), 0.0)
                # Hold the caller so that a fault can land while the request is in flight.
                time.sleep(min(max(hold, 0.0), MAX_HOLD_S))
                payload = json.dumps({"path": url.path, "count": count}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the caller died (or was cut off) while we held its request

            def log_message(self, *args: object) -> None:
                pass

        return Handler
