"""Nothing an attempt started outlives its worker on the host: the orphans' janitor.

A shell command's program dies with its worker (`PR_SET_PDEATHSIG`, children.py), but what the
program started does not: re-parented to init, a `sleep 30; push` would run to its end and do
its effect after the failover rule flagged the attempt, and again if the operator retries it.

So every process an activity starts carries its owners in its environment, which its children
inherit: `PACELINE_ACTIVITY_OWNER=<pid>:<start>:<pid namespace>`, the worker's pid, its start
time (/proc/<pid>/stat field 22, in clock ticks since boot: a reused pid has another) and its
pid namespace (a pid means nothing in another one). An isolated runner adds itself after its
worker (`<worker> <runner>`): its commands are orphans when either dies.

Every activity-worker runs `janitor()`: at its start and then every `SWEEP_INTERVAL_S` it scans
/proc for processes whose owners include one that is gone (no such pid, a zombie, or another
start time), and SIGKILLs their sessions, each process group of them: the orphans, what they
started, and what shares their session even without the variable. It kills nothing whose
owners all live (its own trees included), never itself, and skips quietly what it cannot read
(other users' processes, unless it is root) and owners of other pid namespaces. A process that
both clears its environment and leaves its session is not found.

Linux only (/proc, prctl); elsewhere nothing is marked and the janitor returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

OWNER_VARIABLE = "PACELINE_ACTIVITY_OWNER"
SWEEP_INTERVAL_S = 2.0
"""How often each worker sweeps: orphans of a dead worker are killed this long after it died,
at most, while another worker runs on the host (a worker that starts sweeps at once)."""
_ROUNDS = 3
"""Scans in a sweep at most, while each finds a process the last one did not kill."""
_SETTLE_S = 0.05
_ENTRY = OWNER_VARIABLE.encode() + b"="


@dataclass(frozen=True)
class _Stat:
    state: str
    pgrp: int
    session: int
    start: int


def _stat(pid: int) -> _Stat | None:
    """What /proc/<pid>/stat says, or None when there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        # "pid (comm) state ppid pgrp session ... starttime(22)": comm may hold anything.
        fields = raw[raw.rindex(b")") + 2 :].split()
        return _Stat(fields[0].decode(), int(fields[2]), int(fields[3]), int(fields[19]))
    except (OSError, ValueError, IndexError):
        return None


def _pid_namespace() -> str:
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return link.removeprefix("pid:[").removesuffix("]")


_identity: tuple[int, str | None] | None = None


def identity() -> str | None:
    """This process as an owner, `<pid>:<start>:<pid namespace>`; None where it cannot be
    told (not Linux, no /proc)."""
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:  # computed once per process (and fork)
        me = _stat(pid) if sys.platform.startswith("linux") else None
        _identity = (pid, None if me is None else f"{pid}:{me.start}:{_pid_namespace()}")
    return _identity[1]


