"""Which faults a chaos run injects, when, and how.

The plan (kinds and times) follows from the seed alone. Targets are picked when a fault is due,
among the services that are up then, so they depend on timing too: a replay with the same seed
injects the same kinds at the same times, not always into the same processes.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from chaos_supervisor import Supervisor
from stack_env import AMQP_URL, DATABASE_URL, is_local

from stack import Service

PROCESS_KINDS = ("kill", "stop", "term")
INFRA_KINDS = ("rabbitmq", "postgres")
ALL_KINDS = PROCESS_KINDS + INFRA_KINDS
PROCESS_WEIGHTS = {"kill": 4, "stop": 3, "term": 3}
TARGETS = ("scheduler", "activity-worker")
STOP_S = (1.0, 8.0)
BROKER_DOWN_S = (1.0, 4.0)
NO_PEER_WAIT_S = 10.0
"""How long a fault waits for a target that leaves a peer of its kind up; then any will do
(the supervisor brings it back within a few seconds anyway)."""


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
    restarts happen a few times at most, never back to back; the rest are signals."""
    process = [k for k in kinds if k in PROCESS_KINDS]
    infra = [k for k in kinds if k in INFRA_KINDS]
    if process:
        each = 1 if faults < 100 else min(3, faults // 60)
        restarts = infra * each
        rng.shuffle(restarts)
        restarts = restarts[: max(0, (faults - 2) // 3)]
        at_index = dict(zip(_spaced(rng, faults, len(restarts)), restarts, strict=True))
        weights = [PROCESS_WEIGHTS[k] for k in process]
        chosen = [at_index.get(i) or rng.choices(process, weights)[0] for i in range(faults)]
    else:
        chosen = [infra[i % len(infra)] for i in range(faults)]
    spacing = duration / max(faults, 1)
    return [Fault(i, spacing * (i + rng.uniform(0.2, 0.8)), kind) for i, kind in enumerate(chosen)]


def _spaced(rng: random.Random, faults: int, n: int) -> list[int]:
    """`n` fault indices, one in the middle third of each of `n` equal segments (so never
    adjacent), leaving the first and last faults to signals."""
    if n == 0:
        return []
    segment = (faults - 2) / n
    return [1 + int(segment * (j + rng.uniform(1 / 3, 2 / 3))) for j in range(n)]


def unavailable_kinds() -> dict[str, str]:
    """Infrastructure faults this machine cannot inject, and why."""
    why: dict[str, str] = {}
    root = os.geteuid() == 0
    if not (shutil.which("rabbitmqctl") and is_local(AMQP_URL) and root):
        why["rabbitmq"] = "needs rabbitmqctl, a broker on this machine, and root"
    if not (shutil.which("pg_ctlcluster") and _pg_version() and is_local(DATABASE_URL) and root):
        why["postgres"] = "needs pg_ctlcluster, a cluster in /etc/postgresql, and root"
    return why


def _pg_version() -> str | None:
    versions = (
        sorted(Path("/etc/postgresql").glob("*/main")) if Path("/etc/postgresql").is_dir() else []
    )
    return versions[-1].parent.name if versions else None


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err.decode()[-500:]}")


@dataclass
class Injector:
    supervisor: Supervisor
    rng: random.Random

    async def inject(self, fault: Fault) -> None:
        if fault.kind == "rabbitmq":
            fault.target = "broker"
            await _run("rabbitmqctl", "-q", "stop_app")
            try:
                await asyncio.sleep(self.rng.uniform(*BROKER_DOWN_S))
            finally:
                # Even when the run is interrupted here: never leave the machine's broker down.
                await _run("rabbitmqctl", "-q", "start_app")
                await _run("rabbitmqctl", "-q", "await_startup")
        elif fault.kind == "postgres":
            version = _pg_version()
            assert version is not None
            fault.target = f"postgresql {version}"
            await _run("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart")
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
            up = [
                s
                for s in self.supervisor.stack.services.values()
                if s.kind in TARGETS and self.supervisor.up(s)
            ]
            with_peer = [s for s in up if sum(p.kind == s.kind for p in up) > 1]
            pool = with_peer or (up if time.monotonic() > deadline else [])
            if pool:
                return self.rng.choice(sorted(pool, key=lambda s: s.name))
            await asyncio.sleep(0.2)
