"""`paceline why ID`: an instance's situation in words, from what the API shows.

What it reads: the instance (`GET /v1/instances/{id}`: status, activities with their flags and
holders, waits, cancel), its open activities page by page when the instance holds more than
the first 1,000 (`GET /v1/instances/{id}/activities`), and the server registry
(`GET /v1/servers`) when a running attempt, a cancel or a pending start involves a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from paceline_cli.render import ago, parse_time, short, span, when

FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
OPEN = ("SCHEDULED", "RUNNING", "WAITING", "INTERRUPTED")
"""The activity statuses `why` speaks of while an instance runs."""
ENDED_BADLY = ("FAILED", "TIMED_OUT", "CANCELLED", "SKIPPED")
"""Of a final instance: the activities worth naming."""


@dataclass
class Action:
    command: str
    what: str


@dataclass
class Explanation:
    id: str
    status: str
    since: str | None
    summary: str
    details: list[str] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "since": self.since,
            "summary": self.summary,
            "details": self.details,
            "actions": [{"command": a.command, "what": a.what} for a in self.actions],
        }


def needs_servers(instance: dict[str, Any], activities: list[dict[str, Any]]) -> bool:
    """Whether the explanation names servers the registry should say more about."""
    if instance.get("status") == "PENDING":
        return True
    if any(a.get("status") in ("RUNNING", "SCHEDULED") for a in activities):
        return True
    cancel = instance.get("cancel") or {}
    return bool(cancel.get("waiting_for"))


def explain(
    instance: dict[str, Any],
    activities: list[dict[str, Any]],
    servers: list[dict[str, Any]] | None,
    now: datetime | None = None,
) -> Explanation:
    """The words for `instance`; `activities` are its activities (all of them, or at least the
    open ones), `servers` the registry's list (None when it was not read)."""
    now = now or datetime.now(UTC)
    words = _Words(instance, activities, {s["id"]: s for s in servers or []}, servers, now)
    return words.explain()