def marked(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a process started for an activity: its owners are those this process has
    (an isolated runner's worker) and this process. An `env` entry of the name is replaced:
    an activity cannot choose its owners."""
    me = identity()
    if me is None:
        return dict(env)
    inherited = os.environ.get(OWNER_VARIABLE, "").split()
    return {**env, OWNER_VARIABLE: " ".join([*inherited, me])}


@dataclass
class Reaped:
    """What a sweep killed for one orphaned session: its dead owners, its process groups and
    the processes it saw in them (pids only: a command line may hold secrets)."""

    session: int
    dead_owners: set[str] = field(default_factory=set)
    groups: set[int] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)


def _owners(pid: int) -> list[str] | None:
    """The owners in `pid`'s environment; None when it has none, or cannot be read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:  # gone, another user's, a kernel thread
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(_ENTRY):
            return entry[len(_ENTRY) :].decode(errors="replace").split()
    return None


def _is_dead(owner: str, namespace: str) -> bool:
    """Whether `owner` (`<pid>:<start>:<ns>`) is gone. Unsure (malformed, another pid
    namespace, a process this one may not see) counts as alive."""
    try:
        pid_text, start_text, owner_namespace = owner.split(":")
        pid, start = int(pid_text), int(start_text)
    except ValueError:
        return False
    if owner_namespace != namespace or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's: it exists, and its start time cannot be checked
    now = _stat(pid)
    if now is None:
        return False  # exists, but /proc hides it (hidepid)
    return now.start != start or now.state in ("Z", "X")


def _pids() -> list[int]:
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def _scan(namespace: str, spared: set[int]) -> dict[int, Reaped]:
    """The sessions of the processes whose owners include a dead one, each with the groups of
    every process in it; none of `spared` (this process's own pid, group and session)."""
    found: dict[int, Reaped] = {}
    verdicts: dict[str, bool] = {}
    pids = _pids()
    for pid in pids:
        owners = _owners(pid)
        if not owners:
            continue
        dead = set()
        for owner in owners:
            if owner not in verdicts:
                verdicts[owner] = _is_dead(owner, namespace)
            if verdicts[owner]:
                dead.add(owner)
        stat = _stat(pid) if dead else None
        if stat is None or stat.state in ("Z", "X") or stat.session <= 1:
            continue
        if {pid, stat.pgrp, stat.session} & spared:
            continue  # never this process: a worker itself started by an orphaned command
        found.setdefault(stat.session, Reaped(stat.session)).dead_owners |= dead
    if found:
        # Everything in those sessions, marked or not (a program may clear its environment).
        for pid in pids:
            stat = _stat(pid)
            if stat is None or stat.session not in found or stat.state in ("Z", "X"):
                continue
            if stat.pgrp > 1 and not {pid, stat.pgrp} & spared:
                found[stat.session].groups.add(stat.pgrp)
                found[stat.session].pids.add(pid)
    return found


def sweep() -> list[Reaped]:
    """Kill (SIGKILL) every session holding a process whose owners include a dead one, each
    of its process groups at once; returns what was killed. Blocking: reads /proc."""
    me = identity()
    if me is None:
        return []
    namespace = me.rsplit(":", 1)[1]
    own = _stat(os.getpid())
    spared = {os.getpid()} | ({own.pgrp, own.session} if own else set())
    reaped: dict[int, Reaped] = {}
    for _ in range(_ROUNDS):
        # Again while each round finds a process the last did not kill: one may have forked
        # into a group of its own between the scan and the kill.
        found = {
            session: seen
            for session, seen in _scan(namespace, spared).items()
            if session not in reaped or not seen.pids <= reaped[session].pids
        }
        if not found:
            break
        for session in found.values():
            for group in sorted(session.groups):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
            log.warning(
                "killed the orphans of dead activity owner(s) %s: session %d, process groups "
                "%s, pids %s",
                ", ".join(sorted(session.dead_owners)),
                session.session,
                _listed(session.groups),
                _listed(session.pids),
            )
            known = reaped.setdefault(session.session, Reaped(session.session))
            known.dead_owners |= session.dead_owners
            known.groups |= session.groups
            known.pids |= session.pids
        time.sleep(_SETTLE_S)  # SIGKILLed processes take a moment to be gone
    return list(reaped.values())


def _listed(numbers: Iterable[int]) -> str:
    return " ".join(str(n) for n in sorted(numbers)) or "-"


async def janitor(interval_s: float = SWEEP_INTERVAL_S) -> None:
    """Sweep now and then every `interval_s` seconds, until cancelled. Returns at once where
    nothing is marked (not Linux)."""
    if identity() is None:
        return
    while True:
        try:
            await asyncio.to_thread(sweep)
        except Exception:  # a bug: the next sweep may do better; the worker goes on
            log.exception("sweeping for orphaned activity processes failed")
        await asyncio.sleep(interval_s)
