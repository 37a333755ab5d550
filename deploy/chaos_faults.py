"""Which faults a chaos run injects, when, and how.

The plan (kinds and times) follows from the seed alone. Targets are picked when a fault is due,
among the services that are up then, so they depend on timing too: a replay with the same seed
injects the same kinds at the same times, not always into the same processes.

Broker and database restarts act only on the private RabbitMQ and PostgreSQL the run started for
its own stack, on ports of their own (deploy/private_services.py): never on this machine's.

A `roll` (a rolling restart of every activity-worker, chaos_roll.py) runs in the background
for a while: the faults after it keep their times.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import TypeVar

from chaos_roll import Roller
from chaos_supervisor import Supervisor
from private_services import PrivatePostgres, PrivateRabbitMQ

from stack import Service

PROCESS_KINDS = ("kill", "stop", "term")
INFRA_KINDS = ("rabbitmq", "postgres")
RARE_KINDS = (*INFRA_KINDS, "roll")
"""Faults that take a while and touch the whole stack: a few per run, never back to back."""
ALL_KINDS = PROCESS_KINDS + RARE_KINDS
PROCESS_WEIGHTS = {"kill": 4, "stop": 3, "term": 3}
TARGETS = ("scheduler", "activity-worker")
STOP_S = (1.0, 8.0)
BROKER_DOWN_S = (1.0, 4.0)
NO_PEER_WAIT_S = 10.0
"""How long a fault waits for a target that leaves a peer of its kind up; then any will do
(the supervisor brings it back within a few seconds anyway)."""

T = TypeVar("T")


@dataclass
class Fault:
    index: int
    at: float
    """Seconds after the start of the run."""
    kind: str
    target: str = ""
    injected_at: float | None = None

    def describe(self) -> str:
        return f"{self.kind} {self.target}".strip()


def plan(rng: random.Random, faults: int, duration: float, kinds: list[str]) -> list[Fault]:
    """`faults` faults spread evenly (with jitter) over `duration`. Broker and database
    restarts and rolling restarts happen a few times at most, never back to back; the rest are
    signals."""
    process = [k for k in kinds if k in PROCESS_KINDS]
    rare = [k for k in kinds if k in RARE_KINDS]
    if process:
        each = 1 if faults < 100 else min(3, faults // 60)
        restarts = rare * each
        rng.shuffle(restarts)
        restarts = _rolls_early(restarts[: max(0, (faults - 2) // 3)])
        at_index = dict(zip(_spaced(rng, faults, len(restarts)), restarts, strict=True))
        weights = [PROCESS_WEIGHTS[k] for k in process]
        chosen = [at_index.get(i) or rng.choices(process, weights)[0] for i in range(faults)]
    else:
        chosen = [rare[i % len(rare)] for i in range(faults)]
    spacing = duration / max(faults, 1)
    return [Fault(i, spacing * (i + rng.uniform(0.2, 0.8)), kind) for i, kind in enumerate(chosen)]


def _rolls_early(restarts: list[str]) -> list[str]:
    """A roll lasts up to a minute (each worker's drain, then its replacement's start, in
    turn), and it should run while the load does: the first of the rare faults is a roll, and
    the last is not when another kind can be. So a short run's roll ends within its duration."""
    if "roll" not in restarts:
        return restarts
    restarts.remove("roll")
    restarts.insert(0, "roll")
    if restarts[-1] == "roll":
        other = next((i for i in range(len(restarts) - 1, -1, -1) if restarts[i] != "roll"), None)
        if other is not None:
            restarts[-1], restarts[other] = restarts[other], restarts[-1]
    return restarts


def _spaced(rng: random.Random, faults: int, n: int) -> list[int]:
    """`n` fault indices, one in the middle third of each of `n` equal segments (so never
    adjacent), leaving the first and last faults to signals."""
    if n == 0:
        return []
    segment = (faults - 2) / n
    return [1 + int(segment * (j + rng.uniform(1 / 3, 2 / 3))) for j in range(n)]


def unavailable_kinds() -> dict[str, str]:
    """Infrastructure faults this machine cannot inject (it cannot run a private instance to
    inject them into), and why."""
    why: dict[str, str] = {}
    broker = PrivateRabbitMQ.why_unavailable()
    if broker is not None:
        why["rabbitmq"] = f"needs a private RabbitMQ node: {broker}"
    database = PrivatePostgres.why_unavailable()
    if database is not None:
        why["postgres"] = f"needs a private PostgreSQL cluster: {database}"
    return why


def _required(part: T | None, missing: str) -> T:
    """`part` of the run, which a fault needs: a RuntimeError saying `missing` when it has none."""
    if part is None:
        raise RuntimeError(missing)
    return part


@dataclass
class Injector:
    supervisor: Supervisor
    rng: random.Random
    broker: PrivateRabbitMQ | None = None
    """The run's private broker: the only one `rabbitmq` faults restart."""
    database: PrivatePostgres | None = None
    """The run's private PostgreSQL: the only one `postgres` faults restart."""
    roller: Roller | None = None
    """Runs `roll` faults."""

    async def inject(self, fault: Fault) -> None:
        # The private instances' errors are RuntimeErrors: the fault is then not injected.
        if fault.kind == "roll":
            roll = _required(self.roller, "no roller for this run").start()
            fault.target = f"every activity-worker in turn (roll {roll.index})"
        elif fault.kind == "rabbitmq":
            broker = _required(self.broker, "no private broker was started for this run")
            fault.target = f"private broker (port {broker.port})"
            await asyncio.to_thread(broker.stop_app)
            try:
                await asyncio.sleep(self.rng.uniform(*BROKER_DOWN_S))
            finally:
                # Even when the run is interrupted here: never leave the broker down.
                await asyncio.to_thread(broker.start_app)
        elif fault.kind == "postgres":
            database = _required(self.database, "no private PostgreSQL was started for this run")
            fault.target = f"private postgresql {database.version} (port {database.port})"
            await asyncio.to_thread(database.restart)
        else:
            service = await self._target()
            fault.target = f"{service.name} (pid {service.pid})"
            if fault.kind == "kill":
                os.kill(service.pid, signal.SIGKILL)
            elif fault.kind == "stop":
                seconds = self.rng.uniform(*STOP_S)
                self.supervisor.freeze(service, seconds)
                fault.target += f" for {seconds:.1f}s"
            else:
                self.supervisor.drain(service)

    async def _target(self) -> Service:
        """A scheduler or worker that is up, preferably one whose kind keeps another up."""
        deadline = time.monotonic() + NO_PEER_WAIT_S
        while True:
            # The worker whose turn it is in a roll is left alone until its replacement is up:
            # the roll is a deploy, not a crash loop.
            rolling = self.roller.current if self.roller else None
            up = [
                s
                for s in self.supervisor.stack.services.values()
                if s.kind in TARGETS and self.supervisor.up(s) and s.name != rolling
            ]
            with_peer = [s for s in up if sum(p.kind == s.kind for p in up) > 1]
            pool = with_peer or (up if time.monotonic() > deadline else [])
            if pool:
                return self.rng.choice(sorted(pool, key=lambda s: s.name))
            await asyncio.sleep(0.2)
