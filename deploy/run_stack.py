"""`make run`: check the settings, migrate, start the layout and keep it running.

The layout is a setting: `PACELINE_SCHEDULERS` (default 1, at least 1) schedulers,
`PACELINE_WORKERS` (default 2; 0 is allowed, with a warning: nothing runs until a worker joins,
e.g. from another machine) activity-workers, one reporting service and one admin API.

Before anything starts (no migration, no service), every service checks its settings
(`paceline-<service> check`), and so do the layout and the admin port (free to bind); every
problem found is printed and the run ends with exit code 2.

Then it keeps the layout running, as a Deployment or systemd's `Restart=always` would: a service
process that exits for any reason (a crash, a SIGTERM, a drain through the API) is replaced by a
fresh one (a new server id; the old one stays DRAINED or LOST in `GET /v1/servers` until deleted).
Each service restarts after a backoff that doubles from 0.5 s up to 30 s while its processes keep
exiting within 30 s of their start. The console says why a process exited: its exit code or
signal and the last lines of its log.

Ctrl-C (a terminal sends SIGINT to its whole foreground process group; every service runs in a
session of its own, so only this supervisor gets it) or SIGTERM stops the stack with a friendly
shutdown: exactly one SIGTERM to each service, first to the admin API and the workers (which
finish what they run, up to `PACELINE_WORKER_GRACE_S`), then to the schedulers (which have by
then applied the workers' last results), then to reporting; nothing is restarted any more. A
second Ctrl-C kills whatever still runs. Should this supervisor itself be killed, every service
gets a SIGTERM from the kernel (stack.py) and drains.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from paceline_infra.lifecycle import settings_problems
from stack import BIN, COMMANDS, ROOT, Service, Stack

MAX_PER_KIND = 32
"""More processes of one kind than this on one machine is a typo rather than a plan."""
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 30.0
"""A process that stayed up this long was no crash loop: its service's backoff starts over."""
TAIL_LINES = 10
STOP_MARGIN_S = 15.0
"""How long a service may take to stop beyond its own grace (the workers': their grace)."""
SETTLE_S = 1.0
"""After the workers stopped, before the schedulers are asked to: time to apply the results the
workers published last, so what the database shows after a stop is what they did."""
POLL_S = 0.2
CHECK_TIMEOUT_S = 120.0
STOP_ORDER = (("admin", "activity-worker"), ("scheduler",), ("reporting",))


def say(text: str, *details: str) -> None:
    """A line on the console (and `details` under it, indented). A console that went away
    (a closed terminal, a reader that stopped) must not end the supervision."""
    try:
        print(f"paceline: {text}", flush=True)
        for line in details:
            print(f"    {line}", flush=True)
    except OSError:
        pass


class Layout(BaseSettings):
    """How many processes of each kind `make run` keeps running."""

    model_config = SettingsConfigDict(env_prefix="PACELINE_", extra="ignore")

    schedulers: int = Field(default=1, ge=1, le=MAX_PER_KIND)
    workers: int = Field(default=2, ge=0, le=MAX_PER_KIND)

    def counts(self) -> list[tuple[str, int]]:
        # Admin and reporting stay at one: a second admin would need a port of its own.
        return [
            ("scheduler", self.schedulers),
            ("activity-worker", self.workers),
            ("reporting", 1),
            ("admin", 1),
        ]


# --- settings check, before anything starts ---------------------------------------------------


@dataclass
class CheckResult:
    layout: Layout | None
    problems: dict[str, list[str]] = field(default_factory=dict)
    """problem -> who found it"""
    notes: list[str] = field(default_factory=list)

    def add(self, problem: str, who: str) -> None:
        self.problems.setdefault(problem, []).append(who)


