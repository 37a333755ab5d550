"""The code that runs each built-in activity type.

An adapter is `async def (params) -> output`, where `params` is the type's parameter model from
`paceline_engine.activity_types` and the output is JSON-able (it is sent back in the activity's
result). An activity-level failure is an `ActivityFailure`; anything else an adapter raises is a
bug. The worker applies the step's own time-out and cancels adapters, so every adapter lets
`CancelledError` through and leaves nothing running behind it.

Each adapter classifies its own endings (DESIGN.md, "Outcome unknown"), because only it knows
how far it got:

- a known failure proves the effect did not happen (nothing was sent, the program could not
  start): the step's `retry` may repeat it;
- a known outcome is an answer (a status, an exit code): success or a failure, as the step says;
- an unknown outcome (a request sent with no complete answer, a program killed by a signal or
  by its own time-out) is an `OutcomeUnknown`: a non-restartable activity is flagged, never
  retried automatically.

`sleep` and `noop` have no effect to lose and only ever succeed (or are cancelled).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import re
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from typing import Any

import httpx
from pydantic import ValidationError

from paceline_contracts.messages import ActivityError
from paceline_engine.activity_types import (
    ACTIVITY_TYPES,
    HttpRequestParams,
    NoopParams,
    ShellCommandParams,
    SleepParams,
)
from paceline_infra.children import die_with_parent
from paceline_worker import orphans

Adapter = Callable[[Any], Awaitable[Any]]

HTTP_BODY_CAP = 1024 * 1024
"""The most of a response body kept in an `http.request` output."""

_STDERR_TAIL = 200
_CHUNK = 64 * 1024
_REAP_GRACE_S = 2.0
_POLL_S = 0.05


class ActivityFailure(Exception):
    """An activity failed in a way its author should see: a bad status, exit code, time-out...

    `outcome_unknown` is False when the failure proves the effect did not happen (or is an
    answer), True when it may have happened: the engine then flags a non-restartable activity
    instead of applying the step's retry policy. Raise `OutcomeUnknown` for the latter.
    """

    def __init__(self, kind: str, message: str, *, outcome_unknown: bool = False) -> None:
        # kind and message go to Exception so that the exception reprs with its arguments and
        # pickles (outcome_unknown travels in the instance's __dict__, restored after __init__).
        super().__init__(kind, message)
        self.kind = kind
        self.message = message
        self.outcome_unknown = outcome_unknown

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def __repr__(self) -> str:
        args = f"{self.kind!r}, {self.message!r}"
        if self.outcome_unknown and not isinstance(self, OutcomeUnknown):
            args += ", outcome_unknown=True"
        return f"{type(self).__name__}({args})"

    def to_error(self) -> ActivityError:
        """The failure as it goes into an `ActivityResult`."""
        return ActivityError(
            kind=self.kind, message=self.message, outcome_unknown=self.outcome_unknown
        )


class OutcomeUnknown(ActivityFailure):
    """An activity ended without proof that its effect did not happen: a request sent with no
    complete answer, a program killed by a signal or by its own time-out. Never retried
    automatically when the activity is not restartable."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message, outcome_unknown=True)


async def run_activity(
    activity_type: str, raw_params: dict[str, Any], *, http: httpx.AsyncClient
) -> Any:
    """Parse `raw_params` for `activity_type` and run its adapter; returns the output.

    Raises `ActivityFailure` with kind `unknown_type` for a type without an adapter,
    `bad_params` (listing every problem) for parameters that do not parse, or whatever kind the
    adapter fails with. `http` is the worker's shared client, used by `http.request`.
    """
    declared = ACTIVITY_TYPES.get(activity_type)
    adapter = adapters(http).get(activity_type)
    if declared is None or adapter is None:
        raise ActivityFailure("unknown_type", f"no adapter for activity type {activity_type!r}")
    try:
        params = declared.parse_params(raw_params)
    except ValidationError as exc:
        raise ActivityFailure("bad_params", _describe(activity_type, exc)) from None
    return await adapter(params)


def adapters(http: httpx.AsyncClient) -> Mapping[str, Adapter]:
    """The adapter of each built-in type, with `http.request` bound to `http`."""
    return {
        "noop": noop,
        "sleep": sleep,
        "http.request": partial(http_request, http=http),
        "shell.command": shell_command,
    }


