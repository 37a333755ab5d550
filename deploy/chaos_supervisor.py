"""What `make run` does for a stack, with the chaos run's timing: a service process that died
(SIGKILL, or the exit after a SIGTERM drain) is started again after a short random delay, and a
SIGSTOPped one gets its SIGCONT when its time is up."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stack import Service, Stack

RESTART_DELAY_S = (0.2, 2.0)


@dataclass
class Supervisor:
    stack: Stack
    rng: random.Random
    say: Callable[[str], None]
    restart_at: dict[str, float] = field(default_factory=dict)
    """a dead service -> when it is started again"""
    resume_at: dict[str, float] = field(default_factory=dict)
    """a SIGSTOPped service -> when it gets SIGCONT"""
    draining: set[str] = field(default_factory=set)
    """SIGTERMed services that have not exited yet"""
    restarts: int = 0

    def up(self, service: Service) -> bool:
        """Alive and doing its work: not frozen, not on its way out."""
        return (
            service.alive()
            and service.name not in self.resume_at
            and service.name not in self.draining
        )

    def up_count(self) -> int:
        return sum(self.up(s) for s in self.stack.services.values())

    def freeze(self, service: Service, seconds: float) -> None:
        os.kill(service.pid, signal.SIGSTOP)
        self.resume_at[service.name] = time.monotonic() + seconds

    def drain(self, service: Service) -> None:
        os.kill(service.pid, signal.SIGTERM)
        self.draining.add(service.name)

    def resume_all(self) -> None:
        for name in list(self.resume_at):
            self._resume(name)

    def tick(self) -> None:
        now = time.monotonic()
        for name, at in list(self.resume_at.items()):
            if now >= at:
                self._resume(name)
        for service in self.stack.services.values():
            if service.process is None or service.alive():
                continue
            name = service.name
            self.draining.discard(name)
            self.resume_at.pop(name, None)
            if name not in self.restart_at:
                delay = self.rng.uniform(*RESTART_DELAY_S)
                self.restart_at[name] = now + delay
                code = service.process.returncode
                self.say(f"{name} exited ({code}); restarting in {delay:.1f}s")
            elif now >= self.restart_at[name]:
                del self.restart_at[name]
                service.restarts += 1
                self.restarts += 1
                self.stack.start(name)

    async def run(self, done: asyncio.Event) -> None:
        while not done.is_set():
            try:
                self.tick()
            except OSError as exc:  # a start that failed is tried again on the next tick
                self.say(f"supervisor: {exc!r}")
            await asyncio.sleep(0.1)

    def _resume(self, name: str) -> None:
        del self.resume_at[name]
        service = self.stack.services[name]
        if service.alive():
            os.kill(service.pid, signal.SIGCONT)
