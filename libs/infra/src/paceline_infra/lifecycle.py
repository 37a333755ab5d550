"""Process lifecycle: SIGTERM and SIGINT ask for a friendly shutdown through one event."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any, TypeVar

import asyncpg
from pydantic import SecretBytes, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsError

from paceline_contracts.states import ServerKind
from paceline_infra import db
from paceline_infra.identity import ServerIdentity
from paceline_infra.logs import setup_logging
from paceline_infra.settings import Settings

log = logging.getLogger(__name__)
AnySettings = TypeVar("AnySettings", bound=Settings)


_early: list[int] = []
"""Signals received before the event loop took over (see `catch_signals_early`)."""


def catch_signals_early() -> None:
    """From now on, a SIGTERM or SIGINT is remembered instead of killing the process: a service
    told to stop while it is still starting (importing, connecting) then starts, sees `stop`
    set, and exits 0 as a drained server does. Call it first thing in a `run` command."""

    def remember(signum: int, _frame: object) -> None:
        _early.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, remember)


def early_signal() -> signal.Signals | None:
    """The first signal `catch_signals_early` remembered, if any."""
    return signal.Signals(_early[0]) if _early else None


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` until it returns; a signal sets `stop`, a second one exits at once."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if (early := early_signal()) is not None:
            log.info("%s before start-up ended: shutting down", early.name)
            stop.set()

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


def migrate_command(
    url: str,
    package: str,
    what: str,
    after: Callable[[asyncpg.Connection], Awaitable[object]] | None = None,
) -> str:
    """Create the database in `url` if needed and apply `package`'s migrations, then `after`
    (see `db.migrate`); says what it did, without the password."""
    setup_logging("migrate", "INFO")
    applied = asyncio.run(db.migrate(url, files(package) / "migrations", after))
    return f"{what} {db.redact(url)}: {len(applied)} migration(s) applied"


_SECRET_HINTS = ("token", "password", "secret", "url", "key")
"""A field whose name holds one of these may carry a credential: its value is never shown."""


def settings_problems(settings_class: type[BaseSettings]) -> list[str]:
    """Every problem with `settings_class` as the environment gives it, one line each, named by
    the environment variable (`PACELINE_ADMIN_TOKEN: use at least 16 characters`); empty when
    the settings are fine. The value given is shown only where it cannot be a secret."""
    try:
        settings_class()
    except ValidationError as exc:
        return [_problem(settings_class, error) for error in exc.errors()]
    except SettingsError as exc:  # e.g. a value that should be JSON and is not
        return [str(exc)]
    return []


def check_command(settings_class: type[BaseSettings], program: str) -> None:
    """The `check` command of every service: prints each settings problem (to stderr) and
    exits 2 when there is one; prints that the settings are fine and returns otherwise."""
    problems = settings_problems(settings_class)
    for problem in problems:
        print(f"{program}: {problem}", file=sys.stderr, flush=True)
    if problems:
        raise SystemExit(2)
    print(f"{program}: settings OK", flush=True)


def _problem(settings_class: type[BaseSettings], error: Any) -> str:
    prefix = str(settings_class.model_config.get("env_prefix") or "")
    loc = [str(part) for part in error.get("loc", ())]
    field = loc[0] if loc else ""
    name = f"{prefix}{field}".upper() if field else "settings"
    if len(loc) > 1:
        name += "." + ".".join(loc[1:])
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    given = error.get("input")
    if (
        error.get("type") != "missing"
        and isinstance(given, str | int | float)
        and not _may_be_secret(settings_class, field)
    ):
        message += f" (given: {str(given)[:80]!r})"
    return f"{name}: {message}"


def _may_be_secret(settings_class: type[BaseSettings], field: str) -> bool:
    info = settings_class.model_fields.get(field)
    if info is None or any(hint in field.lower() for hint in _SECRET_HINTS):
        return True
    annotation = repr(info.annotation)
    return any(kind.__name__ in annotation for kind in (SecretStr, SecretBytes))