def _describe(activity_type: str, exc: ValidationError) -> str:
    # Only the location and pydantic's message: the input value could be a secret (a header).
    problems = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(part) for part in err["loc"])
        problems.append(f"{where}: {err['msg']}" if where else err["msg"])
    return f"invalid parameters for {activity_type}: " + "; ".join(problems)


# --- noop, sleep ------------------------------------------------------------------------------


async def noop(params: NoopParams) -> dict[str, Any]:
    """Return the parameters as given."""
    return params.model_dump()


async def sleep(params: SleepParams) -> dict[str, float]:
    """Wait `seconds`; returns `{"slept": seconds}`."""
    await asyncio.sleep(params.seconds)
    return {"slept": params.seconds}


# --- http.request -----------------------------------------------------------------------------


async def http_request(params: HttpRequestParams, *, http: httpx.AsyncClient) -> dict[str, Any]:
    """Send one HTTP request with `http`; returns `{"status", "headers", "json" | "text"}`.

    `json` holds the parsed body when the response says it is JSON and it parses, `text` the
    body otherwise. Only the first `HTTP_BODY_CAP` bytes are kept; a longer body gives `text`
    cut there and `"truncated": true`. Error messages carry the URL without its user info and
    never the request's header values.

    How it ends, told apart by httpcore's request trace (`_Exchange`), not guessed from
    exception types:

    | ending                                       | raises              | means         |
    | -------------------------------------------- | ------------------- | ------------- |
    | a status in `expected_status` (any if unset) | nothing: the output | known outcome |
    | another status                               | `http_status`       | known outcome |
    | status received, then the body failed or     | `http_transport`/   | known outcome |
    | `timeout` passed                             | `http_timeout`      |               |
    | bad URL or port, non-ASCII header value      | `bad_params`        | known failure |
    | a header value h11 refuses to encode         | `http_transport`    | known failure |
    | not sent: DNS, refused, TLS, proxy, connect  | `http_transport`/   | known failure |
    | or pool time-out, `timeout` before sending   | `http_timeout`      |               |
    | sent, no complete status line and headers:   | `OutcomeUnknown`:   | unknown       |
    | `timeout`, reset, closed, garbled            | `http_timeout`/     |               |
    |                                              | `http_transport`    |               |

    "Sent" starts when httpcore starts writing the request head (a head h11 refuses fails
    before its write). A server's answer, even an error status, is a known outcome.
    """
    where = f"{params.method} {_strip_userinfo(params.url)}"
    secrets = _secrets(params)
    exchange = _Exchange()
    try:
        request = http.build_request(
            params.method,
            params.url,
            headers=params.headers,
            json=params.json_body,
            timeout=httpx.Timeout(params.timeout_s),
            extensions={"trace": exchange.trace},
        )
    except UnicodeEncodeError:
        # httpx encodes header values as ASCII; its error would quote part of the value.
        raise ActivityFailure("bad_params", f"{where}: header values must be ASCII") from None
    except httpx.InvalidURL as exc:
        raise ActivityFailure("bad_params", _redact(f"{where}: {exc}", secrets)) from None
    port = request.url.port
    if port is not None and not 0 < port < 65536:
        # Left to the transport, this surfaces as an ExceptionGroup from deep inside anyio.
        raise ActivityFailure("bad_params", f"{where}: port {port} is out of range")

    response: httpx.Response | None = None
    try:
        # httpx's timeout bounds each read and write; this bounds the whole exchange, so a
        # server trickling bytes cannot hold the request open past `timeout`.
        async with asyncio.timeout(params.timeout_s):
            response = await http.send(request, stream=True)
            exchange.answered = True
            try:
                _check_status(where, response.status_code, params.expected_status)
                body, truncated = await _read_capped(response)
            finally:
                await response.aclose()
    except (TimeoutError, httpx.TimeoutException) as exc:
        within = f" within {params.timeout_s:g}s"
        raise exchange.failure("http_timeout", where, within, exc, response, secrets) from None
    except httpx.HTTPError as exc:
        raise exchange.failure("http_transport", where, "", exc, response, secrets) from None

    output: dict[str, Any] = {
        "status": response.status_code,
        "headers": {name.lower(): value for name, value in response.headers.items()},
    }
    if not truncated and _is_json(response.headers.get("content-type", "")):
        try:
            output["json"] = json.loads(body)
            return output
        except ValueError:
            pass  # says JSON, is not: the text is more use than an error
    output["text"] = _decode(body, response.encoding or "utf-8", cut=truncated)
    if truncated:
        output["truncated"] = True
    return output


