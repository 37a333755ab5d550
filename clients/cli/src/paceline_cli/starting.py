"""`paceline start`: the inputs from options and files, the start with its Idempotency-Key, and
`--wait` with its progress display on stderr (stdout stays the result)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import yaml
from rich.console import Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from paceline_cli import render
from paceline_cli.client import Client
from paceline_cli.errors import (
    FLAGGED,
    INTERRUPTED,
    NOT_COMPLETED,
    REFUSED,
    UNREACHABLE,
    USAGE,
    WAIT_TIMEOUT,
    ApiProblem,
    CliError,
)

FINAL = {"COMPLETED", "FAILED", "CANCELLED"}
OUTAGE_S = 30.0
"""While waiting: how long the API may be unreachable (a restart) before `--wait` gives up."""
_INTEGER = re.compile(r"^[+-]?\d+$")


def gather_inputs(
    api: Client,
    name: str,
    version: int | None,
    pairs: list[str],
    inputs_file: str | None,
    *,
    read_text: Callable[[str, str], str],
) -> dict[str, Any]:
    """The inputs: those of `--inputs-file`, then each `--input` (KEY=VALUE, KEY:=JSON)."""
    inputs: dict[str, Any] = {}
    if inputs_file is not None:
        text = read_text(inputs_file, "--inputs-file")
        try:
            loaded = json.loads(text)
        except ValueError:
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise CliError(f"--inputs-file: neither JSON nor YAML ({exc})", USAGE) from None
        if not isinstance(loaded, dict):
            raise CliError("--inputs-file: must hold an object (a mapping of inputs)", USAGE)
        inputs.update(loaded)
    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.rstrip(":"):
            raise CliError(f"--input {pair!r}: write KEY=VALUE or KEY:=JSON", USAGE)
        if key.endswith(":"):
            try:
                inputs[key[:-1]] = json.loads(value)
            except ValueError as exc:
                raise CliError(f"--input {key[:-1]}: not valid JSON ({exc})", USAGE) from None
            raw.pop(key[:-1], None)
        else:
            raw[key] = value
            inputs[key] = value
    if raw:
        declared = _declared_inputs(api, name, version)
        for key, value in raw.items():
            inputs[key] = coerce(value, declared.get(key))
    return inputs


def _declared_inputs(api: Client, name: str, version: int | None) -> dict[str, Any]:
    """The definition's `inputs` (their types); {} when it cannot be read (the start then
    reports what is wrong)."""
    path = f"/v1/definitions/{quote(name, safe='')}"
    try:
        if version is None:
            versions = api.get(path).get("versions") or [{}]
            definition = versions[-1].get("definition") or {}
        else:
            definition = api.get(f"{path}/versions/{version}").get("definition") or {}
    except ApiProblem:
        return {}
    declared = definition.get("inputs")
    return declared if isinstance(declared, dict) else {}


def coerce(value: str, spec: Any) -> Any:
    """`value` as the input's declared `type`; as it is when it does not read as one (the API
    then says what is wrong)."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "integer" and _INTEGER.match(value.strip()):
        return int(value)
    if kind == "number":
        try:
            number = float(value)
        except ValueError:
            return value
        return int(value) if _INTEGER.match(value.strip()) else number
    if kind == "boolean":
        folded = value.strip().lower()
        if folded in ("true", "yes", "on", "1"):
            return True
        if folded in ("false", "no", "off", "0"):
            return False
    if kind in ("object", "array"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if isinstance(parsed, dict if kind == "object" else list):
            return parsed
    return value


def start(
    api: Client, name: str, version: int | None, inputs: dict[str, Any], key: str
) -> dict[str, Any]:
    """POST /v1/instances with `key` as its Idempotency-Key (asked again, with the same key,
    after a 503 or a connection cut: it cannot start twice)."""
    request: dict[str, Any] = {"definition": name, "inputs": inputs}
    if version is not None:
        request["version"] = version
    try:
        response = api.request(
            "POST", "/v1/instances", json=request, headers={"Idempotency-Key": key}
        )
        body = response.json()
    except CliError as exc:
        if exc.code == UNREACHABLE:
            exc.lines.append(
                f"the start may have been recorded: repeat it with --idempotency-key {key} "
                "(it starts nothing twice)"
            )
        raise
    except ValueError:
        raise CliError(
            "POST /v1/instances answered with a body that is not JSON", REFUSED
        ) from None
    if response.headers.get("Idempotent-Replayed") == "true":
        render.stderr().print(
            f"paceline: the Idempotency-Key {key} was used before: this is the instance its "
            "first start started (nothing new was started)",
            markup=False,
        )
    return dict(body)


def wait(
    api: Client, started: dict[str, Any], *, timeout: float | None, quiet: bool
) -> tuple[dict[str, Any], int]:
    """Poll the instance until it is final or FLAGGED (or `timeout` passes): its last view,
    and the exit code."""
    instance_id = str(started["id"])
    console = render.stderr()
    progress = _Progress(instance_id, console.is_terminal, quiet)
    began = time.monotonic()
    deadline = None if timeout is None else began + timeout
    body: dict[str, Any] = dict(started)
    delay = 0.2
    unreachable_since: float | None = None
    try:
        with progress.live(console):
            while True:
                try:
                    body = api.get(f"/v1/instances/{quote(instance_id, safe='')}")
                    unreachable_since = None
                except CliError as exc:
                    if exc.code != UNREACHABLE:
                        raise
                    unreachable_since = unreachable_since or time.monotonic()
                    if time.monotonic() - unreachable_since > OUTAGE_S:
                        raise
                progress.show(body, time.monotonic() - began)
                if body.get("status") in FINAL or body.get("status") == "FLAGGED":
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                pause = delay if deadline is None else min(delay, deadline - time.monotonic())
                time.sleep(max(0.0, pause))
                delay = min(1.0, delay * 1.5)
    except KeyboardInterrupt:
        raise CliError(
            f"stopped waiting: instance {instance_id} goes on (paceline describe {instance_id})",
            INTERRUPTED,
        ) from None
    return body, _outcome(body, instance_id, console, timeout)


def _outcome(body: dict[str, Any], instance_id: str, console: Any, timeout: float | None) -> int:
    status = body.get("status")
    if status == "COMPLETED":
        return 0
    if status == "FLAGGED":
        console.print(
            f"paceline: instance {instance_id} is FLAGGED: an activity waits for an operator "
            f"(paceline why {instance_id})",
            markup=False,
        )
        return FLAGGED
    if status in FINAL:
        error = body.get("error") or {}
        what = f": {error.get('kind')}: {error.get('message')}" if error else ""
        console.print(f"paceline: instance {instance_id} ended {status}{what}", markup=False)
        return NOT_COMPLETED
    console.print(
        f"paceline: stopped waiting after {timeout:g}s: instance {instance_id} is {status} "
        "and goes on",
        markup=False,
    )
    return WAIT_TIMEOUT


class _Progress:
    """The steps while waiting: a live table on a terminal, a line per change otherwise."""

    def __init__(self, instance_id: str, terminal: bool, quiet: bool) -> None:
        self.instance_id = instance_id
        self.terminal = terminal
        self.quiet = quiet
        self.screen: Live | None = None
        self.seen: dict[str, tuple[Any, Any]] = {}
        self.status: Any = None
        self.spinner = Spinner("dots")

    def live(self, console: Any) -> Any:
        if self.quiet or not self.terminal:
            return _Nothing()
        self.screen = Live(Text(""), console=console, refresh_per_second=8, transient=False)
        return self.screen

    def show(self, body: dict[str, Any], elapsed: float) -> None:
        if self.quiet:
            return
        if self.screen is not None:
            self.screen.update(self.view(body, elapsed))
            return
        out = render.stderr()
        if body.get("status") != self.status:
            self.status = body.get("status")
            out.print(f"paceline: {self.instance_id}: {self.status}", markup=False)
        for a in body.get("activities") or []:
            now = (a.get("status"), a.get("attempts"))
            if self.seen.get(a["step"]) != now:
                self.seen[a["step"]] = now
                out.print(
                    f"  {a['step']} ({a.get('type')}): {now[0]} (attempt {now[1]})", markup=False
                )

    def view(self, body: dict[str, Any], elapsed: float) -> RenderableType:
        activities = body.get("activities") or []
        done = sum(1 for a in activities if a.get("status") in ("COMPLETED", "SKIPPED"))
        head = Table.grid(padding=(0, 1))
        head.add_row(
            self.spinner,
            Text(f"{self.instance_id} {body.get('definition')} v{body.get('version')}"),
            render.status(body.get("status")),
            Text(f"{done}/{len(activities)} steps done, {render.span(elapsed)}", style="dim"),
        )
        steps = render.table("STEP", "TYPE", "STATUS", "ATTEMPT", "SERVER")
        for a in activities[-30:]:
            steps.add_row(
                render.cell(a.get("step")),
                render.cell(a.get("type")),
                render.status(a.get("status")),
                render.cell(a.get("attempts")),
                render.cell(a.get("server") or a.get("claimed_by")),
            )
        return Group(head, steps)


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None
