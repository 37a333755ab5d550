"""A service told to stop while it is still starting stops as a drained one does (exit 0),
instead of dying of the signal."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import asyncio, os, signal, sys
from paceline_infra import lifecycle

lifecycle.catch_signals_early()
os.kill(os.getpid(), signal.SIG{name})  # arrives before the event loop takes over

async def main(stop: asyncio.Event) -> None:
    print("stop set at start:", stop.is_set(), flush=True)
    await asyncio.wait_for(stop.wait(), 5)

lifecycle.run(main)
"""


def _run(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM.format(name=name)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_sigterm_during_start_up_is_a_friendly_stop() -> None:
    done = _run("TERM")
    assert done.returncode == 0, done.stderr
    assert "stop set at start: True" in done.stdout


def test_a_sigint_during_start_up_is_a_friendly_stop() -> None:
    done = _run("INT")
    assert done.returncode == 0, done.stderr
    assert "stop set at start: True" in done.stdout