class _Exchange:
    """How far one request got, from httpcore's `trace` extension.

    httpcore calls `trace` with "<part>.<step>.started|complete|failed", part being
    `connection` (connect_tcp, start_tls...), `proxy`, `http11` or `http2`; the steps that
    matter are `send_request_headers` (the request starts to leave) and
    `receive_response_headers` (the status line and headers arrived).
    """

    def __init__(self) -> None:
        self.sent = False
        """The request head started to be written: the server may have seen the request."""
        self.answered = False
        """The response's status line and headers arrived."""
        self._tunnel = False
        self._head_error: BaseException | None = None

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        request = info.get("request")
        if request is not None:
            # Through a proxy, https goes in a CONNECT tunnel whose request passes the same
            # steps with the same extensions: its answer is the proxy's, not the server's.
            # Only `started` events carry the request; the events after it are its own.
            self._tunnel = request.method == b"CONNECT"
        if self._tunnel:
            return
        step = event.partition(".")[2]
        if step == "send_request_headers.started":
            self.sent = True
        elif step == "send_request_headers.failed":
            self._head_error = info.get("exception")
        elif step == "receive_response_headers.complete":
            self.answered = True

    def nothing_sent(self, exc: BaseException) -> bool:
        """Whether `exc`, which ended the request, proves that none of it left."""
        if not self.sent:
            return True
        # h11 encodes the whole head, checking it, before its one write: a LocalProtocolError
        # that failed send_request_headers (an illegal header value) came before any byte left.
        # httpx raises its own error `from` httpcore's.
        return (
            isinstance(exc, httpx.LocalProtocolError)
            and self._head_error is not None
            and exc.__cause__ is self._head_error
        )

    def failure(
        self,
        kind: str,
        where: str,
        within: str,
        exc: BaseException,
        response: httpx.Response | None,
        secrets: Iterable[str],
    ) -> ActivityFailure:
        """The failure of an exchange that `exc` ended, by how far it got; `within` is
        " within 2s" for a time-out, "" otherwise."""
        detail = _detail(exc)
        unknown = False
        if self.answered:
            # The server answered: whatever it did, it decided, and said so in the status.
            status = f"status {response.status_code}" if response is not None else "an answer"
            message = f"{where}: {status} received, body incomplete{within} ({detail})"
        elif self.nothing_sent(exc):
            message = f"{where}: not sent{within} ({detail})"
        else:
            missing = "response" if within else "complete response"
            message = f"{where}: sent, no {missing}{within} ({detail}): outcome unknown"
            unknown = True
        message = _redact(message, secrets)
        return OutcomeUnknown(kind, message) if unknown else ActivityFailure(kind, message)


