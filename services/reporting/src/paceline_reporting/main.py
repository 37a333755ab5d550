"""`paceline-reporting run | migrate`."""

from __future__ import annotations

import asyncio
from importlib.resources import files

import typer

from paceline_contracts.states import ServerKind
from paceline_infra import db, lifecycle
from paceline_infra.identity import ServerIdentity
from paceline_infra.logs import setup_logging
from paceline_infra.settings import Settings

app = typer.Typer(add_completion=False, help="The Paceline reporting service.")


@app.command()
def run() -> None:
    """Apply instance events to the reporting database until SIGTERM or SIGINT."""
    from paceline_reporting.service import serve

    settings = Settings()
    identity = ServerIdentity(ServerKind.REPORTING)
    setup_logging(identity.id, settings.log_level)
    lifecycle.run(lambda stop: serve(settings, identity, stop))


@app.command()
def migrate() -> None:
    """Create the reporting database if needed and apply its migrations."""
    settings = Settings()
    setup_logging("migrate", settings.log_level)
    applied = asyncio.run(
        db.migrate(settings.reporting_database_url, files("paceline_reporting") / "migrations")
    )
    typer.echo(
        f"reporting database {db.redact(settings.reporting_database_url)}: "
        f"{len(applied)} migration(s) applied"
    )
