"""What a chaos run prints: timestamped lines while it runs, and plain-text tables at the end."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from chaos_check import Check
from chaos_faults import ALL_KINDS, Fault


def _wall() -> str:
    """Wall-clock time as the services' logs show it, to line the run's log up with theirs."""
    now = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"


class Reporter:
    """Lines on stdout (and every line, with more detail, in the run's own log file)."""

    def __init__(self, log_path: Path) -> None:
        self.begin = time.monotonic()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("a", buffering=1)

    def close(self) -> None:
        self._log.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.begin

    def say(self, text: str) -> None:
        line = f"chaos: [{self.elapsed():6.1f}s] {text}"
        print(line, flush=True)
        self._log.write(f"{_wall()} {line}\n")

    def block(self, lines: list[str]) -> None:
        """A table or a history: printed as it is."""
        text = "\n".join(lines) + "\n"
        sys.stdout.write(text)
        sys.stdout.flush()
        self._log.write(text)

    def note(self, text: str) -> None:
        """Only in the log file: supervisor restarts and other detail."""
        self._log.write(f"{_wall()} chaos: [{self.elapsed():6.1f}s] {text}\n")


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def fault_table(faults: list[Fault]) -> list[str]:
    done = Counter(f.kind for f in faults if f.injected_at is not None)
    planned = Counter(f.kind for f in faults)
    rows = [[k, str(done[k]), str(planned[k])] for k in ALL_KINDS if planned[k]]
    rows.append(["total", str(sum(done.values())), str(len(faults))])
    return _table(rows, ["fault", "injected", "planned"])


def invariant_table(checks: list[Check]) -> list[str]:
    rows = [[c.name, "OK" if c.ok else "VIOLATED", c.detail] for c in checks]
    lines = _table(rows, ["invariant", "result", "detail"])
    for check in checks:
        if not check.ok:
            lines += ["", f"{check.name}: VIOLATED, e.g."]
            lines += [f"    {e}" for e in check.examples]
    return lines


def history_lines(instance_id: str, items: list[dict[str, Any]]) -> list[str]:
    lines = [f"history of {instance_id}:"]
    for h in items:
        step = f" {h['step']}" if h.get("step") else ""
        attempt = f" #{h['attempt']}" if h.get("attempt") is not None else ""
        lines.append(f"    {h['at']} {h['kind']}{step}{attempt}: {h['reason']}")
    return lines
