"""The `roll` fault: a rolling restart, as a deploy does it. Every activity-worker in turn gets
SIGTERM (a friendly shutdown: it drains, exits 0, and the supervisor starts a fresh one), each
only once the previous one's replacement is up (ACTIVE in `GET /v1/servers`). Meanwhile the
stack must keep processing: instances complete while the roll runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from chaos_api import Api, ApiUnavailable
from chaos_supervisor import Supervisor

from stack import Service

KIND = "activity-worker"
UP_WAIT_S = 60.0
"""How long a roll waits for a worker to be up (ACTIVE in the registry, not frozen, not being
restarted) to drain it: a process still starting has nothing to drain, and dies of SIGTERM."""
EXIT_WAIT_S = 60.0
"""How long a drained worker may take to exit (its grace is PACELINE_WORKER_GRACE_S)."""
ACTIVE_WAIT_S = 60.0
"""How long its replacement may take to be ACTIVE in the server registry."""


@dataclass
class Drained:
    name: str
    pid: int
    exit_code: int | None = None
    """None: it did not exit within EXIT_WAIT_S."""
    replacement: int | None = None
    """The pid of the fresh process, once the registry shows it ACTIVE."""
    waited_s: float = 0.0
    """From its turn to its SIGTERM: until it was up (another fault may have hit it)."""
    exited_s: float = 0.0
    """From its SIGTERM to its exit."""
    took_s: float = 0.0
    """From its SIGTERM to its replacement ACTIVE."""


@dataclass
class Roll:
    index: int
    started_at: float
    """time.time() when the first worker got its SIGTERM."""
    ended_at: float | None = None
    drained: list[Drained] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return ", ".join(
            f"{d.name} (up after {d.waited_s:.1f}s) pid {d.pid} exit {d.exit_code} in "
            f"{d.exited_s:.1f}s, pid {d.replacement} ACTIVE in {d.took_s:.1f}s"
            for d in self.drained
        )


@dataclass
class Roller:
    supervisor: Supervisor
    api: Api
    say: Callable[[str], None]
    note: Callable[[str], None] = print
    """Detail for the run's log only."""
    rolls: list[Roll] = field(default_factory=list)
    current: str | None = None
    """The worker whose turn it is, from its turn until its replacement is up: other faults
    leave it alone meanwhile."""
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self) -> Roll:
        """Begin a roll in the background (after any roll still under way); returns its record."""
        roll = Roll(len(self.rolls) + 1, time.time())
        self.rolls.append(roll)
        task = asyncio.create_task(self._roll(roll))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return roll

    async def finish(self) -> None:
        """Wait for every roll to end."""
        while self._tasks:
            await asyncio.gather(*self._tasks)

    async def _roll(self, roll: Roll) -> None:
        async with self._lock:
            roll.started_at = time.time()
            workers = sorted(self.supervisor.stack.of_kind(KIND), key=lambda s: s.name)
            try:
                for service in workers:
                    self.current = service.name
                    drained = await self._one(roll, service)
                    if drained is not None:
                        roll.drained.append(drained)
            finally:
                self.current = None
                roll.ended_at = time.time()
            self.say(
                f"roll {roll.index} done in {roll.ended_at - roll.started_at:.1f}s: "
                f"{roll.describe()}"
            )

    async def _one(self, roll: Roll, service: Service) -> Drained | None:
        async def ready() -> bool:
            current = service.process
            if current is None or not self.supervisor.up(service):
                return False
            return await self._active(current.pid) and service.process is current

        turn = time.monotonic()
        if not await _within(UP_WAIT_S, ready):
            roll.problems.append(f"{service.name} was not up within {UP_WAIT_S:.0f}s to drain")
            return None
        began = time.monotonic()
        process = service.process
        assert process is not None
        drained = Drained(service.name, process.pid, waited_s=began - turn)
        self.note(f"roll {roll.index}: SIGTERM to {service.name} (pid {process.pid})")
        self.supervisor.drain(service)

        async def exited() -> bool:
            return process.poll() is not None

        if not await _within(EXIT_WAIT_S, exited):
            roll.problems.append(
                f"{service.name} (pid {process.pid}) did not exit within "
                f"{EXIT_WAIT_S:.0f}s of its SIGTERM"
            )
            return drained
        drained.exit_code = process.returncode
        drained.exited_s = time.monotonic() - began
        self.note(
            f"roll {roll.index}: {service.name} (pid {process.pid}) exited {process.returncode} "
            f"after {time.monotonic() - began:.1f}s"
        )
        if process.returncode != 0:
            roll.problems.append(
                f"{service.name} (pid {process.pid}) exited {process.returncode} after SIGTERM, "
                "not 0"
            )

        async def replaced() -> bool:
            current = service.process
            if current is None or current is process or not self.supervisor.up(service):
                return False
            return await self._active(current.pid)

        if await _within(ACTIVE_WAIT_S, replaced):
            assert service.process is not None
            drained.replacement = service.process.pid
            self.note(
                f"roll {roll.index}: {service.name} replaced by pid {drained.replacement}, "
                f"ACTIVE {time.monotonic() - began:.1f}s after its SIGTERM"
            )
        else:
            roll.problems.append(
                f"{service.name}: no replacement ACTIVE in the registry within "
                f"{ACTIVE_WAIT_S:.0f}s of pid {process.pid}'s exit"
            )
        drained.took_s = time.monotonic() - began
        return drained

    async def _active(self, pid: int) -> bool:
        try:
            response = await self.api.call(
                "GET", "/v1/servers", params={"kind": KIND, "status": "ACTIVE"}, patience=5
            )
        except ApiUnavailable:
            return False
        if response.status_code != 200:
            return False
        return any(s.get("pid") == pid for s in response.json().get("items", []))


async def _within(seconds: float, ready: Callable[[], Awaitable[bool]]) -> bool:
    deadline = time.monotonic() + seconds
    while not await ready():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.25)
    return True
