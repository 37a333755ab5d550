"""The activity adapters, against a real HTTP server and real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from paceline_worker.adapters import HTTP_BODY_CAP, ActivityFailure, OutcomeUnknown, run_activity

# --- a real HTTP server -----------------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    base: str
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def last(self, path: str) -> Received:
        return [r for r in self.received if r.path == path][-1]


BIG_BODY = b"a" * (HTTP_BODY_CAP + 100_000)


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            server.received.append(
                Received(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
            )
            if self.path == "/slow":
                server.release.wait(5)
            if self.path == "/trickle":
                self._trickle()
                return
            routes: dict[str, tuple[int, str, bytes]] = {
                "/json": (200, "application/json", b'{"hello": "world", "n": [1, 2]}'),
                "/echo": (201, "application/json; charset=utf-8", body or b"{}"),
                "/text": (200, "text/plain; charset=utf-8", "plain text \u2713".encode()),
                "/bad-json": (200, "application/json", b"{not json"),
                "/big": (200, "text/plain", BIG_BODY),
                "/missing": (404, "application/problem+json", b'{"title": "not here"}'),
                "/slow": (200, "text/plain", b"late"),
                "/error": (500, "text/plain", b"it broke"),
            }
            status, content_type, payload = routes.get(self.path, (404, "text/plain", b""))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Custom-Thing", "Value")
            self.end_headers()
            self.wfile.write(payload)

        def _trickle(self) -> None:
            # A byte every 50 ms: each read is quick, the whole body takes 5 s.
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    if server.release.wait(0.05):
                        return
            except OSError:
                pass  # the client gave up, as it should

        do_GET = do_POST = do_PUT = _handle

    return Handler


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    state = Server(base="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    state.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # trust_env=False: a proxy set in the environment must not carry requests to 127.0.0.1.
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def failure(
    activity_type: str, params: dict[str, Any], http: httpx.AsyncClient
) -> ActivityFailure:
    with pytest.raises(ActivityFailure) as caught:
        await run_activity(activity_type, params, http=http)
    return caught.value


# --- raw TCP servers, for endings a well-behaved HTTP server never produces --------------------

Handle = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(
    handle: Handle, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """A server on 127.0.0.1 running `handle` for each connection; yields its port. What still
    runs of its connections is stopped on the way out."""
    running: set[asyncio.Task[Any]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            await handle(reader, writer)
        except asyncio.CancelledError:
            pass  # stopped below: asyncio would log a connection task ending cancelled
        finally:
            writer.close()

    tcp = await asyncio.start_server(connection, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield int(tcp.sockets[0].getsockname()[1])
    finally:
        tcp.close()
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        await reader.read()  # takes the request, says nothing, until the client gives up


async def close_after_the_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_head(reader)


async def cut_the_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    await writer.drain()


async def refuse_the_tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()


async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A proxy's CONNECT, to 127.0.0.1 whatever the host."""
    head = await read_head(reader)
    port = int(head.split(b" ", 2)[1].rsplit(b":", 1)[1])
    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await writer.drain()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    command += " -days 1 -subj /CN=localhost -addext subjectAltName=DNS:localhost"
    subprocess.run(
        [*command.split(), "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True
    )
    return cert, key


# --- http.request -----------------------------------------------------------------------------


async def test_get_json(server: Server, http: httpx.AsyncClient) -> None:
    out = await run_activity("http.request", {"url": f"{server.base}/json"}, http=http)
    assert out["status"] == 200
    assert out["json"] == {"hello": "world", "n": [1, 2]}
    assert "text" not in out
    assert "truncated" not in out
    assert server.last("/json").method == "GET"


async def test_response_header_names_are_lower_cased(
    server: Server, http: httpx.AsyncClient
) -> None:
    out = await run_activity("http.request", {"url": f"{server.base}/json"}, http=http)
    assert out["headers"]["x-custom-thing"] == "Value"
    assert out["headers"]["content-type"] == "application/json"
    assert all(name == name.lower() for name in out["headers"])


async def test_post_sends_the_json_body_and_headers(
    server: Server, http: httpx.AsyncClient
) -> None:
    payload = {"name": "paceline", "items": [1, 2.5, None, True], "nested": {"k": "v\u2713"}}
    out = await run_activity(
        "http.request",
        {
            "method": "POST",
            "url": f"{server.base}/echo",
            "json": payload,
            "headers": {"X-Request-Id": "abc-123"},
            "expected_status": 201,
        },
        http=http,
    )
    got = server.last("/echo")
    assert got.method == "POST"
    assert json.loads(got.body) == payload
    assert got.headers["content-type"] == "application/json"
    assert got.headers["x-request-id"] == "abc-123"
    assert out["status"] == 201
    assert out["json"] == payload


async def test_no_body_without_json(server: Server, http: httpx.AsyncClient) -> None:
    await run_activity("http.request", {"method": "PUT", "url": f"{server.base}/echo"}, http=http)
    got = server.last("/echo")
    assert got.method == "PUT"
    assert got.body == b""


async def test_text_response(server: Server, http: httpx.AsyncClient) -> None:
    out = await run_activity("http.request", {"url": f"{server.base}/text"}, http=http)
    assert out["text"] == "plain text \u2713"
    assert "json" not in out


async def test_json_content_type_that_does_not_parse_gives_text(
    server: Server, http: httpx.AsyncClient
) -> None:
    out = await run_activity("http.request", {"url": f"{server.base}/bad-json"}, http=http)
    assert out["text"] == "{not json"
    assert "json" not in out


async def test_body_is_cut_at_one_mebibyte(server: Server, http: httpx.AsyncClient) -> None:
    out = await run_activity("http.request", {"url": f"{server.base}/big"}, http=http)
    assert out["truncated"] is True
    assert out["text"] == "a" * HTTP_BODY_CAP


async def test_expected_status_mismatch(server: Server, http: httpx.AsyncClient) -> None:
    err = await failure(
        "http.request", {"url": f"{server.base}/missing", "expected_status": [200, 201]}, http
    )
    assert err.kind == "http_status"
    assert "got 404" in err.message
    assert "[200, 201]" in err.message


async def test_expected_status_match(server: Server, http: httpx.AsyncClient) -> None:
    out = await run_activity(
        "http.request", {"url": f"{server.base}/missing", "expected_status": 404}, http=http
    )
    assert out["status"] == 404
    assert out["json"] == {"title": "not here"}  # +json is JSON too


async def test_any_status_passes_without_expected_status(
    server: Server, http: httpx.AsyncClient
) -> None:
    out = await run_activity("http.request", {"url": f"{server.base}/missing"}, http=http)
    assert out["status"] == 404


async def test_connection_refused(closed_port: int, http: httpx.AsyncClient) -> None:
    err = await failure("http.request", {"url": f"http://127.0.0.1:{closed_port}/x"}, http)
    assert err.kind == "http_transport"
    assert "ConnectError" in err.message
    assert "not sent" in err.message
    assert f"127.0.0.1:{closed_port}/x" in err.message
    assert err.outcome_unknown is False
    assert err.to_error().outcome_unknown is False


async def test_unresolvable_host_is_not_sent(http: httpx.AsyncClient) -> None:
    err = await failure(
        "http.request",
        {"method": "POST", "url": "http://paceline-no-such-host.invalid/x", "timeout": 20},
        http,
    )
    assert err.kind == "http_transport"
    assert "not sent" in err.message
    assert err.outcome_unknown is False


async def test_sent_and_no_answer_within_the_timeout_is_outcome_unknown(
    http: httpx.AsyncClient,
) -> None:
    async with raw_server(never_answer) as port:
        err = await failure(
            "http.request",
            {"method": "POST", "url": f"http://127.0.0.1:{port}/x", "timeout": 0.3},
            http,
        )
    assert isinstance(err, OutcomeUnknown)
    assert err.kind == "http_timeout"
    assert err.outcome_unknown is True
    assert err.to_error().outcome_unknown is True
    assert "sent, no response within 0.3s" in err.message
    assert "outcome unknown" in err.message


async def test_closed_after_the_request_without_answer_is_outcome_unknown(
    http: httpx.AsyncClient,
) -> None:
    async with raw_server(close_after_the_request) as port:
        err = await failure(
            "http.request", {"method": "POST", "url": f"http://127.0.0.1:{port}/x"}, http
        )
    assert err.kind == "http_transport"
    assert err.outcome_unknown is True
    assert "sent, no complete response" in err.message
    assert "RemoteProtocolError" in err.message


async def test_body_cut_after_the_status_is_a_known_outcome(http: httpx.AsyncClient) -> None:
    async with raw_server(cut_the_body) as port:
        err = await failure(
            "http.request", {"method": "POST", "url": f"http://127.0.0.1:{port}/x"}, http
        )
    assert err.kind == "http_transport"
    assert err.outcome_unknown is False
    assert "status 200 received" in err.message


async def test_error_status_is_a_known_outcome(server: Server, http: httpx.AsyncClient) -> None:
    err = await failure(
        "http.request",
        {"method": "POST", "url": f"{server.base}/error", "expected_status": 200},
        http,
    )
    assert err.kind == "http_status"
    assert "got 500" in err.message
    assert err.outcome_unknown is False


async def test_request_timeout(server: Server, http: httpx.AsyncClient) -> None:
    started = time.monotonic()
    err = await failure("http.request", {"url": f"{server.base}/slow", "timeout": 0.2}, http)
    assert err.kind == "http_timeout"
    assert "Timeout" in err.message
    assert err.outcome_unknown is True  # the server read the request
    assert time.monotonic() - started < 2


async def test_request_timeout_bounds_the_whole_exchange(
    server: Server, http: httpx.AsyncClient
) -> None:
    started = time.monotonic()
    err = await failure("http.request", {"url": f"{server.base}/trickle", "timeout": 0.3}, http)
    assert err.kind == "http_timeout"
    assert time.monotonic() - started < 2
    # The status came: the server answered, whatever the body would have said.
    assert err.outcome_unknown is False
    assert "status 200 received" in err.message


async def test_errors_hide_userinfo_and_header_values(
    server: Server, closed_port: int, http: httpx.AsyncClient
) -> None:
    secret_headers = {"Authorization": "Bearer tok-abcdef", "X-Api-Key": "key-987654"}
    refused = await failure(
        "http.request",
        {"url": f"http://alice:s3cr3t-pw@127.0.0.1:{closed_port}/x", "headers": secret_headers},
        http,
    )
    bad_status = await failure(
        "http.request",
        {
            "url": server.base.replace("//", "//alice:s3cr3t-pw@") + "/missing",
            "headers": secret_headers,
            "expected_status": 200,
        },
        http,
    )
    for err in (refused, bad_status):
        for secret in ("alice", "s3cr3t-pw", "tok-abcdef", "key-987654"):
            assert secret not in err.message
    assert f"http://127.0.0.1:{closed_port}/x" in refused.message
    assert f"{server.base}/missing" in bad_status.message


async def test_invalid_header_value_is_not_quoted(server: Server, http: httpx.AsyncClient) -> None:
    # h11 rejects the newline and quotes the whole value in its error.
    err = await failure(
        "http.request",
        {"url": f"{server.base}/json", "headers": {"X-Token": "sec\nret-value"}},
        http,
    )
    assert err.kind == "http_transport"
    assert "ret-value" not in err.message
    # h11 refuses the head before writing any of it.
    assert err.outcome_unknown is False
    assert "not sent" in err.message


async def test_unknown_outcome_hides_userinfo_and_header_values(http: httpx.AsyncClient) -> None:
    async with raw_server(never_answer) as port:
        err = await failure(
            "http.request",
            {
                "method": "POST",
                "url": f"http://alice:s3cr3t-pw@127.0.0.1:{port}/x",
                "headers": {"Authorization": "Bearer tok-abcdef"},
                "timeout": 0.2,
            },
            http,
        )
    assert err.outcome_unknown is True
    for secret in ("alice", "s3cr3t-pw", "tok-abcdef"):
        assert secret not in err.message


async def test_a_proxy_refusing_the_tunnel_is_not_sent(tls_cert: tuple[Path, Path]) -> None:
    async with (
        raw_server(refuse_the_tunnel) as proxy_port,
        httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy_port}", trust_env=False) as client,
    ):
        err = await failure(
            "http.request", {"method": "POST", "url": "https://localhost:9/x"}, client
        )
    assert err.kind == "http_transport"
    assert "ProxyError" in err.message
    assert "not sent" in err.message  # the proxy's answer is not the server's
    assert err.outcome_unknown is False


