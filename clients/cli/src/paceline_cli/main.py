"""Entry point of the `paceline` console script: the commands, over the admin API.

Exit codes (errors.py): 0 ok, 1 the API refused (a problem), 2 usage, 3 the API unreachable,
and for `start --wait`: 4 FAILED or CANCELLED, 5 FLAGGED, 6 `--timeout` passed."""

from __future__ import annotations

import json
import sys
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
import yaml
from rich.console import Group
from rich.text import Text

from paceline_cli import __version__, render, starting, watch
from paceline_cli import why as why_words
from paceline_cli.client import PAGE_MAX, Client
from paceline_cli.errors import INTERRUPTED, USAGE, CliError
from paceline_cli.render import Format
from paceline_cli.settings import load


class _App(typer.Typer):
    """Ends every `CliError` with its one-line message on stderr and its exit code."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except CliError as exc:
            report(exc)
            sys.exit(exc.code)
        except KeyboardInterrupt:
            sys.exit(INTERRUPTED)


def report(exc: CliError) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"paceline: {exc.message}\n")
    for line in exc.lines:
        sys.stderr.write(f"  - {line}\n")
    sys.stderr.flush()


HELP = """The operator's command line over the Paceline admin API.

Settings: PACELINE_URL (default http://127.0.0.1:8080), PACELINE_TOKEN (required),
PACELINE_TIMEOUT_S (30). Exit codes: 0 ok, 1 the API refused, 2 usage, 3 the API unreachable;
`start --wait`: 4 FAILED or CANCELLED, 5 FLAGGED, 6 --timeout passed. See docs/cli.md."""

app = _App(
    name="paceline",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,  # a traceback never shows the token
    context_settings={"help_option_names": ["-h", "--help"]},
)
definitions = typer.Typer(
    help="Process definitions: apply, list, show.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
instances = typer.Typer(
    help="Instances: list, describe, history, cancel, why.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(definitions, name="definitions")
app.add_typer(instances, name="instances")

_url: str | None = None


def client() -> Client:
    return Client(load(_url))


FormatOpt = Annotated[
    Format,
    typer.Option(
        "--format",
        "-o",
        case_sensitive=False,
        help="table (for people), json (the API's JSON body, as it came) or jsonl (one item a "
        "line).",
    ),
]
IdArg = Annotated[str, typer.Argument(metavar="ID", help="The instance id.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"paceline {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    url: Annotated[
        str | None,
        typer.Option("--url", help="The admin API's base URL (overrides PACELINE_URL)."),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    global _url
    _url = url


def _emit(body: Any, fmt: Format, table: Any = None, *, list_key: str | None = "items") -> None:
    """`body` as JSON in the json formats; otherwise `table` (a renderable, or a function of
    the body giving one)."""
    if fmt is not Format.table:
        render.emit_json(body, fmt, list_key=list_key)
        return
    shown = table(body) if callable(table) else table
    if shown is not None:
        render.show(shown)


def _more(body: dict[str, Any], hint: str) -> None:
    if body.get("next_cursor"):
        render.stderr().print(f"(more: {hint})", style="dim", markup=False)


def read_json_value(raw: str, option: str) -> Any:
    """A JSON value given inline, or as `@FILE` (`@-`: stdin); a usage error otherwise."""
    text = raw
    if raw.startswith("@"):
        text = read_text(raw[1:], option)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"{option}: not valid JSON ({exc})", USAGE) from None


def read_text(name: str, what: str) -> str:
    try:
        return sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{what}: cannot read {name}: {exc}", USAGE) from None


# --- definitions ---------------------------------------------------------------------------


@definitions.command("apply")
def definitions_apply(
    file: Annotated[
        str,
        typer.Argument(
            metavar="FILE",
            help="A definition as JSON (.json) or YAML (.yaml, .yml); `-` reads stdin.",
        ),
    ],
    fmt: FormatOpt = Format.table,
) -> None:
    """Create a definition, or the next version of one (POST /v1/definitions). The file is sent
    as it is: the API validates it and lists every problem."""
    text = read_text(file, "FILE")
    content_type = _definition_type(file, text)
    with client() as api:
        body = api.json(
            "POST",
            "/v1/definitions",
            content=text.encode("utf-8"),
            headers={"Content-Type": content_type},
        )
    _emit(
        body,
        fmt,
        lambda b: render.fields(
            [
                ("created", f"{b['name']} version {b['version']}"),
                ("at", render.when(b.get("created_at"))),
            ]
        ),
    )


def _definition_type(name: str, text: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix == ".json":
        return "application/json"
    if suffix in (".yaml", ".yml"):
        return "application/yaml"
    try:
        json.loads(text)
    except ValueError:
        return "application/yaml"
    return "application/json"


@definitions.command("list")
def definitions_list(
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many (default: every one).")
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """The latest version of every definition, by name (GET /v1/definitions)."""
    with client() as api:
        body = api.pages("/v1/definitions", limit=limit)
    _emit(body, fmt, lambda b: render.definitions_table(b["items"]))
    _more(body, "raise --limit")


@definitions.command("show")
def definitions_show(
    name: Annotated[str, typer.Argument(help="The definition's name.")],
    version: Annotated[
        int | None, typer.Option("--version", "-v", min=1, help="Only this version.")
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """One definition with every version (GET /v1/definitions/NAME), or one version
    (GET /v1/definitions/NAME/versions/N)."""
    with client() as api:
        if version is None:
            body = api.get(f"/v1/definitions/{_seg(name)}")
        else:
            body = api.get(f"/v1/definitions/{_seg(name)}/versions/{version}")
    if fmt is not Format.table:
        render.emit_json(body, fmt, list_key=None)
        return
    parts: list[Any] = []
    if version is None:
        parts.append(render.fields([("name", body["name"]), ("latest", body["latest"])]))
        parts.append(render.versions_table(body))
        shown = body["versions"][-1] if body.get("versions") else {}
    else:
        shown = body
    parts.append(Text(f"# version {shown.get('version')}, {render.when(shown.get('created_at'))}"))
    dumped = yaml.safe_dump(shown.get("definition"), sort_keys=False, allow_unicode=True)
    parts.append(Text(dumped.rstrip("\n")))
    render.show(*parts)


def _seg(value: str) -> str:
    """A path segment, escaped."""
    return quote(value, safe="")


# --- start ---------------------------------------------------------------------------------


@app.command("start")
def start(
    name: Annotated[str, typer.Argument(help="The definition's name.")],
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            metavar="KEY=VALUE",
            help="An input; repeat for more. KEY=VALUE takes VALUE as the definition declares "
            "the input (a string, a number, true/false, JSON for object and array); KEY:=JSON "
            "takes JSON as it is.",
        ),
    ] = None,
    inputs_file: Annotated[
        str | None,
        typer.Option(
            "--inputs-file",
            "-f",
            metavar="FILE",
            help="Inputs as a JSON or YAML object (`-`: stdin); --input wins over it.",
        ),
    ] = None,
    version: Annotated[
        int | None, typer.Option("--version", "-v", min=1, help="The version (default: latest).")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            "-k",
            help="The Idempotency-Key (default: a new one, shown when a start cannot be "
            "confirmed). A start repeated with the same key starts nothing new: it answers with "
            "the first one's instance.",
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            "-w",
            help="Wait until the instance ends (or is FLAGGED), showing its steps on stderr.",
        ),
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.0, help="With --wait: give up waiting after this many seconds."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="With --wait: no progress display.")
    ] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """Start an instance (POST /v1/instances), with an Idempotency-Key so that a retry is safe.

    With --wait, exits 0 when it COMPLETED, 4 when it FAILED or was CANCELLED, 5 when it is
    FLAGGED (it waits for an operator), 6 when --timeout passed first."""
    key = idempotency_key or f"paceline-cli-{uuid.uuid4()}"
    with client() as api:
        given = starting.gather_inputs(
            api, name, version, inputs or [], inputs_file, read_text=read_text
        )
        body = starting.start(api, name, version, given, key)
        if not wait:
            _emit(body, fmt, lambda b: render.fields(list(b.items())))
            return
        final, code = starting.wait(api, body, timeout=timeout, quiet=quiet)
    _emit(final, fmt, _describe_view, list_key=None)
    if code:
        raise typer.Exit(code)


# --- instances -----------------------------------------------------------------------------


@instances.command("list")
def instances_list(
    status: Annotated[
        list[str] | None,
        typer.Option("--status", "-s", help="Only this status (repeat, or separate with commas)."),
    ] = None,
    definition: Annotated[
        str | None, typer.Option("--definition", "-d", help="Only this definition.")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, help="At most this many, newest first (pages are followed).")
    ] = 50,
    page_size: Annotated[
        int, typer.Option(min=1, max=PAGE_MAX, help="Instances asked for per request.")
    ] = PAGE_MAX,
    fmt: FormatOpt = Format.table,
) -> None:
    """Instances, newest first (GET /v1/instances)."""
    params: dict[str, Any] = {}
    if status:
        params["status"] = status
    if definition:
        params["definition"] = definition
    with client() as api:
        body = api.pages("/v1/instances", params, limit=limit, page_max=page_size)
    _emit(body, fmt, lambda b: render.instances_table(b["items"]))
    _more(body, "raise --limit")


def _describe_view(body: dict[str, Any], activities: list[dict[str, Any]] | None = None) -> Any:
    return Group(
        render.instance_header(body),
        render.activities_table(activities if activities is not None else body["activities"]),
    )


def describe(
    instance_id: IdArg,
    fmt: FormatOpt = Format.table,
) -> None:
    """One instance and its activities as a table (GET /v1/instances/ID)."""
    with client() as api:
        body = api.get(f"/v1/instances/{_seg(instance_id)}")
        activities = None
        if fmt is Format.table and body.get("activities_truncated"):
            activities = api.pages(f"/v1/instances/{_seg(instance_id)}/activities")["items"]
    _emit(
        body, fmt, _describe_view(body, activities) if fmt is Format.table else None, list_key=None
    )


def history(
    instance_id: IdArg,
    fmt: FormatOpt = Format.table,
) -> None:
    """Every recorded event of an instance, oldest first, with why (GET .../history)."""
    with client() as api:
        body = api.pages(f"/v1/instances/{_seg(instance_id)}/history", page_max=10_000)
    _emit(body, fmt, lambda b: render.history_table(b["items"]))


def cancel(
    instance_id: IdArg,
    reason: Annotated[
        str | None, typer.Option("--reason", "-r", help="Why (recorded in the history).")
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Cancel an instance (POST .../cancel): nothing more of it starts, and what runs is
    stopped. A repeated cancel answers as the first did."""
    with client() as api:
        body = api.json(
            "POST",
            f"/v1/instances/{_seg(instance_id)}/cancel",
            json={"reason": reason} if reason else None,
        )

    def view(b: dict[str, Any]) -> Any:
        c = b.get("cancel") or {}
        pairs: list[tuple[str, Any]] = [("id", b["id"]), ("status", b["status"])]
        if c:
            pairs += [
                ("by", c.get("by")),
                ("reason", c.get("reason")),
                ("requested", render.when(c.get("requested_at"))),
            ]
        for w in b.get("waiting_for") or []:
            pairs.append(("stopping", f"{w['step']} attempt {w['attempt']} on {w.get('server')}"))
        return render.fields(pairs)

    _emit(body, fmt, view)


def why(
    instance_id: IdArg,
    fmt: FormatOpt = Format.table,
) -> None:
    """In words: the instance's status and since when, what it waits for, who holds its
    running attempts, its flags and what an operator can do; or how it ended."""
    with client() as api:
        body = api.get(f"/v1/instances/{_seg(instance_id)}")
        activities: list[dict[str, Any]] = body["activities"]
        if body.get("activities_truncated"):
            activities = api.pages(
                f"/v1/instances/{_seg(instance_id)}/activities",
                {"status": list(why_words.OPEN)},
            )["items"]
        servers = None
        if why_words.needs_servers(body, activities):
            servers = api.get("/v1/servers")["items"]
    words = why_words.explain(body, activities, servers)
    if fmt is not Format.table:
        render.emit_json(words.as_json(), fmt, list_key=None)
        return
    parts: list[Any] = [Text(words.summary, style="bold")]
    parts += [Text(line) for line in words.details]
    if words.actions:
        parts.append(Text("\nWhat you can do:", style="bold"))
        width = max(len(a.command) for a in words.actions)
        parts += [Text(f"  {a.command.ljust(width)}  {a.what}") for a in words.actions]
    render.show(*parts)


for _group, _prefix in ((instances, ""), (app, "Same as `instances {}`. ")):
    for _name, _fn in (
        ("describe", describe),
        ("history", history),
        ("cancel", cancel),
        ("why", why),
    ):
        _help = _prefix.format(_name) + (_fn.__doc__ or "")
        _group.command(_name, help=_help)(_fn)


@app.command("signal")
def signal(
    instance_id: IdArg,
    name: Annotated[str, typer.Argument(help="The signal's name.")],
    payload: Annotated[
        str | None,
        typer.Option(help="The payload: a JSON object, or @FILE (`@-`: stdin). Default {}."),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", "-k", help="The Idempotency-Key (default: a new one)."),
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Send a signal to an instance's `wait` steps (POST .../signals/NAME)."""
    value = read_json_value(payload, "--payload") if payload is not None else {}
    if not isinstance(value, dict):
        raise CliError("--payload: must be a JSON object", USAGE)
    key = idempotency_key or f"paceline-cli-{uuid.uuid4()}"
    with client() as api:
        body = api.json(
            "POST",
            f"/v1/instances/{_seg(instance_id)}/signals/{_seg(name)}",
            json={"payload": value},
            headers={"Idempotency-Key": key},
        )
    _emit(body, fmt, lambda b: render.fields(list(b.items())))


# --- flags and resolving -------------------------------------------------------------------


@app.command("flags")
def flags(
    definition: Annotated[
        str | None, typer.Option("--definition", "-d", help="Only this definition.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many (default: every one).")
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Every activity that waits for an operator, oldest flag first (GET /v1/flags)."""
    params = {"definition": definition} if definition else {}
    with client() as api:
        body = api.pages("/v1/flags", params, limit=limit)
    _emit(body, fmt, lambda b: render.flags_table(b["items"]))
    _more(body, "raise --limit")


class ResolveAction(StrEnum):
    retry = "retry"
    skip = "skip"
    fail = "fail"


@app.command("resolve")
def resolve(
    instance_id: IdArg,
    step: Annotated[str, typer.Argument(help="The flagged activity's step id.")],
    action: Annotated[
        ResolveAction,
        typer.Argument(
            metavar="retry|skip|fail",
            case_sensitive=False,
            help="retry: run it again as a new attempt; skip: mark it done with --output; "
            "fail: fail it, and with it the instance.",
        ),
    ],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            metavar="JSON",
            help="With skip: the output later steps read, a JSON object or @FILE (`@-`: stdin). "
            "Not the rendering: that is --format/-o.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="With retry: retry although the holder may still finish the attempt."
        ),
    ] = False,
    fmt: FormatOpt = Format.table,
) -> None:
    """Decide on a flagged activity (POST /v1/instances/ID/activities/STEP/resolve)."""
    request: dict[str, Any] = {"action": action.value}
    if output is not None:
        if action is not ResolveAction.skip:
            raise CliError("--output goes with skip only (the rendering is --format/-o)", USAGE)
        value = read_json_value(output, "--output")
        if not isinstance(value, dict):
            raise CliError("--output: must be a JSON object", USAGE)
        request["output"] = value
    if force:
        if action is not ResolveAction.retry:
            raise CliError("--force goes with retry only", USAGE)
        request["force"] = True
    with client() as api:
        body = api.json(
            "POST",
            f"/v1/instances/{_seg(instance_id)}/activities/{_seg(step)}/resolve",
            json=request,
        )
    _emit(body, fmt, lambda b: render.fields(list(b.items())))


# --- servers -------------------------------------------------------------------------------


@app.command("servers")
def servers(
    kind: Annotated[
        list[str] | None,
        typer.Option(help="Only this kind: scheduler, activity-worker, reporting, admin."),
    ] = None,
    status: Annotated[
        list[str] | None,
        typer.Option("--status", "-s", help="Only this status: ACTIVE, DRAINING, DRAINED, LOST."),
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Every server in the registry, by kind then start time (GET /v1/servers)."""
    params: dict[str, Any] = {}
    if kind:
        params["kind"] = kind
    if status:
        params["status"] = status
    with client() as api:
        body = api.get("/v1/servers", params)
    _emit(body, fmt, lambda b: render.servers_table(b["items"]))
    if body.get("truncated"):
        render.stderr().print("(only the first 1,000 servers: narrow the filter)", markup=False)


@app.command("drain")
def drain(
    server_id: Annotated[str, typer.Argument(metavar="ID", help="The server id.")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Friendly shutdown of one server (POST /v1/servers/ID/drain): it stops taking work,
    finishes what it runs, reports DRAINED and exits."""
    with client() as api:
        body = api.json("POST", f"/v1/servers/{_seg(server_id)}/drain")
    _emit(body, fmt, lambda b: render.fields(list(b.items())))


@app.command("forget")
def forget(
    server_id: Annotated[str, typer.Argument(metavar="ID", help="The server id.")],
    fmt: FormatOpt = Format.table,
) -> None:
    """Remove a DRAINED or LOST server from the registry (DELETE /v1/servers/ID). Prints
    nothing in the json formats (the API answers 204, without a body)."""
    with client() as api:
        api.json("DELETE", f"/v1/servers/{_seg(server_id)}")
    if fmt is Format.table:
        render.show(Text(f"removed {server_id} from the server registry"))


# --- watch ---------------------------------------------------------------------------------


@app.command("watch")
def watch_command(
    interval: Annotated[
        float, typer.Option("--interval", "-n", min=0.2, help="Seconds between refreshes.")
    ] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Show it once, and exit.")] = False,
    iterations: Annotated[
        int | None, typer.Option(min=1, help="Refresh this many times, then exit.")
    ] = None,
    status: Annotated[
        list[str] | None,
        typer.Option("--status", "-s", help="Only instances of this status (repeat)."),
    ] = None,
    definition: Annotated[
        str | None, typer.Option("--definition", "-d", help="Only this definition.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="The newest this many instances.")] = 20,
    fmt: FormatOpt = Format.table,
) -> None:
    """A live table of the newest instances and of the servers, until Ctrl-C."""
    with client() as api:
        watch.run(
            api,
            fmt,
            interval=interval,
            iterations=1 if once else iterations,
            limit=limit,
            statuses=status or [],
            definition=definition,
        )
