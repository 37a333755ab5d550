"""The `paceline-admin` command: `paceline-admin run` serves the admin API; `check` checks its
settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import typer
import uvicorn
from pydantic import ValidationError

from paceline_admin.app import create_app
from paceline_admin.settings import AdminSettings
from paceline_contracts.states import ServerKind
from paceline_infra import lifecycle
from paceline_infra.identity import ServerIdentity
from paceline_infra.logs import setup_logging
from paceline_infra.telemetry import setup_tracing

log = logging.getLogger("paceline_admin")
app = typer.Typer(help="The Paceline admin API service.", add_completion=False)


@app.callback()
def _group() -> None:
    """The Paceline admin API service (settings from PACELINE_* environment variables)."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Ours are installed on the loop instead: uvicorn's re-raise the signal after its
        # graceful shutdown, which would turn a clean stop into a death by signal.
        yield


async def _serve(settings: AdminSettings, identity: ServerIdentity) -> None:
    application = create_app(settings, identity)
    # Set by a drain (through the app's presence) or by a signal: either way, stop serving.
    stop: asyncio.Event = application.state.stop
    config = uvicorn.Config(
        application,
        host="0.0.0.0",
        port=settings.admin_port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = _Server(config)

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s: finishing requests in flight, then stopping", sig.name)
        if server.should_exit:
            server.force_exit = True  # a second signal: do not wait any longer
        server.should_exit = True
        stop.set()  # reported as DRAINING at once, DRAINED when the lifespan ends

    async def exit_when_stopped() -> None:
        await stop.wait()
        # Also when it comes during the lifespan's startup: uvicorn then skips serving but
        # still shuts down (and so ends the lifespan, which reports DRAINED).
        if not server.should_exit:
            log.info("drain requested: finishing requests in flight, then stopping")
        server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if (early := lifecycle.early_signal()) is not None:
        on_signal(early)  # told to stop while it was still starting
    watcher = asyncio.create_task(exit_when_stopped(), name="exit when stopped")
    try:
        await server.serve()
    finally:
        watcher.cancel()
    if server.started:
        log.info("stopped")
    else:
        raise SystemExit(1)  # the lifespan failed: database or broker unreachable


@app.command()
def run() -> None:
    """Serve the admin API on 0.0.0.0:PACELINE_ADMIN_PORT until SIGTERM, SIGINT or a drain
    (`POST /v1/servers/{id}/drain`); then finish the requests in flight and exit 0."""
    lifecycle.catch_signals_early()
    try:
        settings = AdminSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"PACELINE_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        typer.echo(f"paceline-admin: bad settings: {problems}", err=True)
        raise typer.Exit(2) from None
    identity = ServerIdentity(ServerKind.ADMIN)
    setup_logging(identity.id, settings.log_level)
    provider = setup_tracing(identity, settings)
    log.info("admin API on port %d (namespace %s)", settings.admin_port, settings.namespace)
    try:
        asyncio.run(_serve(settings, identity))
    finally:
        provider.shutdown()


@app.command()
def check() -> None:
    """Check the settings (PACELINE_* environment variables) without starting anything: print
    every problem (never the token) and exit 2, or exit 0 when they are fine."""
    lifecycle.check_command(AdminSettings, "paceline-admin")
