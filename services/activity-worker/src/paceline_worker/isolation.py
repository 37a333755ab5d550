"""Running a suspect alone: in a runner process of its own, started for that one activity.

A suspect is an activity that was running on a worker when the worker died, more than once
(DESIGN.md, "Crashes are charged to their cause"). Run inside the worker it could take the
worker, and every healthy activity beside it, down again; run here, a crash takes down only
its runner, the worker sees which activity did it, and the scheduler charges that one alone.

The runner is `python -m paceline_worker.isolated` (isolated.py): the task goes in on stdin,
the outcome comes back as one JSON object on stdout. It is stopped (cancel, time-out) with
SIGTERM, which lets the adapter stop what it started, then SIGKILL after a grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from typing import Any

from paceline_contracts.messages import ActivityTask
from paceline_infra.children import die_with_parent
from paceline_worker import orphans
from paceline_worker.adapters import ActivityFailure

STOP_GRACE_S = 10.0
"""How long a runner told to stop (SIGTERM) may take before it is killed: its adapter's own
grace (a shell command's `kill_grace`, 5 s by default) and a margin."""
_STDERR_TAIL = 500


class RunnerCrashed(Exception):
    """The runner process died before it reported an outcome: the activity crashed it."""


async def run_isolated(task: ActivityTask) -> Any:
    """Run `task` in a fresh runner process; returns the adapter's output.

    Raises `ActivityFailure` as the adapter did, `RunnerCrashed` when the runner died without
    an outcome. When cancelled (a cancel, the step's time-out), stops the runner first.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "paceline_worker.isolated",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Marked with this worker as its owner; the runner adds itself for what it starts, so
        # that is killed when either dies (orphans.py).
        env=orphans.marked(os.environ),
        start_new_session=True,
        # A SIGTERM when its worker dies: no suspect runs on unattended (its message goes back
        # to the queue and runs again elsewhere).
        preexec_fn=die_with_parent(signal.SIGTERM),
    )
    try:
        stdout, stderr = await proc.communicate(task.model_dump_json().encode())
    except BaseException:
        await _stop(proc)
        raise
    finally:
        if proc.returncode not in (0, None):
            # It died, or was stopped: what it started is killed now, not at the next sweep.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(orphans.sweep)
    return _outcome(proc, stdout, stderr)


def _outcome(proc: asyncio.subprocess.Process, stdout: bytes, stderr: bytes) -> Any:
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        reported = json.loads(lines[-1]) if lines else None
    except ValueError:
        reported = None
    if not isinstance(reported, dict) or "status" not in reported:
        raise RunnerCrashed(
            f"its isolated runner (pid {proc.pid}) {_exit_status(proc.returncode)} "
            f"without reporting an outcome{_tail(stderr)}"
        )
    if reported["status"] == "COMPLETED":
        return reported.get("output")
    error = reported.get("error") or {}
    raise ActivityFailure(
        str(error.get("kind", "adapter")),
        str(error.get("message", "no message")),
        outcome_unknown=bool(error.get("outcome_unknown", False)),
    )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_GRACE_S):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _tail(stderr: bytes) -> str:
    text = stderr.decode(errors="replace").strip()
    if not text:
        return ""
    if len(text) > _STDERR_TAIL:
        text = "..." + text[-_STDERR_TAIL:]
    return f"; its stderr: {text}"
