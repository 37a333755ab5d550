"""`make bench` in miniature: the tool runs its scenarios against real stacks and prints the
contract's JSON lines, with nothing lost and no non-restartable effect doubled. Numbers are
not asserted here (shared machines are noisy): `make bench` is where they are read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str, timeout: float) -> list[dict[str, Any]]:
    """`deploy/bench.py` with `args`: the JSON objects it printed, one a line (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "bench.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_small_bench_prints_one_json_object_per_scenario() -> None:
    throughput, failover = bench(
        "--scenarios", "throughput,failover", "--processes", "60", "--kills", "3", timeout=600
    )

    assert throughput["scenario"] == "throughput"
    assert (throughput["processes"], throughput["steps"]) == (60, 5)
    assert throughput["activities_per_s"] > 0
    assert 0 < throughput["p50_ms"] <= throughput["p99_ms"]

    assert failover["scenario"] == "failover"
    assert failover["kills"] == 3
    assert 0 < failover["redelivery_p50_ms"] <= failover["redelivery_p99_ms"]
    assert failover["lost"] == 0
    assert failover["duplicated_non_restartable"] == 0


def test_small_scaling_prints_cpu_per_activity_for_every_size() -> None:
    [scaling] = bench(
        "--scenarios", "scaling", "--scaling-steps", "2,10", "--scaling-activities", "40",
        timeout=300,
    )  # fmt: skip

    assert scaling["scenario"] == "scaling"
    processes = {"scheduler", "activity-worker", "reporting", "admin", "postgres"}
    assert set(scaling["idle_cpu_ms_per_s"]) == processes
    assert [size["steps"] for size in scaling["sizes"]] == [2, 10]
    for size in scaling["sizes"]:
        # Every instance completed, every one of its steps ran: the same work at each size.
        assert size["completed"] == size["instances"] == 40 // size["steps"]
        assert size["activities"] == 40
        assert size["in_flight"] == 4  # as many as the largest size has instances
        assert size["activities_per_s"] > 0
        assert set(size["cpu_ms_per_activity"]) == processes
        # /proc counts in clock ticks (10 ms): 40 activities may leave one process at 0.
        assert all(ms >= 0 for ms in size["cpu_ms_per_activity"].values()), size
        assert size["cpu_ms_per_activity"]["scheduler"] > 0, size
    ratios = scaling["ratio_10_to_2"]
    assert set(ratios) == processes
    assert all(r is None or r >= 0 for r in ratios.values()), ratios


def test_small_waiting_holds_waits_and_fires_every_due_timer() -> None:
    [waiting] = bench(
        "--scenarios", "waiting", "--waiting-instances", "200", "--due-timers", "100",
        "--waiting-settle-s", "1", timeout=300,
    )  # fmt: skip

    assert waiting["scenario"] == "waiting"
    assert waiting["waiting_instances"] == 200
    # Phase 1's waits (2 h) are all still held after phase 2.
    assert waiting["still_waiting"] == 200
    assert waiting["start_rate_per_s"] > 0
    services = {"scheduler-1", "activity-worker-1", "activity-worker-2", "reporting-1", "admin-1"}
    for moment in ("before", "warm", "after", "settled", "due", "after_timers"):
        rss = waiting[f"rss_mib_{moment}"]
        assert set(rss) == services | {"postgres", "postgres_backends"}, rss
        assert all(rss[name] > 0 for name in services), rss
    assert set(waiting["rss_growth_mib_per_10k"]) == services | {"postgres"}
    assert isinstance(waiting["scheduler_rss_growth_mib"], float)

    # Every due-timer instance fired once, after its due time, and completed.
    assert waiting["due_timers"] == 100
    assert waiting["timers_started_after_due"] == 0
    assert waiting["completed"] == 100
    assert waiting["not_ended"] == 0
    assert waiting["lateness_values"] == 100
    assert 0 <= waiting["lateness_p50_ms"] <= waiting["lateness_p99_ms"]
    assert waiting["lateness_p99_ms"] <= waiting["lateness_max_ms"]
    firing = waiting["firing"]
    assert 0 <= firing["first_fired_after_s"] <= firing["last_fired_after_s"]
    assert firing["outbox_due_peak"] >= 0
    processes = {"scheduler", "activity-worker", "reporting", "admin", "postgres"}
    for phase in (waiting["starting"], firing):
        assert set(phase["busy"]) == processes, phase
        assert set(phase["waiting_for_cpu"]) == processes - {"postgres"}, phase
    assert set(waiting["starting"]["cpu_ms_per_start"]) == processes
    assert set(firing["cpu_ms_per_timer"]) == processes


def test_small_triggers_fire_every_schedule_and_start_one_instance_per_event() -> None:
    [triggers] = bench(
        "--scenarios", "triggers", "--trigger-schedules", "20", "--trigger-seconds", "5",
        "--trigger-events", "60", timeout=300,
    )  # fmt: skip

    assert triggers["scenario"] == "triggers"
    assert triggers["fires_expected"] == 100
    assert triggers["fires"] == triggers["fires_started"] == 100
    assert 0 <= triggers["fire_lateness_p50_ms"] <= triggers["fire_lateness_p99_ms"]
    assert triggers["fires_started_per_s"] > 0
    assert triggers["instances_per_s"] > 0
    assert triggers["events"] == triggers["event_instances"] == 60
    assert triggers["events_accepted_per_s"] > 0
    assert 0 < triggers["event_answer_p50_ms"] <= triggers["event_answer_p99_ms"]