async def test_no_answer_through_a_proxy_tunnel_is_outcome_unknown(
    tls_cert: tuple[Path, Path],
) -> None:
    # The tunnel's CONNECT is answered; the request sent through it is not.
    cert, key = tls_cert
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))
    async with (
        raw_server(never_answer, server_tls) as port,
        raw_server(tunnel) as proxy_port,
        httpx.AsyncClient(
            proxy=f"http://127.0.0.1:{proxy_port}", verify=client_tls, trust_env=False
        ) as client,
    ):
        err = await failure(
            "http.request",
            {"method": "POST", "url": f"https://localhost:{port}/x", "timeout": 1},
            client,
        )
    assert err.kind == "http_timeout"
    assert err.outcome_unknown is True
    assert "sent, no response" in err.message


# --- shell.command ----------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is dead: nothing may reap it in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def read_pids(path: Path) -> list[int]:
    for _ in range(250):
        if path.exists() and path.read_text().endswith("\n"):
            return [int(p) for p in path.read_text().split()]
        await asyncio.sleep(0.02)
    raise AssertionError("the child never wrote its pids")


async def started_in_a_task(
    argv: list[str], pidfile: Path, http: httpx.AsyncClient, **params: Any
) -> tuple[asyncio.Task[Any], int, int]:
    """A shell.command activity running in a task, once its shell and background sleep have
    written their pids to `pidfile`: the task and the two pids."""
    task = asyncio.create_task(run_activity("shell.command", {"argv": argv, **params}, http=http))
    shell_pid, sleep_pid = await read_pids(pidfile)
    return task, shell_pid, sleep_pid


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until the cancellation has come through."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_shell_output_and_exit_code(http: httpx.AsyncClient) -> None:
    out = await run_activity(
        "shell.command",
        {"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"], "expected_exit_codes": [0, 3]},
        http=http,
    )
    assert out == {"exit_code": 3, "stdout": "out\n", "stderr": "err\n"}


