"""`paceline watch`: a live table of the newest instances and of the servers.

On a terminal the tables are redrawn in place every `--interval`; written to a pipe (or with
`--once`) each refresh is printed after the previous one. `--format json|jsonl` prints each
refresh as `{"at", "instances": <GET /v1/instances>, "servers": <GET /v1/servers>}`."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.text import Text

from paceline_cli import render
from paceline_cli.client import Client
from paceline_cli.render import Format


def snapshot(
    client: Client, *, limit: int, statuses: list[str], definition: str | None
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if statuses:
        params["status"] = statuses
    if definition:
        params["definition"] = definition
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "instances": client.pages("/v1/instances", params, limit=limit),
        "servers": client.get("/v1/servers"),
    }


def view(snap: dict[str, Any], interval: float | None) -> RenderableType:
    instances = snap["instances"]["items"]
    servers = snap["servers"]["items"]
    counts: dict[str, int] = {}
    for i in instances:
        counts[i["status"]] = counts.get(i["status"], 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    footer = f"at {render.when(snap['at'])}"
    if interval is not None:
        footer += f", every {interval:g}s (Ctrl-C to stop)"
    return Group(
        render.instances_table(instances, title=f"Instances (newest {len(instances)}: {tally})"),
        render.servers_table(servers, title=f"Servers ({len(servers)})"),
        Text(footer, style="dim"),
    )


def run(
    client: Client,
    fmt: Format,
    *,
    interval: float,
    iterations: int | None,
    limit: int,
    statuses: list[str],
    definition: str | None,
) -> None:
    """Refresh until Ctrl-C, or `iterations` times."""
    console = render.stdout()
    live = fmt is Format.table and console.is_terminal and iterations != 1
    done = 0

    def take() -> dict[str, Any]:
        return snapshot(client, limit=limit, statuses=statuses, definition=definition)

    try:
        if live:
            with Live(view(take(), interval), console=console, auto_refresh=False) as screen:
                done = 1
                while iterations is None or done < iterations:
                    time.sleep(interval)
                    screen.update(view(take(), interval), refresh=True)
                    done += 1
            return
        while iterations is None or done < iterations:
            if done:
                time.sleep(interval)
            snap = take()
            done += 1
            if fmt is Format.table:
                if done > 1:
                    render.show(Text(""))
                render.show(view(snap, None))
            else:
                render.emit_json(snap, fmt, list_key=None)
    except KeyboardInterrupt:
        return
