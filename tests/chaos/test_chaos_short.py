"""The short chaos run of `make test`: 20 random faults in a minute against a real stack, and
every invariant of deploy/chaos.py must hold (that tool's own logic lives in deploy/). The run
has one of each of the newer behaviours: a rolling restart of the workers, cancels of running
instances, poison instances, and POSTs whose first request times out."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAULTS = 20
# Broker and database restarts take a few seconds each, so they fit in the minute; the tool
# leaves them out by itself (and says so) where it cannot restart them. A roll (every worker
# drained in turn) is planned in every run of 20 faults.
KINDS = "kill,stop,term,rabbitmq,postgres,roll"
TIMEOUT_S = 600  # set-up, 60 s of faults, up to 120 s to settle, checks and teardown
INVARIANTS = 13


def test_short_chaos_run_keeps_every_invariant() -> None:
    run = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "deploy" / "chaos.py"),
            *("--faults", str(FAULTS), "--duration", "60", "--seed", "1", "--kinds", KINDS),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = run.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the tool then stops its services and drops its names.
        run.terminate()
        out, _ = run.communicate(timeout=120)
    tail = "\n".join(out.splitlines()[-80:])
    assert run.returncode == 0, f"chaos run exited {run.returncode}:\n{tail}"
    assert re.search(rf"^total\s+{FAULTS}\s+{FAULTS}$", out, re.MULTILINE), tail
    assert re.search(r"^roll\s+1\s+1$", out, re.MULTILINE), tail
    rows = _invariant_rows(out)
    assert len(rows) >= INVARIANTS, tail
    assert all(re.search(r"\s{2}OK(\s{2}|$)", row) for row in rows), tail
    assert re.search(r"^chaos: (\d+) of \1 invariants held: OK$", out, re.MULTILINE), tail
    # The load's own faults happened: a few cancels, a poison, a few time-outs.
    load = re.search(
        r"^chaos: load: \d+ instances; cancels (\d+) .*; poison instances (\d+); instances "
        r"whose first POST times out (\d+); outcome_unknown flags (\d+)$",
        out,
        re.MULTILINE,
    )
    assert load, tail
    cancels, poison, timing_out, unknown = (int(n) for n in load.groups())
    assert cancels >= 3 and poison >= 1 and timing_out >= 3 and unknown >= 1, tail


def _invariant_rows(out: str) -> list[str]:
    """The rows of the invariants table: after its header and rule, up to the blank line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("invariant "))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(line)
    return rows
