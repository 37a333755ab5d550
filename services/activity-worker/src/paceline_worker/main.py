"""`paceline-activity-worker run | check`."""

from __future__ import annotations

import typer

from paceline_contracts.states import ServerKind
from paceline_infra import lifecycle
from paceline_worker.settings import WorkerSettings

app = typer.Typer(add_completion=False, help="The Paceline activity worker.")


@app.command()
def run() -> None:
    """Run activities until SIGTERM, SIGINT or a drain, then finish what is in flight."""
    lifecycle.catch_signals_early()
    from paceline_worker.service import serve

    lifecycle.run_server(ServerKind.ACTIVITY_WORKER, WorkerSettings(), serve)


@app.callback()
def _root() -> None:
    """Keeps `run` a subcommand (`paceline-activity-worker run`)."""


@app.command()
def check() -> None:
    """Check the settings (PACELINE_* environment variables) without starting anything: print
    every problem and exit 2, or exit 0 when they are fine."""
    lifecycle.check_command(WorkerSettings, "paceline-activity-worker")
