"""`paceline-scheduler run | migrate`."""

from __future__ import annotations

import asyncio
from importlib.resources import files

import typer

from paceline_contracts.states import ServerKind
from paceline_infra import db, lifecycle
from paceline_infra.identity import ServerIdentity
from paceline_infra.logs import setup_logging
from paceline_scheduler.settings import SchedulerSettings

app = typer.Typer(add_completion=False, help="The Paceline scheduler.")


@app.command()
def run() -> None:
    """Run a scheduler until SIGTERM or SIGINT."""
    from paceline_scheduler.service import serve

    settings = SchedulerSettings()
    identity = ServerIdentity(ServerKind.SCHEDULER)
    setup_logging(identity.id, settings.log_level)
    lifecycle.run(lambda stop: serve(settings, identity, stop))


@app.command()
def migrate() -> None:
    """Create the process database if needed and apply its migrations."""
    settings = SchedulerSettings()
    setup_logging("migrate", settings.log_level)
    applied = asyncio.run(
        db.migrate(settings.database_url, files("paceline_scheduler") / "migrations")
    )
    typer.echo(
        f"process database {db.redact(settings.database_url)}: {len(applied)} migration(s) applied"
    )
