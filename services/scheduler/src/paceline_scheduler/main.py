"""`paceline-scheduler run | migrate | check`."""

from __future__ import annotations

import typer

from paceline_contracts.states import ServerKind
from paceline_infra import lifecycle
from paceline_scheduler.settings import SchedulerSettings

app = typer.Typer(add_completion=False, help="The Paceline scheduler.")


@app.command()
def run() -> None:
    """Run a scheduler until SIGTERM, SIGINT or a drain."""
    lifecycle.catch_signals_early()
    from paceline_scheduler.service import serve

    lifecycle.run_server(ServerKind.SCHEDULER, SchedulerSettings(), serve)


@app.command()
def migrate() -> None:
    """Create the process database if needed and apply its migrations."""
    from paceline_scheduler.upgrade import carry_over_instances

    url = SchedulerSettings().database_url
    typer.echo(
        lifecycle.migrate_command(
            url, "paceline_scheduler", "process database", after=carry_over_instances
        )
    )


@app.command()
def check() -> None:
    """Check the settings (PACELINE_* environment variables) without starting anything: print
    every problem and exit 2, or exit 0 when they are fine."""
    lifecycle.check_command(SchedulerSettings, "paceline-scheduler")
