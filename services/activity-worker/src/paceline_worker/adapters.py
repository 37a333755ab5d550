"""The code that runs each built-in activity type.

An adapter is `async def (params) -> output`, where `params` is the type's parameter model from
`paceline_engine.activity_types` and the output is JSON-able (it is sent back in the activity's
result). An activity-level failure is an `ActivityFailure`; anything else an adapter raises is a
bug. The worker applies the step's own time-out and cancels adapters, so every adapter lets
`CancelledError` through and leaves nothing running behind it.
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

Adapter = Callable[[Any], Awaitable[Any]]

HTTP_BODY_CAP = 1024 * 1024
"""The most of a response body kept in an `http.request` output."""

_STDERR_TAIL = 200
_CHUNK = 64 * 1024
_REAP_GRACE_S = 2.0


class ActivityFailure(Exception):
    """An activity failed in a way its author should see: a bad status, exit code, time-out..."""

    def __init__(self, kind: str, message: str) -> None:
        # Both go to Exception so that the exception pickles and reprs with its arguments.
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def to_error(self) -> ActivityError:
        """The failure as it goes into an `ActivityResult`."""
        return ActivityError(kind=self.kind, message=self.message)


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
    cut there and `"truncated": true`. Fails with `http_status` for a status not in
    `expected_status`, `http_timeout` when `timeout` passes, and `http_transport` when the
    request cannot be made or the response cannot be read. Error messages carry the URL without
    its user info and never the request's header values.
    """
    where = f"{params.method} {_strip_userinfo(params.url)}"
    secrets = _secrets(params)
    try:
        request = http.build_request(
            params.method,
            params.url,
            headers=params.headers,
            json=params.json_body,
            timeout=httpx.Timeout(params.timeout_s),
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

    try:
        # httpx's timeout bounds each read and write; this bounds the whole exchange, so a
        # server trickling bytes cannot hold the request open past `timeout`.
        async with asyncio.timeout(params.timeout_s):
            response = await http.send(request, stream=True)
            try:
                _check_status(where, response.status_code, params.expected_status)
                body, truncated = await _read_capped(response)
            finally:
                await response.aclose()
    except (TimeoutError, httpx.TimeoutException) as exc:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        message = f"{where}: no response within {params.timeout_s:g}s ({detail})"
        raise ActivityFailure("http_timeout", _redact(message, secrets)) from None
    except httpx.HTTPError as exc:
        message = f"{where}: {type(exc).__name__}: {exc}"
        raise ActivityFailure("http_transport", _redact(message, secrets)) from None

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
    A program killed by a signal has the negative signal number as its exit code. Fails with
    `exec` when the program cannot be started, `timeout` when it runs past `timeout` (its
    process group is killed), and `exit_code` for a code not in `expected_exit_codes`. When
    cancelled, kills the process group before letting the cancellation through.
    """
    program = params.argv[0]
    try:
        proc = await asyncio.create_subprocess_exec(
            *params.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **params.env},
            cwd=params.cwd,
            # Its own process group, so that killing it also kills what it started.
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        raise ActivityFailure("exec", f"cannot start {program!r}: {_os_error(exc)}") from None

    stdout = _Capture(params.max_output_bytes)
    stderr = _Capture(params.max_output_bytes)
    try:
        async with asyncio.timeout(params.timeout_s):
            async with asyncio.TaskGroup() as readers:
                readers.create_task(stdout.drain(proc.stdout))
                readers.create_task(stderr.drain(proc.stderr))
            exit_code = await proc.wait()
    except TimeoutError:
        await _kill_group(proc)
        message = f"{program!r} still running after {params.timeout_s:g}s; killed"
        raise ActivityFailure("timeout", message + _tail(stderr)) from None
    except BaseException:
        # Cancelled (or a bug): the process must not outlive the attempt.
        await _kill_group(proc)
        raise

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
        raise ActivityFailure("exit_code", f"{program!r} {_exit_status(exit_code)}{_tail(stderr)}")
    return output


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    # Give the exit a moment to be collected. A grandchild that left the group can keep the
    # pipes open, and Process.wait() waits for those too, so this is bounded.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_REAP_GRACE_S):
            await proc.wait()


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