def _detail(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _check_status(where: str, status: int, expected: int | list[int] | None) -> None:
    if expected is None:
        return
    allowed = [expected] if isinstance(expected, int) else expected
    if status not in allowed:
        wanted = str(allowed[0]) if len(allowed) == 1 else f"one of {allowed}"
        raise ActivityFailure("http_status", f"{where}: expected status {wanted}, got {status}")


async def _read_capped(response: httpx.Response) -> tuple[bytes, bool]:
    """The body's first `HTTP_BODY_CAP` bytes, and whether there was more."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > HTTP_BODY_CAP:
            # Stop reading: closing the response drops the connection instead of draining it.
            return bytes(body[:HTTP_BODY_CAP]), True
    return bytes(body), False


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def _strip_userinfo(url: str) -> str:
    return _USERINFO.sub(r"\1", url)


def _secrets(params: HttpRequestParams) -> list[str]:
    found = list(params.headers.values())
    userinfo = _USERINFO.match(params.url)
    if userinfo:
        credentials = params.url[userinfo.end(1) : userinfo.end() - 1]
        found += [credentials, *credentials.split(":", 1)]
    # Very short values are not credentials, and blanking them would garble the message
    # (a header `X-Retry: 1` would blank every digit 1).
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def _redact(message: str, secrets: Iterable[str]) -> str:
    """`message` with every secret replaced, also as it appears in a bytes repr (h11's errors
    quote header values that way)."""
    for secret in secrets:
        message = message.replace(secret, "***")
        quoted = repr(secret.encode(errors="replace"))[2:-1]
        if quoted != secret:
            message = message.replace(quoted, "***")
    return message


# --- shell.command ----------------------------------------------------------------------------


class _Capture:
    """A pipe's output up to a limit; what comes after is read and dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    async def drain(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        # Keep reading past the limit: a child blocked on a full pipe would never exit.
        while chunk := await stream.read(_CHUNK):
            room = self.limit - len(self.data)
            if len(chunk) > room:
                self.truncated = True
            if room > 0:
                self.data += chunk[:room]

    def text(self) -> str:
        return _decode(bytes(self.data), "utf-8", cut=self.truncated)


async def shell_command(params: ShellCommandParams) -> dict[str, Any]:
    """Run `argv` without a shell; returns `{"exit_code", "stdout", "stderr"}`.

    The program runs in `cwd` with the worker's environment plus `env`, stdin from /dev/null,
    in a session (and so a process group) of its own. stdout and stderr are each cut to
    `max_output_bytes`, with `"stdout_truncated": true` / `"stderr_truncated": true` when cut.
    A program killed by a signal has the negative signal number as its exit code.

    | ending                                              | raises                 | means         |
    | --------------------------------------------------- | ---------------------- | ------------- |
    | exited with a code in `expected_exit_codes`         | nothing: the output    | known outcome |
    | exited with another code                            | `exit_code`            | known outcome |
    | killed by a signal not in `expected_exit_codes`     | `OutcomeUnknown`:      | unknown       |
    |                                                     | `exit_code`            |               |
    | could not start (no such program, not executable,   | `exec`                 | known failure |
    | bad `cwd`)                                          |                        |               |
    | still running at `timeout` (its group stopped)      | `OutcomeUnknown`:      | unknown       |
    |                                                     | `timeout`              |               |
    | cancelled (its group stopped)                       | `CancelledError`       | (the worker's)|

    On its `timeout`, and when cancelled, the process group is stopped before the adapter
    returns: SIGTERM, up to `kill_grace` seconds for the group to end, SIGKILL to what is left.
    A second cancellation during the grace cuts it short, never the SIGKILL.
    """
    program = params.argv[0]
    try:
        proc = await _start(params)
    except (OSError, ValueError) as exc:
        raise ActivityFailure("exec", f"cannot start {program!r}: {_os_error(exc)}") from None

    stdout = _Capture(params.max_output_bytes)
    stderr = _Capture(params.max_output_bytes)
    # The pipes are read by tasks of their own, which go on while the group is being stopped:
    # a program cleaning up on SIGTERM must not block on a full pipe.
    readers = [
        asyncio.create_task(stdout.drain(proc.stdout)),
        asyncio.create_task(stderr.drain(proc.stderr)),
    ]
    try:
        try:
            async with asyncio.timeout(params.timeout_s):
                done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_EXCEPTION)
                for reader in done:
                    reader.result()  # a reader's error (a bug) goes on from here
                exit_code = await proc.wait()
        except TimeoutError:
            killed = await _stop_group(proc, params.kill_grace_s, readers)
            how = f"SIGKILL after {params.kill_grace_s:g}s" if killed else "SIGTERM"
            message = f"{program!r} still running after {params.timeout_s:g}s; stopped by {how}"
            raise OutcomeUnknown("timeout", f"{message}: outcome unknown{_tail(stderr)}") from None
        except BaseException:
            # Cancelled (or a bug): the process must not outlive the attempt.
            await _stop_group(proc, params.kill_grace_s, readers)
            raise
    finally:
        # Only left running when a process that left the group still holds a pipe.
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    output: dict[str, Any] = {
        "exit_code": exit_code,
        "stdout": stdout.text(),
        "stderr": stderr.text(),
    }
    if stdout.truncated:
        output["stdout_truncated"] = True
    if stderr.truncated:
        output["stderr_truncated"] = True
    if exit_code not in params.expected_exit_codes:
        if exit_code < 0:
            # Killed from outside (an operator, the OOM killer...) at an unknown point of its work.
            message = f"{program!r} {_exit_status(exit_code)}: outcome unknown{_tail(stderr)}"
            raise OutcomeUnknown("exit_code", message)
        raise ActivityFailure("exit_code", f"{program!r} {_exit_status(exit_code)}{_tail(stderr)}")
    return output


