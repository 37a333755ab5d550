"""Nothing a shell command started outlives its worker (paceline_worker/orphans.py): the program
dies with the worker, and what it started is killed by a worker's sweep on the same host, so a
flagged attempt cannot do its effect after the operator was told it may have started."""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

import pytest

from failover.conftest import (
    StackFactory,
    define_and_start,
    history,
    reviving,
    service_of,
    sleep_until,
    wait_running,
    wait_status,
)
from integration.harness import wait_for

pytestmark = pytest.mark.integration

LATE_S = 8
"""When the command's grandchild would do its effect."""


def _gone(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return raw[raw.rindex(b")") + 2 :].split()[0] in (b"Z", b"X")  # a zombie runs no more


@pytest.mark.parametrize("survivor", ["another worker", "its replacement"])
async def test_what_a_dead_workers_command_started_dies_too(
    make_stack: StackFactory, tmp_path: Path, survivor: str
) -> None:
    if survivor == "another worker":
        stack, api = await make_stack()  # two workers: the other one sweeps every few seconds
    else:
        stack, api = await make_stack(workers=[{}])  # `make run` replaces it: that one sweeps
    pids_file, late = tmp_path / "pids", tmp_path / "late"
    # A grandchild that does the effect after LATE_S, and a child that the shell waits for.
    script = (
        f"(sleep {LATE_S}; echo pushed > {late}) & echo $! > {pids_file}.tmp; "
        f"sleep 1000 & echo $! >> {pids_file}.tmp; mv {pids_file}.tmp {pids_file}; wait"
    )
    definition = {
        "name": f"orphans-{uuid.uuid4().hex[:8]}",
        "steps": [{"id": "push", "type": "shell.command", "with": {"argv": ["sh", "-c", script]}}],
    }
    instance_id = await define_and_start(api, definition)
    held = await wait_running(api, instance_id, "push")

    def started() -> list[int]:
        return [int(p) for p in pids_file.read_text().split()] if pids_file.exists() else []

    pids = await wait_for(started, 30, "the command to start its children")
    began = time.time()
    dead = held["claimed_by"]
    assert not any(_gone(pid) for pid in pids)

    async with reviving(stack) if survivor == "its replacement" else contextlib.nullcontext():
        stack.kill(service_of(stack, dead).name)
        await wait_for(lambda: all(_gone(pid) for pid in pids), 30, "the orphans to be killed")
        flagged = await wait_status(api, instance_id, "FLAGGED")

    # Flagged as before: it may have started; an operator decides.
    push = next(a for a in flagged["activities"] if a["step"] == "push")
    assert push["status"] == "INTERRUPTED"
    assert push["restartable"] is False
    assert push["flag"]["kind"] == "redelivered"
    assert dead in push["flag"]["reason"]
    assert [h["kind"] for h in await history(api, instance_id)].count("flagged") == 1
    # And the rest of attempt 1 does nothing any more.
    await sleep_until(began + LATE_S + 2)
    assert not late.exists(), "the dead worker's command did its effect after it was flagged"
    # The worker that killed them says so (unless a worker of another stack on this machine
    # was first): the pids and the owner, never the arguments.
    logs = "".join(s.log_path.read_text(errors="replace") for s in stack.of_kind("activity-worker"))
    killed = [line for line in logs.splitlines() if "killed the orphans" in line]
    for line in killed:
        assert str(late) not in line and "sleep" not in line, line
