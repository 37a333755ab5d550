"""`make bench` in miniature: the tool runs both scenarios against real stacks and prints the
contract's JSON lines, with nothing lost and no non-restartable effect doubled. Numbers are
not asserted here (shared machines are noisy): `make bench` is where they are read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_small_bench_prints_one_json_object_per_scenario() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "bench.py"), "--processes", "60", "--kills", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    throughput, failover = (json.loads(line) for line in lines)

    assert throughput["scenario"] == "throughput"
    assert (throughput["processes"], throughput["steps"]) == (60, 5)
    assert throughput["activities_per_s"] > 0
    assert 0 < throughput["p50_ms"] <= throughput["p99_ms"]

    assert failover["scenario"] == "failover"
    assert failover["kills"] == 3
    assert 0 < failover["redelivery_p50_ms"] <= failover["redelivery_p99_ms"]
    assert failover["lost"] == 0
    assert failover["duplicated_non_restartable"] == 0
