"""Process lifecycle: SIGTERM and SIGINT ask for a friendly shutdown through one event."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import TypeVar

from paceline_contracts.states import ServerKind
from paceline_infra import db
from paceline_infra.identity import ServerIdentity
from paceline_infra.logs import setup_logging
from paceline_infra.settings import Settings

log = logging.getLogger(__name__)
AnySettings = TypeVar("AnySettings", bound=Settings)


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` until it returns; a signal sets `stop`, a second one exits at once."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s: shutting down", signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await main(stop)

    asyncio.run(runner())


def run_server(
    kind: ServerKind,
    settings: AnySettings,
    serve: Callable[[AnySettings, ServerIdentity, asyncio.Event], Awaitable[None]],
) -> None:
    """The `run` command of every service: who it is, its logs, then `serve` until stopped."""
    identity = ServerIdentity(kind)
    setup_logging(identity.id, settings.log_level)
    run(lambda stop: serve(settings, identity, stop))


def migrate_command(url: str, package: str, what: str) -> str:
    """Create the database in `url` if needed and apply `package`'s migrations; says what it
    did, without the password."""
    setup_logging("migrate", "INFO")
    applied = asyncio.run(db.migrate(url, files(package) / "migrations"))
    return f"{what} {db.redact(url)}: {len(applied)} migration(s) applied"