async def test_unexpected_exit_code_names_it_with_stderr_tail(http: httpx.AsyncClient) -> None:
    script = "printf 'HEAD%.0s' $(seq 100) >&2; echo ' THE-END' >&2; exit 7"
    err = await failure("shell.command", {"argv": ["sh", "-c", script]}, http)
    assert err.kind == "exit_code"
    assert "exited with code 7" in err.message
    assert "THE-END" in err.message
    assert err.message.count("HEAD") < 60  # only the tail of the 400 characters


async def test_exit_code_is_a_known_outcome(http: httpx.AsyncClient) -> None:
    err = await failure("shell.command", {"argv": ["sh", "-c", "exit 3"]}, http)
    assert err.kind == "exit_code"
    assert "exited with code 3" in err.message
    assert err.outcome_unknown is False
    assert err.to_error().outcome_unknown is False


async def test_killed_by_a_signal(http: httpx.AsyncClient) -> None:
    err = await failure("shell.command", {"argv": ["sh", "-c", "kill -TERM $$"]}, http)
    assert err.kind == "exit_code"
    assert "killed by SIGTERM" in err.message
    # Killed from outside at an unknown point of its work.
    assert isinstance(err, OutcomeUnknown)
    assert err.outcome_unknown is True
    assert err.to_error().outcome_unknown is True
    out = await run_activity(
        "shell.command",
        {"argv": ["sh", "-c", "kill -TERM $$"], "expected_exit_codes": [-15]},
        http=http,
    )
    assert out["exit_code"] == -15


