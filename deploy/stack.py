"""Paceline services as real processes: start, signal, restart, stop.

Used by `make run` (through run_stack.py, which supervises them) and by the integration tests
(which SIGKILL and SIGSTOP them). A development tool, not part of any service.

Each service process runs in a session (and so a process group) of its own: a terminal's Ctrl-C
reaches only the process that started it, which then asks each service to stop exactly once. On
Linux a service also gets SIGTERM (a friendly shutdown) when the process that started it dies,
even by SIGKILL, so none lingers as an orphan.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from paceline_infra.children import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

COMMANDS = {
    "scheduler": "paceline-scheduler",
    "activity-worker": "paceline-activity-worker",
    "reporting": "paceline-reporting",
    "admin": "paceline-admin",
}

_SERVER_PID = re.compile(r"-(\d+)-[0-9a-f]{6}$")


@dataclass
class Service:
    name: str
    """Unique within the stack, e.g. `activity-worker-2`."""
    kind: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    """time.monotonic() when the current process was started"""
    log_start: int = 0
    """Where the current process's output begins in `log_path` (the file is appended to)."""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 10) -> list[str]:
        """The last `lines` lines the current (or last) process wrote to its log."""
        try:
            with self.log_path.open("rb") as f:
                end = f.seek(0, os.SEEK_END)
                start = f.seek(max(self.log_start, end - 1000 * lines))  # plenty of lines
                found = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        if start > self.log_start:
            found = found[1:]  # begun mid-line
        return found[-lines:]


@dataclass
class Stack:
    env: dict[str, str]
    """PACELINE_* settings every service gets, on top of this process's environment."""
    log_dir: Path
    services: dict[str, Service] = field(default_factory=dict)

    def migrate(self) -> None:
        for kind in ("scheduler", "reporting"):
            subprocess.run(
                [str(BIN / COMMANDS[kind]), "migrate"],
                env=self._environ({}),
                check=True,
                stdout=subprocess.DEVNULL,
            )

    def add(self, kind: str, name: str | None = None, **env: str) -> Service:
        name = name or self._next_name(kind)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        service = Service(name, kind, env, self.log_dir / f"{name}.log")
        self.services[name] = service
        self.start(name)
        return service

    def start(self, name: str) -> Service:
        """Start the service's process, in a session of its own; on Linux, when called from
        the main thread, it also gets SIGTERM if this process dies (the kernel ties that to the
        thread that started it, so not from other threads, which may end before us)."""
        service = self.services[name]
        log = service.log_path.open("ab")
        service.log_start = log.tell()
        main_thread = threading.current_thread() is threading.main_thread()
        service.process = subprocess.Popen(
            [str(BIN / COMMANDS[service.kind]), "run"],
            env=self._environ(service.env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM) if main_thread else None,
        )
        service.started_at = time.monotonic()
        log.close()
        return service

    def signal(self, name: str, signum: signal.Signals) -> None:
        service = self.services[name]
        if service.alive():
            os.kill(service.pid, signum)

    def kill(self, name: str) -> None:
        """A crash: SIGKILL, and wait until the process is gone."""
        self.signal(name, signal.SIGKILL)
        process = self.services[name].process
        if process is not None:
            process.wait()

    def stop(self, name: str, timeout: float = 60.0) -> int | None:
        """A friendly shutdown: SIGTERM, then wait; returns the exit code."""
        service = self.services[name]
        if not service.alive():
            return service.process.returncode if service.process else None
        assert service.process is not None
        service.process.send_signal(signal.SIGTERM)
        try:
            return service.process.wait(timeout)
        except subprocess.TimeoutExpired:
            service.process.kill()
            return service.process.wait()

    def stop_all(self, timeout: float = 60.0) -> None:
        for service in self.services.values():
            if service.alive():
                # Resume a frozen one first, or SIGTERM waits forever.
                self.signal(service.name, signal.SIGCONT)
                self.signal(service.name, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service in self.services.values():
            if service.process is None:
                continue
            try:
                service.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()

    def revive_dead(self, *, failed_only: bool = False) -> list[tuple[Service, int | None]]:
        """Start again every service whose process has ended (with `failed_only`, only those
        that did not exit 0, as systemd's Restart=on-failure: a drained server stays down);
        returns each with the exit code of the process that ended."""
        revived = []
        for service in self.services.values():
            if service.process is None or service.alive():
                continue
            if failed_only and service.process.returncode == 0:
                continue
            service.restarts += 1
            revived.append((service, service.process.returncode))
            self.start(service.name)
        return revived

    def serving(self, server_id: str) -> Service | None:
        """The service whose (latest) process is the server `server_id`: a server id ends with
        `-<pid>-<6 hex digits>`."""
        match = _SERVER_PID.search(server_id)
        if match is None:
            return None
        pid = int(match.group(1))
        for service in self.services.values():
            if service.process is not None and service.process.pid == pid:
                return service
        return None

    def of_kind(self, kind: str) -> list[Service]:
        return [s for s in self.services.values() if s.kind == kind]

    def _next_name(self, kind: str) -> str:
        n = len(self.of_kind(kind)) + 1
        return f"{kind}-{n}"

    def _environ(self, extra: dict[str, str]) -> dict[str, str]:
        return {**os.environ, **self.env, **extra}
