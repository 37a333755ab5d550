"""The operator at the end of a chaos run: resolves every flagged activity through the admin API
until every instance has ended, and remembers each decision, since a retry is the one thing that
may legitimately repeat a non-restartable side effect.

Its rules, as a person's would be:
- a poison step quarantined (`crash_budget`) is failed: nobody retries a poison;
- every other flag is retried;
- a retry refused with 409 `holder-alive` (the server that held the attempt still runs it: a
  broker blip) is left for later: the late result resolves the flag by itself, or the holder
  stops running it and a retry is accepted then;
- a 409 `already-resolved` is no error: the decision was recorded (an earlier try of the same
  request, whose answer was lost), and counts as made.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos_api import Api
from chaos_load import POISON, POISON_STEP

OPEN = "PENDING,RUNNING,WAITING,FLAGGED,CANCELLING"
STALL_S = 45.0
_CHOSE = re.compile(r" chose (retry|skip|fail)\b")


def _problem_kind(response: Any) -> str:
    try:
        kind = response.json().get("type") or ""
    except ValueError:
        return ""
    return str(kind).rsplit(":", 1)[-1]


def _detail(response: Any) -> str:
    try:
        return str(response.json().get("detail") or "")
    except ValueError:
        return ""


@dataclass
class Operator:
    api: Api
    retried: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(instance id, step) -> retries the operator asked for and the API accepted"""
    failed: set[tuple[str, str]] = field(default_factory=set)
    """(instance id, step) the operator failed"""
    flag_kinds: Counter[str] = field(default_factory=Counter)
    """why the retried activities were flagged: `redelivered`, `timeout`, `outcome_unknown`..."""
    failed_kinds: Counter[str] = field(default_factory=Counter)
    """why the failed activities were flagged (`crash_budget`)"""
    holder_alive: set[tuple[str, str, int]] = field(default_factory=set)
    """flagged attempts whose retry was refused (409 `holder-alive`) at least once"""
    already_resolved: int = 0
    """409 `already-resolved` answers to a decision the operator had not seen accepted"""
    refused: Counter[str] = field(default_factory=Counter)
    """other 409 answers, by problem kind (`not-flagged`, `instance-cancelling`...)"""
    _resolved: set[tuple[str, str, int]] = field(default_factory=set)
    """(instance id, step, attempt) already decided: a flag that still shows because the
    scheduler has not applied the decision yet is not decided (and counted) a second time."""

    @staticmethod
    def decide(flag: dict[str, Any]) -> str:
        kind = (flag.get("flag") or {}).get("kind", "unknown")
        poison = flag.get("definition") == POISON and flag.get("step") == POISON_STEP
        return "fail" if poison and kind == "crash_budget" else "retry"

    async def resolve_flags(self) -> int:
        """Decide every flag not decided yet; returns how many flags are listed."""
        flags = await self.api.items("/v1/flags")
        for flag in flags:
            instance_id, step = str(flag["instance_id"]), str(flag["step"])
            decided = (instance_id, step, int(flag["attempt"]))
            if decided in self._resolved:
                continue
            action = self.decide(flag)
            response = await self.api.call(
                "POST",
                f"/v1/instances/{instance_id}/activities/{step}/resolve",
                json={"action": action},
            )
            if response.status_code == 202:
                self._count(decided, action, flag)
                continue
            problem = _problem_kind(response)
            if response.status_code == 409 and problem == "already-resolved":
                # Recorded by an earlier try of this request (its answer was lost): ours.
                self.already_resolved += 1
                chose = _CHOSE.search(_detail(response))
                self._count(decided, chose.group(1) if chose else action, flag)
            elif response.status_code == 409 and problem == "holder-alive":
                self.holder_alive.add(decided)  # left for later
            else:
                # 409: no longer flagged (a late result resolved it, or a cancel): nothing to do.
                self.refused[f"{response.status_code} {problem}".strip()] += 1
        return len(flags)

    def _count(self, decided: tuple[str, str, int], action: str, flag: dict[str, Any]) -> None:
        self._resolved.add(decided)
        kind = (flag.get("flag") or {}).get("kind", "unknown")
        instance_id, step, _ = decided
        if action == "retry":
            self.retried[(instance_id, step)] += 1
            self.flag_kinds[kind] += 1
        elif action == "fail":
            self.failed.add((instance_id, step))
            self.failed_kinds[kind] += 1

    def describe(self) -> str:
        retried = ", ".join(f"{n} {k}" for k, n in self.flag_kinds.most_common()) or "none"
        failed = ", ".join(f"{n} {k}" for k, n in self.failed_kinds.most_common()) or "none"
        text = f"flags retried by the operator: {retried}; failed: {failed}"
        if self.holder_alive:
            text += f"; retries refused while the holder still ran them: {len(self.holder_alive)}"
        if self.already_resolved:
            text += f"; decisions found already recorded: {self.already_resolved}"
        return text

    async def settle(self, within_s: float, report: Callable[[Counter[str], int], None]) -> bool:
        """Resolve flags until no instance is open; False if `within_s` pass first, or if the
        same instances stay open, unflagged, for STALL_S (they are stuck: waiting longer only
        delays the report). `report(open instances by status, flags listed)` is called every few
        seconds."""
        deadline = time.monotonic() + within_s
        last_report = 0.0
        last_change, last_open = time.monotonic(), set[str]()
        while True:
            flagged = await self.resolve_flags()
            listed = await self.api.items("/v1/instances", {"status": OPEN})
            still_open = {str(i["id"]) for i in listed}
            if not still_open and not flagged:
                return True
            if flagged or still_open != last_open:
                last_change, last_open = time.monotonic(), still_open
            now = time.monotonic()
            if now > deadline or now - last_change > STALL_S:
                return False
            if now - last_report >= 5:
                last_report = now
                report(Counter(str(i["status"]) for i in listed), flagged)
            await asyncio.sleep(1)
