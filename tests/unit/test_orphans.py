"""The orphans' janitor (paceline_worker/orphans.py), against real process trees: what an
activity started is killed once an owner of it is gone, and nothing whose owners live.

Other workers on this machine (a failover test's stack) sweep too, and may kill a tree of a
dead owner before a test's own sweep does: the tests assert what is gone, not who killed it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from paceline_engine.activity_types import ShellCommandParams
from paceline_worker import orphans
from paceline_worker.adapters import shell_command

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

SECRET = "s3cret-in-argv"


def _fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].decode().split()


def owner_of(pid: int, *, start_offset: int = 0) -> str:
    """`pid` as an owner, as a worker marks what it starts: `<pid>:<start>:<pid namespace>`."""
    fields = _fields(pid)
    assert fields is not None
    namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    return f"{pid}:{int(fields[19]) + start_offset}:{namespace}"


def gone(pid: int) -> bool:
    fields = _fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, [pid for pid in pids if not gone(pid)]
        time.sleep(0.05)


def read_pids(path: Path, count: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= count:
            return [int(line) for line in lines]
        assert time.monotonic() < deadline, f"{path}: {lines}"
        time.sleep(0.02)


# Leaves its group and its session (setsid), clears its environment (env -i), starts a
# grandchild in a subshell: each pid on a line of $1.
TREE = (
    "sleep 1000 & echo $! >> $1; "
    "setsid sleep 1001 & echo $! >> $1; "
    "env -i sleep 1002 & echo $! >> $1; "
    "(sleep 1003; :) & echo $! >> $1; "
    f"wait; : {SECRET}"
)


class Trees:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []

    def owner(self) -> subprocess.Popen[bytes]:
        """A process to own trees (and die when the test says)."""
        proc = subprocess.Popen(["sleep", "1000"])
        self.started.append(proc)
        return proc

    def tree(self, owners: str | None) -> tuple[subprocess.Popen[bytes], list[int]]:
        """`TREE` in a session of its own marked with `owners`: its shell and every pid in it."""
        pids = self.tmp_path / f"pids-{uuid.uuid4().hex[:6]}"
        env = dict(os.environ)
        env.pop(orphans.OWNER_VARIABLE, None)
        if owners is not None:
            env[orphans.OWNER_VARIABLE] = owners
        proc = subprocess.Popen(
            ["sh", "-c", TREE, "sh", str(pids)], env=env, start_new_session=True
        )
        self.started.append(proc)
        tree = [proc.pid, *read_pids(pids, 4)]
        self.pids += tree
        return proc, tree

    def close(self) -> None:
        """Kill every tree left, whole: each session that holds one of its pids."""
        sessions = {int(fields[3]) for pid in self.pids if (fields := _fields(pid))}
        for entry in os.listdir("/proc"):
            fields = _fields(int(entry)) if entry.isdigit() else None
            if fields and int(fields[3]) in sessions:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)
        for proc in self.started:
            proc.kill()
            proc.wait()


@pytest.fixture
def trees(tmp_path: Path) -> Iterator[Trees]:
    made = Trees(tmp_path)
    yield made
    made.close()


def test_a_tree_whose_owner_died_is_killed_whole(trees: Trees) -> None:
    owner = trees.owner()
    shell, pids = trees.tree(owner_of(owner.pid))
    orphans.sweep()
    assert not any(gone(pid) for pid in pids), "killed while its owner lived"

    owner.kill()
    owner.wait()
    orphans.sweep()
    # The shell, its children in its group, the one that left for a session of its own, the
    # one without the variable (same session) and the grandchild.
    wait_gone(pids, timeout=1.0)
    assert shell.wait(5) == -signal.SIGKILL


def test_an_owner_that_is_a_zombie_is_dead(trees: Trees) -> None:
    owner = trees.owner()
    _, pids = trees.tree(owner_of(owner.pid))
    owner.kill()  # not waited for: a zombie until its parent reaps it
    time.sleep(0.2)
    assert gone(owner.pid) and Path(f"/proc/{owner.pid}").exists()
    orphans.sweep()
    wait_gone(pids, timeout=1.0)


def test_a_reused_pid_is_no_owner(trees: Trees) -> None:
    # This process, with another start time: the owner that had this pid is dead.
    _, pids = trees.tree(owner_of(os.getpid(), start_offset=-1))
    orphans.sweep()
    wait_gone(pids, timeout=1.0)


def test_trees_whose_owners_all_live_are_left_alone(trees: Trees) -> None:
    owner = trees.owner()
    live = owner_of(owner.pid)
    dead = owner_of(os.getpid(), start_offset=-1)
    dead_elsewhere = dead.rsplit(":", 1)[0] + ":1"
    kept = [
        trees.tree(None)[1],  # not an activity's
        trees.tree(live)[1],
        trees.tree(f"{owner_of(os.getpid())} {live}")[1],  # an isolated runner's, say
        trees.tree(dead_elsewhere)[1],  # a pid of another pid namespace means nothing here
        trees.tree(f"garbage {live} 12:ab:{live.rsplit(':', 1)[1]}")[1],
    ]
    # One dead owner among live ones is enough: the runner died, or its worker did.
    _, doomed = trees.tree(f"{live} {dead}")
    orphans.sweep()
    wait_gone(doomed, timeout=1.0)
    time.sleep(0.2)
    for pids in kept:
        assert not any(gone(pid) for pid in pids), pids


def test_a_sweep_logs_pids_and_owners_never_arguments(
    trees: Trees, caplog: pytest.LogCaptureFixture
) -> None:
    owner = trees.owner()
    dead = owner_of(owner.pid)
    _, pids = trees.tree(dead)
    owner.kill()
    owner.wait()
    with caplog.at_level(logging.WARNING, logger="paceline_worker.orphans"):
        reaped = orphans.sweep()
    wait_gone(pids, timeout=1.0)
    assert SECRET not in caplog.text
    ours = [session for session in reaped if session.pids & set(pids)]
    if ours:  # else another worker on this machine was first
        assert {owner for session in ours for owner in session.dead_owners} == {dead}
        assert set(pids) <= {pid for session in ours for pid in session.pids}
        assert f"session {pids[0]}" in caplog.text and dead in caplog.text


async def test_a_shell_command_is_marked_with_its_worker() -> None:
    me = orphans.identity()
    assert me is not None and me == owner_of(os.getpid())
    # An `env` entry of the variable cannot choose other owners.
    params = ShellCommandParams.model_validate(
        {
            "argv": ["sh", "-c", f'echo "${orphans.OWNER_VARIABLE}"'],
            "env": {orphans.OWNER_VARIABLE: "1:1:1"},
        }
    )
    output = await shell_command(params)
    assert output["stdout"].strip() == me


WORKER = """
import asyncio, os, signal, sys
from paceline_engine.activity_types import ShellCommandParams
from paceline_worker.adapters import shell_command

