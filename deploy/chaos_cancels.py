"""Cancels in a chaos run: a share of the started instances is cancelled a moment after its
start, while it runs, and each answer is recorded with the moment it arrived.

The promise checked (DESIGN.md, "Cancel stops work"): nothing of a cancelled instance starts
after the cancel is answered. Its effects are the sink's POSTs, timed on arrival: after the
answer, only an attempt that was granted to a worker before the scheduler recorded the cancel
(the answer's `cancel.waiting_for`: it is being stopped) may still reach the sink. When the
answer came before the scheduler recorded the cancel (it waits ~3 s), the moment the history
shows it recorded is the one that counts.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from chaos_api import Api, ApiUnavailable

CANCEL_SHARE = 0.05
"""The share of started instances (poison instances aside) that are cancelled."""
CANCEL_AFTER_S = (0.1, 3.0)
"""How long after its start (the 202) an instance is cancelled: while most of them run."""
RECORDED = ("CANCELLING", "CANCELLED")
"""An answer with one of these statuses: the scheduler had recorded the cancel."""
CANCEL_RECORDS = ("instance_cancelling", "instance_cancelled")
"""History kinds of the scheduler's record of a cancel."""


@dataclass
class CancelRecord:
    instance_id: str
    definition: str
    key: str
    asked_at: float
    """time.time() when the request was sent."""
    answered_at: float | None = None
    """time.time() when the answer arrived; None without one."""
    code: int | None = None
    """The answer's HTTP status."""
    status: str | None = None
    """A 202's instance status."""
    problem: str | None = None
    """Another answer's problem kind (`instance-ended`...)."""
    waiting_for: list[str] | None = None
    """With a CANCELLING answer: the steps `GET` showed in `cancel.waiting_for` right after."""
    status_after: str | None = None
    """With a CANCELLING answer: the status that `GET` showed (CANCELLED: it stopped already)."""
    error: str | None = None
    """Why there was no answer (the request may or may not have been recorded)."""

    @property
    def recorded_at_answer(self) -> bool:
        return self.code == 202 and self.status in RECORDED

    @property
    def may_be_cancelled(self) -> bool:
        """Whether the run may have cancelled it: a 202, or no answer at all."""
        return self.code == 202 or self.code is None


@dataclass
class Cancels:
    api: Api
    records: dict[str, CancelRecord] = field(default_factory=dict)
    """instance id -> its cancel"""

    async def cancel(self, instance_id: str, definition: str, key: str) -> None:
        record = CancelRecord(instance_id, definition, key, time.time())
        self.records[instance_id] = record
        path = f"/v1/instances/{instance_id}/cancel"
        try:
            # Tried again on a broken connection or a 503: a repeat answers as the first did.
            response = await self.api.call(
                "POST", path, json={"reason": "chaos: cancelled while it runs"}, patience=60
            )
        except ApiUnavailable as exc:
            record.error = str(exc)
            return
        record.answered_at = time.time()
        record.code = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 202:
            record.problem = _problem_kind(body)
            return
        record.status = str(body.get("status")) if isinstance(body, dict) else None
        if record.status == "CANCELLING":
            await self._read_waiting_for(record)

    async def _read_waiting_for(self, record: CancelRecord) -> None:
        path = f"/v1/instances/{record.instance_id}"
        try:
            response = await self.api.call("GET", path, patience=10)
        except ApiUnavailable:
            return
        if response.status_code != 200:
            return
        body = response.json()
        record.status_after = str(body.get("status"))
        cancel = body.get("cancel") or {}
        record.waiting_for = [str(w.get("step")) for w in cancel.get("waiting_for") or []]

    def summary(self) -> Counter[str]:
        """How the cancels were answered: `CANCELLED`, `CANCELLING`, `409 instance-ended`..."""
        counts: Counter[str] = Counter()
        for r in self.records.values():
            if r.code is None:
                counts["unanswered"] += 1
            elif r.code == 202:
                counts[str(r.status)] += 1
            else:
                counts[f"{r.code} {r.problem or ''}".strip()] += 1
        return counts


def _problem_kind(body: Any) -> str | None:
    kind = body.get("type") if isinstance(body, dict) else None
    return str(kind).rsplit(":", 1)[-1] if kind else None


def moment(value: str) -> float:
    """An API timestamp (ISO 8601, the database's clock: this machine's) as time.time()."""
    return datetime.fromisoformat(value).timestamp()


def recorded_entry(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The history entry where the scheduler recorded the cancel, if it did."""
    return next((h for h in history if h["kind"] in CANCEL_RECORDS), None)


def granted_before(history: list[dict[str, Any]], record_id: int) -> set[str]:
    """Steps with an attempt granted to a worker (claimed) before the cancel was recorded: the
    only ones that may still have an effect after it."""
    return {
        str(h["step"])
        for h in history
        if h["kind"] == "claimed" and h.get("step") and int(h["id"]) < record_id
    }


@dataclass
class Late:
    """POSTs of one cancelled instance that arrived after its cancel took effect."""

    allowed: list[str] = field(default_factory=list)
    """`step +Nms` of attempts granted before the cancel was recorded."""
    unlisted: list[str] = field(default_factory=list)
    """Of those, steps the answer's `waiting_for` (read just after it) did not list."""
    violations: list[str] = field(default_factory=list)


def late_posts(
    record: CancelRecord,
    history: list[dict[str, Any]],
    paths: dict[str, str],
    arrivals: dict[str, list[float]],
) -> Late | None:
    """The instance's POSTs after its cancel took effect, judged; None when no cancel took
    effect (it had ended first). `paths` maps each of its POST steps to its sink path."""
    entry = recorded_entry(history)
    if record.recorded_at_answer and record.answered_at is not None:
        since = record.answered_at
    elif entry is not None:
        since = moment(entry["at"])
    else:
        return None
    granted = granted_before(history, int(entry["id"])) if entry is not None else set()
    late = Late()
    for step, path in sorted(paths.items()):
        after = [t for t in arrivals.get(path, ()) if t > since]
        if not after:
            continue
        # At most one attempt per step runs when the cancel is recorded, and nothing after it.
        allowed = 1 if step in granted else 0
        for n, t in enumerate(after):
            what = f"{step} +{(t - since) * 1000:.0f}ms"
            if n < allowed:
                late.allowed.append(what)
                if record.waiting_for is not None and step not in record.waiting_for:
                    late.unlisted.append(step)
            else:
                late.violations.append(
                    f"{record.instance_id} ({record.definition}) {what} after the cancel "
                    f"({_answer(record)}); granted before it was recorded: "
                    f"{', '.join(sorted(granted)) or 'none'}"
                )
    return late


def _answer(record: CancelRecord) -> str:
    if record.code is None:
        return "no answer"
    if record.code != 202:
        return f"answered {record.code}"
    waits = f", waiting for {', '.join(record.waiting_for)}" if record.waiting_for else ""
    return f"answered {record.status}{waits}"
