"""`make run`: migrate, start one scheduler, two workers, reporting and admin, and keep them up.

A service process that dies is started again (and logged), the way systemd or Kubernetes would.
Ctrl-C (or SIGTERM) stops everything with a friendly shutdown.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from pathlib import Path

from stack import ROOT, Stack

LAYOUT = [("scheduler", 1), ("activity-worker", 2), ("reporting", 1), ("admin", 1)]


def say(text: str) -> None:
    print(f"paceline: {text}", flush=True)


def main() -> int:
    token = os.environ.get("PACELINE_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    port = os.environ.get("PACELINE_ADMIN_PORT", "8080")
    log_dir = ROOT / ".paceline" / "logs"
    stack = Stack(env={"PACELINE_ADMIN_TOKEN": token}, log_dir=log_dir)
    say("applying migrations")
    stack.migrate()
    for kind, count in LAYOUT:
        for _ in range(count):
            stack.add(kind)
    say(f"started {', '.join(f'{n} (pid {s.pid})' for n, s in stack.services.items())}")
    say(f"logs in {log_dir}")
    say(f"admin API: http://127.0.0.1:{port}  (OpenAPI at /openapi.json)")
    say(f"API token: {token}")
    say("Ctrl-C stops the stack")

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    drained: set[str] = set()
    while not stopping:
        for service, code in stack.revive_dead(failed_only=True):
            say(f"{service.name} exited ({code}); restarting (restart {service.restarts})")
        for service in stack.services.values():
            if not service.alive() and service.name not in drained:
                drained.add(service.name)
                say(f"{service.name} was drained and exited 0; left stopped")
        time.sleep(0.5)
    say("stopping: letting in-flight work finish")
    stack.stop_all()
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