async def test_output_is_capped_while_the_child_is_drained(http: httpx.AsyncClient) -> None:
    code = "import sys; sys.stdout.write('x' * 5_000_000); sys.stderr.write('y' * 3_000_000)"
    out = await run_activity(
        "shell.command",
        {"argv": [sys.executable, "-c", code], "max_output_bytes": 1000, "timeout": 5},
        http=http,
    )
    assert out == {
        "exit_code": 0,
        "stdout": "x" * 1000,
        "stderr": "y" * 1000,
        "stdout_truncated": True,
        "stderr_truncated": True,
    }


async def test_output_at_exactly_the_cap_is_not_truncated(http: httpx.AsyncClient) -> None:
    out = await run_activity(
        "shell.command", {"argv": ["printf", "12345"], "max_output_bytes": 5}, http=http
    )
    assert out == {"exit_code": 0, "stdout": "12345", "stderr": ""}


async def test_timeout_kills_the_child(tmp_path: Path, http: httpx.AsyncClient) -> None:
    pidfile = tmp_path / "pids"
    started = time.monotonic()
    err = await failure(
        "shell.command",
        {"argv": ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], "timeout": 0.3},
        http,
    )
    assert err.kind == "timeout"
    assert err.outcome_unknown is True
    assert time.monotonic() - started < 3
    [pid] = [int(p) for p in pidfile.read_text().split()]
    assert await gone(pid)