async def _start(params: ShellCommandParams) -> asyncio.subprocess.Process:
    """The program started, in a process group of its own. A cancellation while it starts
    (the program may run already: a busy event loop sets up its pipes late) waits for the
    start to finish and stops the group as any cancellation does; asyncio's own clean-up
    would SIGKILL the program alone, with no grace, and leave what it started running."""
    spawn = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *params.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Marked with its owners, and so is all it starts: what outlives this process is
            # killed by the janitor of a worker on this host (orphans.py).
            env=orphans.marked({**os.environ, **params.env}),
            cwd=params.cwd,
            # Its own process group, so that stopping it also stops what it started.
            start_new_session=True,
            # Killed if the worker dies: the failover rule gives its work to others (or flags
            # it), and a command left running could do its effect twice.
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
    )
    try:
        return await asyncio.shield(spawn)
    except asyncio.CancelledError:
        grace = params.kill_grace_s
        while not spawn.done():
            try:
                await asyncio.shield(spawn)
            except asyncio.CancelledError:
                grace = 0.0  # a second cancellation: no grace, as during a grace
            except (OSError, ValueError):
                break
        if not spawn.cancelled() and spawn.exception() is None:
            proc = spawn.result()
            sink = _Capture(0)
            readers = [
                asyncio.create_task(sink.drain(proc.stdout)),
                asyncio.create_task(sink.drain(proc.stderr)),
            ]
            try:
                await _stop_group(proc, grace, readers)
            finally:
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
        raise


async def _stop_group(
    proc: asyncio.subprocess.Process, grace: float, readers: list[asyncio.Task[None]]
) -> bool:
    """Stop `proc`'s process group: SIGTERM, up to `grace` seconds for it to end, SIGKILL to
    what is left. Then wait, at most `_REAP_GRACE_S`, for the exit and the last output.
    Returns whether SIGKILL was needed."""
    loop = asyncio.get_running_loop()
    killed = False
    try:
        _signal_group(proc, signal.SIGTERM)
        deadline = loop.time() + grace
        # Polled: nothing tells of the end of a group whose members are not our children.
        while _group_running(proc) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_POLL_S)
    finally:
        # Also when the wait above is cancelled: nothing of the group may outlive the attempt.
        if _group_running(proc):
            _signal_group(proc, signal.SIGKILL)
            killed = True
    # A grandchild that left the group can keep the pipes open, and Process.wait() waits for
    # those too, so this is bounded.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_REAP_GRACE_S):
            await proc.wait()
            await asyncio.wait(readers)
    return killed


def _signal_group(proc: asyncio.subprocess.Process, signum: signal.Signals) -> None:
    # start_new_session: the program leads a group of its own, whose id is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def _group_running(proc: asyncio.subprocess.Process) -> bool:
    """Whether a process of `proc`'s group still runs. A zombie does not: it is only waiting to
    be reaped, and in a container nothing may ever reap an orphan."""
    if proc.returncode is None:
        return True  # the program itself; the usual case, found without a scan
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return True  # no /proc: count zombies as running; the grace bounds the wait
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
                state, _, pgrp = stat.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if int(pgrp) == proc.pid and state not in ("Z", "X"):
            return True
    return False


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"


def _tail(capture: _Capture) -> str:
    text = capture.text().strip()
    if not text:
        return ""
    if len(text) > _STDERR_TAIL:
        text = "..." + text[-_STDERR_TAIL:]
    return f"; stderr: {text}"


def _os_error(exc: OSError | ValueError) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename!r}" if exc.filename else exc.strerror
    return str(exc)


def _decode(data: bytes, encoding: str, *, cut: bool) -> str:
    """Decode with replacement; when `data` was cut, a character split by the cut is dropped."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    except LookupError:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return decoder.decode(data, final=not cut)