def check_settings(environ: dict[str, str]) -> CheckResult:
    """Every service's `check` (run at once, side by side), the layout, and the admin port."""
    checks = {
        kind: subprocess.Popen(
            [str(BIN / command), "check"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
        for kind, command in COMMANDS.items()
    }
    layout_problems = settings_problems(Layout)
    result = CheckResult(None if layout_problems else Layout())
    for problem in layout_problems:
        result.add(problem, "make run's layout")
    if result.layout is not None and result.layout.workers == 0:
        result.notes.append(
            "PACELINE_WORKERS=0: no activity runs until a worker joins (e.g. from another machine)"
        )
    if port_problem := _admin_port_problem(environ.get("PACELINE_ADMIN_PORT", "8080")):
        result.add(port_problem, "make run")
    for kind, check in checks.items():
        command = COMMANDS[kind]
        try:
            out, _ = check.communicate(timeout=CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            check.kill()
            out, _ = check.communicate()
        lines = out.decode(errors="replace").splitlines()
        if check.returncode == 0:
            continue
        found = [ln.removeprefix(f"{command}: ") for ln in lines if ln.startswith(f"{command}: ")]
        if check.returncode == 2 and found:
            for problem in found:
                result.add(problem, kind)
        else:
            tail = " | ".join(lines[-5:]) or "no output"
            result.add(f"`{command} check` failed ({_how(check.returncode)}): {tail}", kind)
    return result


def _admin_port_problem(given: str) -> str | None:
    """Whether the admin API could listen where it will: all interfaces (so 127.0.0.1 too),
    with SO_REUSEADDR as it does. A port that is no port is the admin check's to report."""
    try:
        port = int(given)
    except ValueError:
        return None
    if not 1 <= port <= 65535:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            return (
                f"PACELINE_ADMIN_PORT: port {port} cannot be bound ({exc.strerror}); is another "
                "`make run` up? Stop it or choose another port"
            )
    return None


def print_problems(result: CheckResult) -> None:
    count = len(result.problems)
    say(
        f"{count} problem{'s' if count > 1 else ''} with the settings; nothing was started:",
        *(f"{problem}  ({', '.join(who)})" for problem, who in result.problems.items()),
    )


# --- supervision ---------------------------------------------------------------------------------


@dataclass
class Backoff:
    """A service's restart delay: doubles from `initial` to `maximum` while its processes keep
    exiting within `stable_after` seconds of their start; starts over after one that did not."""

    initial: float = INITIAL_BACKOFF_S
    maximum: float = MAX_BACKOFF_S
    stable_after: float = STABLE_AFTER_S
    _next: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._next = self.initial

    def after_exit(self, uptime: float) -> float:
        """The delay before starting again a process that ran `uptime` seconds."""
        if uptime >= self.stable_after:
            self._next = self.initial
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay


def _how(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == 0:
        return "code 0, a friendly shutdown"
    return f"code {code}"


SAME_SIGNAL_S = 1.0
"""Signals this close together are one request: a terminal's Ctrl-C reaches the whole process
group, and a wrapper in it (`uv run`, under `make run`) forwards it once more."""


class Signals:
    """SIGINT, SIGTERM and SIGHUP, counted; the handler only records, the loops act."""

    def __init__(self) -> None:
        self.received: list[signal.Signals] = []
        self._last_at = -SAME_SIGNAL_S

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        # A closed terminal: the same friendly shutdown (unless started under nohup).
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        duplicate = now - self._last_at < SAME_SIGNAL_S
        self._last_at = now
        if not duplicate:
            self.received.append(signal.Signals(signum))


@dataclass
class Supervisor:
    stack: Stack
    signals: Signals
    grace_s: float
    """The workers' PACELINE_WORKER_GRACE_S: how long a drain may take."""
    out: Callable[..., None] = say
    backoff: dict[str, Backoff] = field(default_factory=dict)
    restart_at: dict[str, float] = field(default_factory=dict)
    reported: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    """service -> the process whose end was last reported"""

    def run(self) -> None:
        """Keep every service running until the first SIGINT or SIGTERM."""
        while not self.signals.received:
            self.tick(time.monotonic())
            time.sleep(POLL_S)

    def tick(self, now: float) -> None:
        for service in self._ended():
            uptime = now - service.started_at
            self._report_exit(service, uptime)
            delay = self.backoff.setdefault(service.name, Backoff()).after_exit(uptime)
            self.restart_at[service.name] = now + delay
            self.out(
                f"{service.name}: starting a fresh process in {delay:g} s "
                f"(restart {service.restarts + 1})"
            )
        for name, at in list(self.restart_at.items()):
            if now < at:
                continue
            del self.restart_at[name]
            service = self.stack.services[name]
            service.restarts += 1
            try:
                self.stack.start(name)
            except OSError as exc:
                delay = self.backoff.setdefault(name, Backoff()).after_exit(0)
                self.restart_at[name] = now + delay
                self.out(f"{name} could not be started ({exc}); trying again in {delay:g} s")
                continue
            self.out(f"{name} started again (pid {service.pid})")

    def shutdown(self) -> int:
        """One SIGTERM to each service, in STOP_ORDER, each group waited for; a second signal
        kills what still runs. Returns 0 when every service stopped on its own."""
        self.restart_at.clear()  # nothing starts any more
        first = self.signals.received[0]
        self.out(
            f"{first.name}: stopping every service with a friendly shutdown (workers finish what "
            f"they run, up to {self.grace_s:g} s); Ctrl-C again kills them"
        )
        for service in self._ended():  # ended before the signal: said, not restarted
            self._report_exit(service, time.monotonic() - service.started_at)
        clean = True
        for kinds in STOP_ORDER:
            group = [s for s in self.stack.services.values() if s.kind in kinds and s.alive()]
            for service in group:
                # Resume a frozen one first, or it would never see its SIGTERM.
                self.stack.signal(service.name, signal.SIGCONT)
                self.stack.signal(service.name, signal.SIGTERM)
            wait_s = self.grace_s + STOP_MARGIN_S if "activity-worker" in kinds else STOP_MARGIN_S
            clean = self._wait_stopped(group, time.monotonic() + wait_s) and clean
            if clean and any(s.kind == "activity-worker" for s in group):
                time.sleep(SETTLE_S)
        for service in self._ended():
            self._report_exit(service, time.monotonic() - service.started_at, stopping=True)
        self.out("stopped" if clean else "stopped (some services had to be killed)")
        return 0 if clean else 1

    def _wait_stopped(self, group: list[Service], deadline: float) -> bool:
        clean = True
        while any(s.alive() for s in group):
            if len(self.signals.received) > 1:
                if clean:
                    self.out(f"second {self.signals.received[1].name}: killing every service now")
                self._kill([s for s in self.stack.services.values() if s.alive()])
                clean = False
            elif time.monotonic() > deadline:
                late = [s for s in group if s.alive()]
                names = ", ".join(s.name for s in late)
                self.out(f"{names} still running at the deadline: killing")
                self._kill(late)
                clean = False
            for service in self._ended():
                self._report_exit(service, time.monotonic() - service.started_at, stopping=True)
            time.sleep(0.1)
        for service in self._ended():
            self._report_exit(service, time.monotonic() - service.started_at, stopping=True)
        return clean and not self.signals.received[1:]

    def _kill(self, services: list[Service]) -> None:
        for service in services:
            with suppress(ProcessLookupError):
                # Its process group: the service and anything it started in it.
                os.killpg(service.pid, signal.SIGKILL)

    def _ended(self) -> list[Service]:
        """Services whose current process has ended and was not reported yet."""
        ended = []
        for service in self.stack.services.values():
            process = service.process
            if process is None or self.reported.get(service.name) is process:
                continue
            if process.poll() is not None:
                self.reported[service.name] = process
                ended.append(service)
        return ended

    def _report_exit(self, service: Service, uptime: float, *, stopping: bool = False) -> None:
        assert service.process is not None
        code = service.process.returncode
        if stopping and code == 0:
            self.out(f"{service.name} stopped")
            return
        self.out(
            f"{service.name} (pid {service.pid}) exited ({_how(code)}) after {uptime:.1f} s; "
            "the end of its log:",
            *[line[:400] for line in service.log_tail(TAIL_LINES) or ["(nothing)"]],
        )


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=ROOT / ".paceline" / "logs",
        help="where each service's log goes (default: .paceline/logs)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    given = os.environ.get("PACELINE_ADMIN_TOKEN")
    token = given or secrets.token_urlsafe(24)
    checked = check_settings({**os.environ, "PACELINE_ADMIN_TOKEN": token})
    if checked.problems or checked.layout is None:
        print_problems(checked)
        return 2
    for note in checked.notes:
        say(note)
    layout = checked.layout
    # Valid: the worker's own check has just accepted it.
    grace_s = float(os.environ.get("PACELINE_WORKER_GRACE_S", "30"))
    port = os.environ.get("PACELINE_ADMIN_PORT", "8080")
    signals = Signals()
    signals.install()
    stack = Stack(env={"PACELINE_ADMIN_TOKEN": token}, log_dir=args.log_dir)
    say("applying migrations")
    try:
        stack.migrate()
    except subprocess.CalledProcessError as exc:
        if signals.received:
            say(f"{signals.received[0].name}: nothing was started")
            return 130
        say(f"applying the migrations failed ({_how(exc.returncode)}; see above); nothing started")
        return 1
    if signals.received:
        say(f"{signals.received[0].name}: nothing was started")
        return 0
    supervisor = Supervisor(stack, signals, grace_s)
    try:
        for kind, count in layout.counts():
            for _ in range(count):
                stack.add(kind)
        say(f"started {', '.join(f'{n} (pid {s.pid})' for n, s in stack.services.items())}")
        say(f"logs in {args.log_dir}")
        say(f"admin API: http://127.0.0.1:{port}  (OpenAPI at /openapi.json)")
        # A token of the user's own is a secret they have: it is never echoed.
        say("API token: yours, PACELINE_ADMIN_TOKEN" if given else f"API token: {token}")
        say(
            "a service process that exits is replaced by a fresh one; "
            "Ctrl-C stops the stack (twice: kills it)"
        )
        supervisor.run()
    except BaseException:
        stack.stop_all(timeout=grace_s + STOP_MARGIN_S)
        raise
    return supervisor.shutdown()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # before any service started (then, the handlers take it)
        say("interrupted; nothing was started")
        sys.exit(130)