async def main() -> None:
    params = ShellCommandParams.model_validate({"argv": ["sh", "-c", sys.argv[1]]})
    task = asyncio.create_task(shell_command(params))
    while not os.path.exists(sys.argv[2]):
        await asyncio.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)  # the worker dies while the command runs
    await task

asyncio.run(main())
"""

# A grandchild that would do the effect ($2) after a while, and a sleep the shell waits for;
# their pids in $1, once both are known.
LATE_EFFECT = (
    "(sleep 3; echo late > $2) & echo $! > $1.tmp; "
    "sleep 1000 & echo $! >> $1.tmp; mv $1.tmp $1; wait"
)


def test_what_a_dead_workers_command_started_is_killed(tmp_path: Path) -> None:
    pids_file, effect = tmp_path / "pids", tmp_path / "effect"
    command = LATE_EFFECT.replace("$1", str(pids_file)).replace("$2", str(effect))
    worker = subprocess.run(
        [sys.executable, "-c", WORKER, command, str(pids_file)], capture_output=True, timeout=60
    )
    assert worker.returncode == -signal.SIGKILL, worker.stderr
    pids = read_pids(pids_file, 2)
    orphans.sweep()
    wait_gone(pids, timeout=1.0)
    time.sleep(3.5)
    assert not effect.exists(), "the command's grandchild ran on after its worker died"


def test_what_a_dead_isolated_runner_started_is_killed(tmp_path: Path) -> None:
    # This test is the runner's worker: it lives; the runner dies (its command kills it).
    pids_file, effect = tmp_path / "pids", tmp_path / "effect"
    command = LATE_EFFECT.replace("; wait", "; kill -9 $PPID; wait")
    command = command.replace("$1", str(pids_file)).replace("$2", str(effect))
    task = {
        "instance_id": str(uuid.uuid4()),
        "step": "boom",
        "activity_type": "shell.command",
        "params": {"argv": ["sh", "-c", command]},
        "attempt": 1,
        "restartable": True,
        "isolated": True,
    }
    runner = subprocess.run(
        [sys.executable, "-m", "paceline_worker.isolated"],
        input=json.dumps(task).encode(),
        env=orphans.marked(os.environ),
        capture_output=True,
        timeout=60,
    )
    assert runner.returncode == -signal.SIGKILL, runner.stderr
    pids = read_pids(pids_file, 2)
    orphans.sweep()
    wait_gone(pids, timeout=1.0)
    time.sleep(3.5)
    assert not effect.exists(), "the command's grandchild ran on after its runner died"
