"""The operator at the end of a chaos run: retries every flagged activity through the admin API
until every instance has ended, and remembers each retry, since a retry is the one thing that
may legitimately repeat a non-restartable side effect."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos_api import Api

OPEN = "PENDING,RUNNING,WAITING,FLAGGED"
STALL_S = 45.0


@dataclass
class Operator:
    api: Api
    retried: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(instance id, step) -> retries the operator asked for and the API accepted"""
    flag_kinds: Counter[str] = field(default_factory=Counter)
    """why the retried activities were flagged: `redelivered`, `timeout`, `crash_budget`"""
    _resolved: set[tuple[str, str, int]] = field(default_factory=set)
    """(instance id, step, attempt) already decided: a flag that still shows because the
    scheduler has not applied the decision yet is not retried (and counted) a second time."""

    async def resolve_flags(self) -> int:
        """Retry every flag not decided yet; returns how many flags are listed."""
        flags = await self.api.items("/v1/flags")
        for flag in flags:
            instance_id, step = str(flag["instance_id"]), str(flag["step"])
            decided = (instance_id, step, int(flag["attempt"]))
            if decided in self._resolved:
                continue
            response = await self.api.call(
                "POST",
                f"/v1/instances/{instance_id}/activities/{step}/resolve",
                json={"action": "retry"},
            )
            # 409: no longer flagged (a late result of the attempt resolved it): no retry.
            if response.status_code == 202:
                self._resolved.add(decided)
                self.retried[(instance_id, step)] += 1
                self.flag_kinds[(flag.get("flag") or {}).get("kind", "unknown")] += 1
        return len(flags)

    async def settle(self, within_s: float, report: Callable[[int, int], None]) -> bool:
        """Resolve flags until no instance is open; False if `within_s` pass first, or if the
        same instances stay open, unflagged, for STALL_S (they are stuck: waiting longer only
        delays the report). `report(open, flagged)` is called every few seconds."""
        deadline = time.monotonic() + within_s
        last_report = 0.0
        last_change, last_open = time.monotonic(), set[str]()
        while True:
            flagged = await self.resolve_flags()
            still_open = {
                str(i["id"]) for i in await self.api.items("/v1/instances", {"status": OPEN})
            }
            if not still_open and not flagged:
                return True
            if flagged or still_open != last_open:
                last_change, last_open = time.monotonic(), still_open
            now = time.monotonic()
            if now > deadline or now - last_change > STALL_S:
                return False
            if now - last_report >= 5:
                last_report = now
                report(len(still_open), flagged)
            await asyncio.sleep(1)
