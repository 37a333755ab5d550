"""Rendering: `--format table` (rich tables), `json` (the API's JSON body, as it came) and
`jsonl` (one item a line for lists; the body on one line otherwise).

Every value from the API goes into a table as `Text`, never as markup: a step path such as
`hosts[3].add` or a reason with brackets is shown as it is."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

WIDE = 200
"""Columns of a table written to a pipe or a file (a terminal's own width otherwise)."""


class Format(StrEnum):
    table = "table"
    json = "json"
    jsonl = "jsonl"


def stdout() -> Console:
    """The console of results: wide when it is not a terminal, so nothing is cut."""
    console = Console(soft_wrap=False, highlight=False)
    if not console.is_terminal:
        console = Console(width=WIDE, soft_wrap=False, highlight=False)
    return console


def show(*renderables: RenderableType) -> None:
    """Print on stdout; to a pipe or a file, without the spaces that pad the lines."""
    console = stdout()
    if console.is_terminal:
        for renderable in renderables:
            console.print(renderable)
        return
    with console.capture() as captured:
        for renderable in renderables:
            console.print(renderable)
    lines = [line.rstrip() for line in captured.get().splitlines()]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def stderr() -> Console:
    """The console of progress and messages (stdout stays the result)."""
    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=True, width=WIDE, highlight=False)
    return console


