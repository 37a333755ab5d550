"""The isolated runner: one activity, alone in a process of its own (see isolation.py).

Reads an `ActivityTask` (JSON) on stdin, runs its adapter, and writes one JSON object on
stdout: `{"status": "COMPLETED", "output": ...}` or `{"status": "FAILED", "error": {"kind",
"message", "outcome_unknown"}}`. SIGTERM cancels the adapter (which stops what it started) and
the runner exits without an outcome: its worker asked for that, and knows it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from typing import Any

import httpx

from paceline_contracts.messages import ACTIVITY_TASK
from paceline_worker.adapters import ActivityFailure, run_activity

log = logging.getLogger("paceline_worker.isolated")


async def _run(raw: bytes) -> dict[str, Any]:
    task = ACTIVITY_TASK.validate_json(raw)
    async with httpx.AsyncClient() as http:
        try:
            output = await run_activity(task.activity_type, task.params, http=http)
        except ActivityFailure as failure:
            return {"status": "FAILED", "error": failure.to_error().model_dump()}
        except Exception as exc:  # a bug in an adapter: a failure, as in the worker
            log.exception("adapter %s raised", task.activity_type)
            error = {"kind": "adapter", "message": f"{type(exc).__name__}: {exc}"}
            return {"status": "FAILED", "error": error}
    return {"status": "COMPLETED", "output": output}


async def _main() -> int:
    raw = sys.stdin.buffer.read()
    work = asyncio.ensure_future(_run(raw))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, work.cancel)
    try:
        outcome = await work
    except asyncio.CancelledError:
        return 143  # stopped by its worker: no outcome to report
    sys.stdout.write(json.dumps(outcome) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(asyncio.run(_main()))
