"""`paceline-activity-worker run`."""

from __future__ import annotations

import typer

from paceline_contracts.states import ServerKind
from paceline_infra import lifecycle
from paceline_infra.identity import ServerIdentity
from paceline_infra.logs import setup_logging
from paceline_worker.settings import WorkerSettings

app = typer.Typer(add_completion=False, help="The Paceline activity worker.")


@app.command()
def run() -> None:
    """Run activities until SIGTERM or SIGINT, then finish what is in flight."""
    from paceline_worker.service import serve

    settings = WorkerSettings()
    identity = ServerIdentity(ServerKind.ACTIVITY_WORKER)
    setup_logging(identity.id, settings.log_level)
    lifecycle.run(lambda stop: serve(settings, identity, stop))


@app.callback()
def _root() -> None:
    """Keeps `run` a subcommand even though it is the only one."""