async def test_timeout_stops_the_process_group(tmp_path: Path, http: httpx.AsyncClient) -> None:
    pidfile = tmp_path / "pids"
    # The background sleep is a grandchild: only signalling the group reaches it.
    script = f"sleep 30 & echo $$ $! > {pidfile}; wait"
    err = await failure("shell.command", {"argv": ["sh", "-c", script], "timeout": 0.5}, http)
    assert err.kind == "timeout"
    assert err.outcome_unknown is True
    assert "stopped by SIGTERM" in err.message
    assert "outcome unknown" in err.message
    shell_pid, sleep_pid = [int(p) for p in pidfile.read_text().split()]
    assert await gone(shell_pid)
    assert await gone(sleep_pid)


def trapping_script(pidfile: Path, marker: Path) -> list[str]:
    """A shell that cleans up on SIGTERM (its background sleep dies of it)."""
    trap = f"echo cleaned up > {marker}; exit 0"
    return ["sh", "-c", f"trap '{trap}' TERM; sleep 30 & echo $$ $! > {pidfile}; wait"]


def ignoring_script(pidfile: Path) -> list[str]:
    """A shell that ignores SIGTERM, and so does the sleep it runs."""
    return ["sh", "-c", f"trap '' TERM; sleep 30 & echo $$ $! > {pidfile}; wait"]


async def test_timeout_gives_the_group_its_grace(tmp_path: Path, http: httpx.AsyncClient) -> None:
    pidfile, marker = tmp_path / "pids", tmp_path / "marker"
    started = time.monotonic()
    err = await failure(
        "shell.command",
        {"argv": trapping_script(pidfile, marker), "timeout": 1, "kill_grace": 30},
        http,
    )
    assert err.kind == "timeout"
    assert err.outcome_unknown is True
    assert marker.read_text() == "cleaned up\n"
    assert "stopped by SIGTERM" in err.message
    # Done when the group ended, not at the end of the grace.
    assert time.monotonic() - started < 15
    for pid in [int(p) for p in pidfile.read_text().split()]:
        assert await gone(pid)


