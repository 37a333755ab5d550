"""`paceline-activity-worker run`."""

from __future__ import annotations

import typer

from paceline_contracts.states import ServerKind
from paceline_infra import lifecycle
from paceline_worker.settings import WorkerSettings

app = typer.Typer(add_completion=False, help="The Paceline activity worker.")


@app.command()
def run() -> None:
    """Run activities until SIGTERM, SIGINT or a drain, then finish what is in flight."""
    from paceline_worker.service import serve

    lifecycle.run_server(ServerKind.ACTIVITY_WORKER, WorkerSettings(), serve)


@app.callback()
def _root() -> None:
    """Keeps `run` a subcommand even though it is the only one."""