class _Words:
    def __init__(
        self,
        instance: dict[str, Any],
        activities: list[dict[str, Any]],
        by_id: dict[str, dict[str, Any]],
        servers: list[dict[str, Any]] | None,
        now: datetime,
    ) -> None:
        self.i = instance
        self.activities = activities
        self.by_id = by_id
        self.servers = servers
        self.now = now
        self.id = str(instance.get("id"))
        self.status = str(instance.get("status"))
        self.details: list[str] = []
        self.actions: list[Action] = []

    def at(self, value: Any) -> str:
        """`2025-06-02 10:00:03Z (3m ago)`."""
        return f"{when(value)} ({ago(value, self.now)})" if parse_time(value) else "an unknown time"

    def explain(self) -> Explanation:
        since = self.since()
        name = f"{self.i.get('definition')} v{self.i.get('version')}"
        summary = f"Instance {self.id} ({name}) is {self.status}"
        summary += f" since {self.at(since)}." if since else "."
        self.details.append(
            f"Started by {self.i.get('started_by')} ({self.i.get('started_how')}); accepted "
            f"{self.at(self.i.get('created_at'))}."
        )
        if self.status == "PENDING":
            self.pending()
        elif self.status in FINAL:
            self.ended()
        else:
            if self.status == "CANCELLING":
                self.cancelling()
            self.cancel_not_recorded()
            self.flagged()
            self.waiting()
            self.running()
        if self.status not in FINAL and self.status != "CANCELLING":
            self.actions.append(Action(f"paceline cancel {self.id}", "cancel the instance"))
        self.actions.append(Action(f"paceline history {self.id}", "every recorded event, with why"))
        return Explanation(self.id, self.status, since, summary, self.details, self.actions)

    def since(self) -> str | None:
        i = self.i
        if self.status == "PENDING":
            return i.get("created_at")
        if self.status in FINAL:
            return i.get("finished_at")
        if self.status == "CANCELLING":
            return (i.get("cancel") or {}).get("requested_at")
        if self.status == "FLAGGED":
            flagged = [a["flag"].get("flagged_at") for a in self._flagged() if a.get("flag")]
            return _earliest(flagged) or i.get("started_at")
        if self.status == "WAITING":
            # When the last thing before the wait happened: a wait began, or something ended.
            times = [
                a.get("started_at") if a.get("status") == "WAITING" else a.get("finished_at")
                for a in self.activities
            ]
            return _latest(times) or i.get("started_at")
        return i.get("started_at") or i.get("created_at")

    # --- the parts -----------------------------------------------------------------------------

    def pending(self) -> None:
        self.details.append(
            "It has not started: its start command is recorded and waits for a scheduler to "
            "take it."
        )
        if self.servers is None:
            return
        schedulers = [
            s for s in self.servers if s.get("kind") == "scheduler" and s.get("status") == "ACTIVE"
        ]
        if not schedulers:
            self.details.append(
                "No scheduler is ACTIVE in the server registry: start one (the start command "
                "waits on the broker and runs when one takes it)."
            )
            self.actions.append(Action("paceline servers", "the servers, and their status"))
        else:
            names = ", ".join(s["id"] for s in schedulers)
            self.details.append(
                f"{len(schedulers)} scheduler(s) ACTIVE ({names}): it should start within "
                "moments; if it stays PENDING, read the scheduler's log."
            )

    def flagged(self) -> None:
        flagged = self._flagged()
        if not flagged:
            return
        self.details.append(
            f"It waits for an operator: {len(flagged)} flagged "
            f"{'activity' if len(flagged) == 1 else 'activities'} (INTERRUPTED: the outcome "
            "of its attempt is unknown, so it is not run again by itself)."
        )
        for a in flagged:
            step = a.get("step")
            flag = a.get("flag") or {}
            restartable = "restartable" if a.get("restartable") else "not restartable"
            kind = flag.get("kind", "unknown")
            self.details.append(
                f"• step {step} ({a.get('type')}, attempt {flag.get('attempt', a.get('attempts'))}"
                f", {restartable}): flagged {kind} {self.at(flag.get('flagged_at'))}."
            )
            if flag.get("reason"):
                self.details.append(f"  Why: {flag['reason']}")
            holder = flag.get("holder")
            may_still_finish = False
            holder_id = "its holder"
            if isinstance(holder, dict):
                holder_id = str(holder.get("server_id"))
                may_still_finish = bool(holder.get("may_still_finish"))
                state = holder.get("status") or "not in the registry (removed)"
                beat = holder.get("last_heartbeat")
                seen = f", last heartbeat {ago(beat, self.now)}" if beat else ""
                self.details.append(f"  Its holder {holder_id} is {state}{seen}.")
                if holder.get("note"):
                    self.details.append(f"  {holder['note']}")
            base = f"paceline resolve {self.id} {step}"
            if may_still_finish:
                self.details.append(
                    f"  A retry is refused (409 holder-alive) while {holder_id} may "
                    "still finish the attempt: wait for its result (which resolves the flag by "
                    "itself), or retry anyway with --force (it may then run twice)."
                )
                self.actions.append(
                    Action(
                        f"{base} retry --force",
                        f"run step {step} again although its holder may still finish the attempt",
                    )
                )
            else:
                self.actions.append(
                    Action(
                        f"{base} retry",
                        f"run step {step} again as a new attempt "
                        "(its effect may then happen twice)",
                    )
                )
            self.actions.append(
                Action(
                    f"{base} skip --output '{{...}}'",
                    f"mark step {step} done without running it; "
                    "later steps read the output ({} when omitted)",
                )
            )
            self.actions.append(
                Action(f"{base} fail", f"fail step {step}, and with it the instance")
            )

    def waiting(self) -> None:
        waits = self.i.get("waiting_for") or []
        if not waits:
            return
        self.details.append(f"It waits for {len(waits)} wait step(s), the soonest due first:")
        for w in waits:
            step, due = w.get("step"), w.get("due_at")
            begun = w.get("since") or (self._activity(step) or {}).get("started_at")
            since = f", since {self.at(begun)}" if begun else ""
            if w.get("kind") == "timer":
                self.details.append(f"• step {step}: a timer, due {self.at(due)}{since}.")
            elif w.get("kind") == "signal":
                until = f"until {self.at(due)}" if due else "with no time-out"
                name = w.get("signal")
                self.details.append(f"• step {step}: the signal {name}, {until}{since}.")
                self.actions.append(
                    Action(
                        f"paceline signal {self.id} {name} --payload '{{...}}'",
                        f"send the signal {name} that step {step} waits for",
                    )
                )
            elif w.get("kind") == "approval":
                until = f"decided by {self.at(due)}" if due else "with no time-out"
                approval = w.get("approval_id") or "{approval_id}"
                self.details.append(
                    f"• step {step}: the approval {approval}, {until}{since}. Its approvers "
                    f"decide with POST /v1/approvals/{approval}/decision."
                )
            else:
                self.details.append(f"• step {step}: {w.get('kind')}, due {self.at(due)}.")

    def running(self) -> None:
        running = [a for a in self.activities if a.get("status") in ("RUNNING", "SCHEDULED")]
        if not running:
            if self.status == "RUNNING":
                self.details.append("Nothing runs at this moment: the scheduler is between steps.")
            return
        self.details.append(f"{len(running)} attempt(s) dispatched:")
        for a in running:
            step, attempt = a.get("step"), a.get("attempts")
            server = a.get("server") or a.get("claimed_by")
            head = f"• step {step} ({a.get('type')}), attempt {attempt}"
            if a.get("status") == "SCHEDULED" or not server:
                text = f"{head}: dispatched, not claimed by a worker yet"
                if a.get("reason"):
                    text += f" ({a['reason']})"
                self.details.append(text + ".")
                continue
            self.details.append(
                f"{head}: running since {self.at(a.get('started_at'))}, held by "
                f"{self.server_words(server)}."
            )
            if a.get("restartable"):
                self.details.append(
                    "  Restartable: should its server die, it runs again on another worker."
                )
            else:
                self.details.append(
                    "  Not restartable: should its server die while it runs, it is flagged "
                    "for an operator."
                )

    def cancelling(self) -> None:
        cancel = self.i.get("cancel") or {}
        self.details.append(
            f"A cancel was asked by {cancel.get('by')} {self.at(cancel.get('requested_at'))} "
            f"({cancel.get('reason')}); nothing more of it starts."
        )
        waits = cancel.get("waiting_for") or []
        if waits:
            self.details.append(f"It waits for {len(waits)} running attempt(s) to stop:")
            for w in waits:
                server = w.get("server")
                holder = self.server_words(server) if server else "no known server"
                self.details.append(
                    f"• step {w.get('step')}, attempt {w.get('attempt')}, held by {holder}."
                )
            self.details.append(
                "A worker that does not confirm within the scheduler's PACELINE_CANCEL_GRACE_S "
                "(30 s by default) is no longer waited for."
            )

    def cancel_not_recorded(self) -> None:
        cancel = self.i.get("cancel")
        if isinstance(cancel, dict) and not cancel.get("recorded"):
            self.details.append(
                f"A cancel was asked by {cancel.get('by')} {self.at(cancel.get('requested_at'))}"
                " but no scheduler has recorded it yet: it is applied when one takes it."
            )

    def ended(self) -> None:
        i = self.i
        took = ""
        start, end = parse_time(i.get("started_at")), parse_time(i.get("finished_at"))
        if start and end:
            took = f" after {span((end - start).total_seconds())}"
        count = i.get("activity_count")
        if self.status == "COMPLETED":
            self.details.append(f"It completed{took}, with {count} activities.")
        elif self.status == "FAILED":
            error = i.get("error") or {}
            self.details.append(
                f"It failed{took}: {error.get('kind')}: {error.get('message')}."
                if error
                else f"It failed{took}."
            )
            if error.get("outcome_unknown"):
                self.details.append(
                    "The outcome of what failed it is unknown: its effect may have happened."
                )
        else:
            cancel = i.get("cancel") or {}
            if cancel:
                self.details.append(
                    f"It was cancelled{took} by {cancel.get('by')}: {cancel.get('reason')} "
                    f"(asked {self.at(cancel.get('requested_at'))})."
                )
            else:
                self.details.append(f"It was cancelled{took}.")
        for a in self.activities:
            if a.get("status") not in ENDED_BADLY:
                continue
            text = f"• step {a.get('step')} ({a.get('type')}) {a.get('status')}"
            text += f" at attempt {a.get('attempts')}"
            error = a.get("error")
            if a.get("status") == "SKIPPED" and a.get("reason"):
                text += f": {a['reason']}"
                if isinstance(error, dict):
                    text += f" (the attempt had ended {error.get('kind')}: {error.get('message')})"
            elif isinstance(error, dict):
                text += f": {error.get('kind')}: {short(error.get('message'), 200)}"
            elif a.get("reason"):
                text += f": {short(a.get('reason'), 200)}"
            self.details.append(text + ".")

    # --- helpers ---------------------------------------------------------------------------------

    def server_words(self, server_id: str) -> str:
        if self.servers is None:
            return server_id
        s = self.by_id.get(server_id)
        if s is None:
            return f"{server_id} (not in the server registry: removed)"
        state = s.get("status")
        beat = ago(s.get("last_heartbeat"), self.now)
        text = f"{s.get('kind')} {server_id} ({state}, last heartbeat {beat})"
        if state == "LOST":
            text += (
                ": it is silent, so it may be dead; the broker hands its attempts to another "
                "worker, which runs a restartable one again and flags one that is not"
            )
        elif state in ("DRAINING", "DRAINED"):
            text += ": it is draining, and finishes what it runs"
        return text

    def _flagged(self) -> list[dict[str, Any]]:
        return [a for a in self.activities if a.get("status") == "INTERRUPTED"]

    def _activity(self, step: Any) -> dict[str, Any] | None:
        for a in self.activities:
            if a.get("step") == step:
                return a
        return None


def _earliest(values: list[Any]) -> str | None:
    timed = [(t, v) for v in values if (t := parse_time(v))]
    return min(timed)[1] if timed else None


def _latest(values: list[Any]) -> str | None:
    timed = [(t, v) for v in values if (t := parse_time(v))]
    return max(timed)[1] if timed else None