async def test_the_grace_lasts_until_the_whole_group_ends(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    # The program dies of SIGTERM at once; what it started (not holding the output pipes, which
    # would be waited for anyway) cleans up for a while, an orphan by then, and may stay a
    # zombie once done: a container's init may be slow to reap, or never do it.
    pidfile, marker, inner = tmp_path / "pids", tmp_path / "marker", tmp_path / "inner.sh"
    inner.write_text(
        f"trap 'sleep 0.5; echo cleaned up > {marker}; exit 0' TERM\nsleep 30 & wait\n"
    )
    script = f"sh {inner} >/dev/null 2>&1 & echo $$ $! > {pidfile}; wait"
    started = time.monotonic()
    err = await failure(
        "shell.command", {"argv": ["sh", "-c", script], "timeout": 1, "kill_grace": 30}, http
    )
    assert err.kind == "timeout"
    assert "stopped by SIGTERM" in err.message
    assert marker.read_text() == "cleaned up\n"
    assert time.monotonic() - started < 15  # not the whole grace
    for pid in [int(p) for p in pidfile.read_text().split()]:
        assert await gone(pid)


async def test_timeout_kills_what_ignores_sigterm_after_the_grace(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    pidfile = tmp_path / "pids"
    started = time.monotonic()
    err = await failure(
        "shell.command",
        {"argv": ignoring_script(pidfile), "timeout": 0.3, "kill_grace": 1},
        http,
    )
    elapsed = time.monotonic() - started
    assert err.kind == "timeout"
    assert err.outcome_unknown is True
    assert "SIGKILL after 1s" in err.message
    assert elapsed >= 1.25  # the timeout, then the whole grace
    assert elapsed < 10
    shell_pid, sleep_pid = [int(p) for p in pidfile.read_text().split()]
    assert await gone(shell_pid)
    assert await gone(sleep_pid)


async def test_cancellation_kills_the_process_group(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    pidfile = tmp_path / "pids"
    # The background sleep is a grandchild: only killing the group reaches it.
    script = f"sleep 30 & echo $$ $! > {pidfile}; wait"
    task, shell_pid, sleep_pid = await started_in_a_task(["sh", "-c", script], pidfile, http)
    assert alive(sleep_pid)
    await cancel_and_wait(task)
    assert await gone(shell_pid)
    assert await gone(sleep_pid)


async def test_cancellation_gives_the_group_its_grace(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    pidfile, marker = tmp_path / "pids", tmp_path / "marker"
    task, shell_pid, sleep_pid = await started_in_a_task(
        trapping_script(pidfile, marker), pidfile, http, kill_grace=30
    )
    started = time.monotonic()
    await cancel_and_wait(task)
    assert time.monotonic() - started < 15
    assert marker.read_text() == "cleaned up\n"
    assert await gone(shell_pid)
    assert await gone(sleep_pid)


async def test_cancellation_kills_what_ignores_sigterm_after_the_grace(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    pidfile = tmp_path / "pids"
    task, shell_pid, sleep_pid = await started_in_a_task(
        ignoring_script(pidfile), pidfile, http, kill_grace=0.5
    )
    started = time.monotonic()
    await cancel_and_wait(task)
    assert time.monotonic() - started >= 0.45
    # Gone when the cancellation comes through, not some time later.
    assert not alive(shell_pid)
    assert await gone(sleep_pid)


async def test_a_second_cancellation_cuts_the_grace_not_the_kill(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    pidfile = tmp_path / "pids"
    task, shell_pid, sleep_pid = await started_in_a_task(
        ignoring_script(pidfile), pidfile, http, kill_grace=60
    )
    started = time.monotonic()
    task.cancel()
    await asyncio.sleep(0.2)
    assert alive(shell_pid)  # in its grace
    await cancel_and_wait(task)  # the second cancellation
    assert time.monotonic() - started < 10
    assert await gone(shell_pid)
    assert await gone(sleep_pid)


async def test_missing_program(http: httpx.AsyncClient) -> None:
    err = await failure("shell.command", {"argv": ["/nonexistent/paceline-no-such-program"]}, http)
    assert err.kind == "exec"
    assert "paceline-no-such-program" in err.message
    assert err.outcome_unknown is False  # it never started


async def test_missing_cwd(tmp_path: Path, http: httpx.AsyncClient) -> None:
    err = await failure("shell.command", {"argv": ["true"], "cwd": str(tmp_path / "nope")}, http)
    assert err.kind == "exec"
    assert "nope" in err.message
    assert err.outcome_unknown is False


async def test_env_and_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: httpx.AsyncClient
) -> None:
    monkeypatch.setenv("PACELINE_INHERITED", "from-worker")
    script = 'printf "%s|%s|%s|" "$PACELINE_INHERITED" "$PACELINE_ADDED" "$(pwd -P)"'
    out = await run_activity(
        "shell.command",
        {
            "argv": ["sh", "-c", script],
            "env": {"PACELINE_ADDED": "from-step"},
            "cwd": str(tmp_path),
        },
        http=http,
    )
    assert out["stdout"] == f"from-worker|from-step|{tmp_path.resolve()}|"


async def test_stdin_is_dev_null(http: httpx.AsyncClient) -> None:
    # Give this process a stdin that never ends: a child inheriting it would block in `cat`.
    read_end, write_end = os.pipe()
    saved = os.dup(0)
    os.dup2(read_end, 0)
    try:
        out = await run_activity(
            "shell.command", {"argv": ["sh", "-c", "cat; echo done"], "timeout": 2}, http=http
        )
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read_end, write_end):
            os.close(fd)
    assert out["stdout"] == "done\n"


# --- sleep, noop, dispatch --------------------------------------------------------------------


async def test_sleep(http: httpx.AsyncClient) -> None:
    started = time.monotonic()
    assert await run_activity("sleep", {"seconds": 0.05}, http=http) == {"slept": 0.05}
    assert time.monotonic() - started >= 0.05


async def test_sleep_is_cancellable(http: httpx.AsyncClient) -> None:
    task = asyncio.create_task(run_activity("sleep", {"seconds": 30}, http=http))
    await asyncio.sleep(0.02)
    task.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1


async def test_noop_returns_its_params(http: httpx.AsyncClient) -> None:
    params = {"a": 1, "b": [1, "two", None], "c": {"d": True}}
    assert await run_activity("noop", params, http=http) == params
    assert await run_activity("noop", {}, http=http) == {}


async def test_bad_params_lists_every_problem(http: httpx.AsyncClient) -> None:
    err = await failure("shell.command", {"argv": [], "timeout": 0, "bogus": 1}, http)
    assert err.kind == "bad_params"
    for problem in ("argv:", "timeout:", "bogus:"):
        assert problem in err.message


async def test_bad_params_do_not_echo_values(http: httpx.AsyncClient) -> None:
    err = await failure(
        "http.request",
        {"url": "ftp://example.com", "headers": {"Authorization": ["hidden-secret"]}},
        http,
    )
    assert err.kind == "bad_params"
    assert "url:" in err.message
    assert "headers.Authorization:" in err.message
    assert "hidden-secret" not in err.message


async def test_unknown_type(http: httpx.AsyncClient) -> None:
    err = await failure("teleport", {}, http)
    assert err.kind == "unknown_type"
    assert "teleport" in err.message


def test_failure_to_error() -> None:
    error = ActivityFailure("timeout", "too slow").to_error()
    assert (error.kind, error.message, error.outcome_unknown) == ("timeout", "too slow", False)
    assert str(ActivityFailure("exec", "no such program")) == "exec: no such program"
    assert ActivityFailure("timeout", "x", outcome_unknown=True).to_error().outcome_unknown
    assert OutcomeUnknown("timeout", "x").to_error().outcome_unknown


@pytest.mark.parametrize(
    "failure",
    [
        ActivityFailure("exit_code", "exited with code 3"),
        ActivityFailure("timeout", "too slow", outcome_unknown=True),
        OutcomeUnknown("http_timeout", "sent, no response"),
    ],
)
def test_failure_pickles_and_reprs_with_its_arguments(failure: ActivityFailure) -> None:
    copy = pickle.loads(pickle.dumps(failure))
    assert type(copy) is type(failure)
    assert (copy.kind, copy.message, copy.outcome_unknown) == (
        failure.kind,
        failure.message,
        failure.outcome_unknown,
    )
    assert eval(repr(failure)).to_error() == failure.to_error()


async def test_bad_kill_grace(http: httpx.AsyncClient) -> None:
    err = await failure("shell.command", {"argv": ["true"], "kill_grace": -1}, http)
    assert err.kind == "bad_params"
    assert "kill_grace:" in err.message


async def test_a_cancellation_while_the_program_starts_stops_its_group_with_grace(
    tmp_path: Path, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a busy worker the event loop sets up a program's pipes after the program runs: a
    # cancellation then lands inside the start. It must stop the group as any cancellation
    # does (SIGTERM, its grace), not leave it running nor SIGKILL the program alone.
    real = asyncio.create_subprocess_exec

    async def slow_start(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await real(*args, **kwargs)
        await asyncio.sleep(1.0)
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", slow_start)
    pidfile, marker = tmp_path / "pids", tmp_path / "marker"
    task, shell_pid, sleep_pid = await started_in_a_task(
        trapping_script(pidfile, marker), pidfile, http, kill_grace=30
    )
    await cancel_and_wait(task)  # still inside the slow start
    assert marker.read_text() == "cleaned up\n"
    assert await gone(shell_pid)
    assert await gone(sleep_pid)
