"""A shell command does not outlive the worker that runs it: when the worker dies, the failover
rule hands its work to a survivor (or flags it), so a command left running could do its effect
a second time."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

WORKER = """
import asyncio, os, signal, sys
from paceline_engine.activity_types import ShellCommandParams
from paceline_worker.adapters import shell_command

async def main() -> None:
    params = ShellCommandParams.model_validate(
        {{"argv": ["sh", "-c", "echo started > {started}; sleep 3; echo done > {effect}"]}}
    )
    task = asyncio.create_task(shell_command(params))
    while not os.path.exists("{started}"):
        await asyncio.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)  # the worker dies while the command runs
    await task

asyncio.run(main())
"""


def test_a_shell_command_dies_with_its_worker(tmp_path: Path) -> None:
    started, effect = tmp_path / "started", tmp_path / "effect"
    program = WORKER.format(started=started, effect=effect)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert started.exists(), "the command never started"
    time.sleep(4)  # past the command's 3 s
    assert not effect.exists(), "the command ran on after its worker died"
    # Nothing of it is left either.
    leftovers = subprocess.run(["pgrep", "-f", str(effect)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", leftovers.stdout