def emit_json(body: Any, fmt: Format, *, list_key: str | None = "items") -> None:
    """`body` as JSON (indented) or JSON lines: each of `body[list_key]` on a line of its own
    when the body is a list's page, otherwise the body on one line."""
    out = sys.stdout
    if fmt is Format.jsonl:
        if list_key and isinstance(body, dict) and isinstance(body.get(list_key), list):
            for item in body[list_key]:
                out.write(json.dumps(item, ensure_ascii=False) + "\n")
        elif isinstance(body, list):
            for item in body:
                out.write(json.dumps(item, ensure_ascii=False) + "\n")
        else:
            out.write(json.dumps(body, ensure_ascii=False) + "\n")
    else:
        out.write(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    out.flush()


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def when(value: Any) -> str:
    """A timestamp of the API as `2025-06-02 10:00:03Z` (UTC, to the second); `-` for none."""
    parsed = parse_time(value)
    if parsed is None:
        return "-" if value is None else str(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def span(seconds: float) -> str:
    """A duration for a person: `45s`, `3m 20s`, `2h 5m`, `3d 4h`."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m" if s % 3600 // 60 else f"{s // 3600}h"
    return f"{s // 86400}d {s % 86400 // 3600}h" if s % 86400 // 3600 else f"{s // 86400}d"


def ago(value: Any, now: datetime | None = None) -> str:
    """`3m 20s ago`, or `in 5m` for a time to come (as this machine's clock sees it)."""
    parsed = parse_time(value)
    if parsed is None:
        return "-"
    delta = ((now or datetime.now(UTC)) - parsed).total_seconds()
    return f"in {span(delta)}" if delta < 0 else f"{span(delta)} ago"


def short(value: Any, limit: int = 80) -> str:
    """A value in one line of at most `limit` characters (JSON for anything but a string)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


STATUS_STYLE = {
    "COMPLETED": "green",
    "SKIPPED": "green",
    "ACTIVE": "green",
    "RUNNING": "cyan",
    "SCHEDULED": "cyan",
    "PENDING": "cyan",
    "WAITING": "blue",
    "DRAINING": "yellow",
    "CANCELLING": "yellow",
    "FLAGGED": "bold magenta",
    "INTERRUPTED": "bold magenta",
    "FAILED": "red",
    "TIMED_OUT": "red",
    "LOST": "red",
    "CANCELLED": "dim",
    "DRAINED": "dim",
}


def status(value: Any) -> Text:
    text = str(value) if value is not None else "-"
    return Text(text, style=STATUS_STYLE.get(text, ""))


def cell(value: Any) -> Text:
    if value is None:
        return Text("-")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    return Text(str(value))


UNBROKEN = {
    "ID",
    "INSTANCE",
    "STEP",
    "SERVER",
    "STATUS",
    "KIND",
    "AT",
    "CREATED",
    "FINISHED",
    "STARTED",
    "FLAGGED",
}
"""Columns whose values are never broken over lines (ids, statuses, times)."""


def table(*columns: str, title: str | None = None) -> Table:
    t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)
    for name in columns:
        t.add_column(name, overflow="fold", no_wrap=name in UNBROKEN)
    return t


def definitions_table(items: list[dict[str, Any]]) -> Table:
    t = table("NAME", "VERSION", "VERSIONS", "CREATED")
    for d in items:
        t.add_row(
            cell(d.get("name")),
            cell(d.get("version")),
            cell(d.get("versions")),
            cell(when(d.get("created_at"))),
        )
    return t


def versions_table(detail: dict[str, Any]) -> Table:
    t = table("VERSION", "CREATED", "STEPS")
    for v in detail.get("versions") or []:
        steps = (v.get("definition") or {}).get("steps")
        t.add_row(
            cell(v.get("version")),
            cell(when(v.get("created_at"))),
            cell(len(steps) if isinstance(steps, list) else "-"),
        )
    return t


def instances_table(items: list[dict[str, Any]], title: str | None = None) -> Table:
    t = table("ID", "DEFINITION", "STATUS", "STARTED BY", "CREATED", "FINISHED", title=title)
    for i in items:
        t.add_row(
            cell(i.get("id")),
            cell(f"{i.get('definition')} v{i.get('version')}"),
            status(i.get("status")),
            cell(i.get("started_by")),
            cell(when(i.get("created_at"))),
            cell(when(i.get("finished_at"))),
        )
    return t


def activity_note(a: dict[str, Any]) -> str:
    """What a row says about an activity: its flag, its error, why it is where it is, or its
    output."""
    flag = a.get("flag")
    if isinstance(flag, dict):
        return f"flagged ({flag.get('kind')}): {short(flag.get('reason'), 100)}"
    if a.get("status") == "SKIPPED":
        return f"{a.get('reason') or 'skipped'}; output: {short(a.get('output'), 80)}"
    error = a.get("error")
    if isinstance(error, dict):
        return f"{error.get('kind')}: {short(error.get('message'), 100)}"
    if a.get("status") in ("COMPLETED", "SKIPPED") and a.get("output") is not None:
        return "output: " + short(a.get("output"), 90)
    if a.get("reason"):
        return short(a.get("reason"), 100)
    return ""


def activities_table(activities: list[dict[str, Any]]) -> Table:
    t = table(
        "STEP",
        "TYPE",
        "STATUS",
        "ATTEMPT",
        "RESTARTABLE",
        "SERVER",
        "STARTED",
        "FINISHED",
        "NOTE",
        title="Activities",
    )
    for a in activities:
        t.add_row(
            cell(a.get("step")),
            cell(a.get("type")),
            status(a.get("status")),
            cell(a.get("attempts")),
            cell(a.get("restartable")),
            cell(a.get("server") or a.get("claimed_by")),
            cell(when(a.get("started_at"))),
            cell(when(a.get("finished_at"))),
            Text(activity_note(a)),
        )
    return t


def instance_header(i: dict[str, Any]) -> Table:
    """The instance's own fields, one a row."""
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("id", cell(i.get("id")))
    t.add_row("definition", cell(f"{i.get('definition')} v{i.get('version')}"))
    t.add_row("status", status(i.get("status")))
    t.add_row("started by", cell(f"{i.get('started_by')} ({i.get('started_how')})"))
    t.add_row("created", cell(when(i.get("created_at"))))
    t.add_row("started", cell(when(i.get("started_at"))))
    t.add_row("finished", cell(when(i.get("finished_at"))))
    if i.get("trace_id"):
        t.add_row("trace", cell(i.get("trace_id")))
    t.add_row("inputs", cell(short(i.get("inputs"), 160)))
    if i.get("error"):
        e = i["error"]
        t.add_row("error", cell(f"{e.get('kind')}: {e.get('message')}"))
    for w in i.get("waiting_for") or []:
        what = f"signal {w.get('signal')}" if w.get("signal") else str(w.get("kind"))
        due = f", due {when(w.get('due_at'))}" if w.get("due_at") else ", no time-out"
        t.add_row("waiting for", cell(f"{what} (step {w.get('step')}{due})"))
    cancel = i.get("cancel")
    if isinstance(cancel, dict):
        t.add_row(
            "cancel",
            cell(
                f"by {cancel.get('by')} at {when(cancel.get('requested_at'))}: "
                f"{cancel.get('reason')}"
            ),
        )
    t.add_row("activities", cell(i.get("activity_count")))
    return t


def history_table(items: list[dict[str, Any]]) -> Table:
    t = table("AT", "KIND", "STEP", "ATTEMPT", "REASON")
    for h in items:
        t.add_row(
            cell(when(h.get("at"))),
            cell(h.get("kind")),
            cell(h.get("step")),
            cell(h.get("attempt")),
            Text(str(h.get("reason") or "")),
        )
    return t


def flags_table(items: list[dict[str, Any]]) -> Table:
    t = table(
        "INSTANCE", "DEFINITION", "STEP", "TYPE", "ATTEMPT", "KIND", "FLAGGED", "HOLDER", "REASON"
    )
    for f in items:
        flag = f.get("flag") or {}
        holder = flag.get("holder") or {}
        held = "-"
        if holder:
            held = f"{holder.get('server_id')} ({holder.get('status') or 'removed'})"
            if holder.get("may_still_finish"):
                held += ", may still finish"
        t.add_row(
            cell(f.get("instance_id")),
            cell(f"{f.get('definition')} v{f.get('version')}"),
            cell(f.get("step")),
            cell(f.get("type")),
            cell(f.get("attempt")),
            cell(flag.get("kind")),
            cell(when(flag.get("flagged_at"))),
            cell(held),
            Text(str(flag.get("reason") or "")),
        )
    return t


def servers_table(items: list[dict[str, Any]], title: str | None = None) -> Table:
    t = table(
        "ID", "KIND", "HOST", "PID", "STATUS", "STARTED", "HEARTBEAT", "IN FLIGHT", title=title
    )
    for s in items:
        t.add_row(
            cell(s.get("id")),
            cell(s.get("kind")),
            cell(s.get("host")),
            cell(s.get("pid")),
            status(s.get("status")),
            cell(when(s.get("started_at"))),
            cell(ago(s.get("last_heartbeat"))),
            cell(len(s.get("in_flight") or [])),
        )
    return t


def fields(pairs: list[tuple[str, Any]]) -> RenderableType:
    """A two-column grid of names and values."""
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for name, value in pairs:
        t.add_row(name, status(value) if name == "status" else cell(value))
    return t
