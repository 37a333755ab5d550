"""`paceline-reporting run | migrate | check`."""

from __future__ import annotations

import typer

from paceline_contracts.states import ServerKind
from paceline_infra import lifecycle
from paceline_infra.settings import Settings

app = typer.Typer(add_completion=False, help="The Paceline reporting service.")


@app.command()
def run() -> None:
    """Apply instance events to the reporting database until SIGTERM, SIGINT or a drain."""
    lifecycle.catch_signals_early()
    from paceline_reporting.service import serve

    lifecycle.run_server(ServerKind.REPORTING, Settings(), serve)


@app.command()
def migrate() -> None:
    """Create the reporting database if needed and apply its migrations."""
    url = Settings().reporting_database_url
    typer.echo(lifecycle.migrate_command(url, "paceline_reporting", "reporting database"))


@app.command()
def check() -> None:
    """Check the settings (PACELINE_* environment variables) without starting anything: print
    every problem and exit 2, or exit 0 when they are fine."""
    lifecycle.check_command(Settings, "paceline-reporting")
