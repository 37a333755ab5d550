"""What a schedule's fire writes, in the caller's transaction, with the schedule's row locked
(schedule_store): the ledger row, and for a fire that starts, the PENDING instance and its
start command (outbox). A transaction that does not commit leaves none of them; one that
commits leaves all. The decisions are the engine's (paceline_engine.schedules); this module
only writes them.

Used by the scheduler's firing loop (`fire_due`, `release_buffered`) and by the admin API
(`fire_now` for a triggered run, `backfill`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from paceline_contracts.messages import CancelInstance, InstanceCancelled
from paceline_contracts.queues import Queue, Stream
from paceline_engine.definitions import DefinitionError, resolve_inputs, trigger_for_schedule
from paceline_engine.schedule_spec import NominalTimes, nominal_times
from paceline_engine.schedules import (
    MISSED_AFTER,
    FireOutcome,
    Overlap,
    OverlapAction,
    OverlapDecision,
    Plan,
    overlap_decision,
    plan_due,
    plan_resume,
)
from paceline_infra import outbox
from paceline_infra.outbox import OutboxMessage
from paceline_starts import instances, schedule_store
from paceline_starts.instances import StartedHow
from paceline_starts.schedule_store import Fire, Schedule

log = logging.getLogger(__name__)

_US = timedelta(microseconds=1)


@dataclass(slots=True)
class Written:
    """What a transaction wrote for one schedule: its ledger rows and the messages to flush
    after the commit."""

    fires: list[Fire] = field(default_factory=list)
    messages: list[OutboxMessage] = field(default_factory=list)

    def extend(self, other: Written) -> None:
        self.fires.extend(other.fires)
        self.messages.extend(other.messages)


@dataclass(slots=True)
class Pending:
    """What fires wrote in a transaction, not written yet: instances, ledger rows and where
    each schedule stands, written together (`write`) before the commit. A round of the firing
    loop writes those of all its schedules at once (a few statements, not a few per fire)."""

    instances: list[instances.NewInstance] = field(default_factory=list)
    fires: list[tuple[str, Fire]] = field(default_factory=list)
    advances: list[schedule_store.Advance] = field(default_factory=list)
    known: dict[str, dict[datetime, str]] | None = None
    """Ledger rows already there after each schedule's last decided nominal time, read for
    the whole round at once (`schedule_store.decided_after`); None: read per schedule."""

    async def write(self, conn: asyncpg.Connection) -> None:
        await instances.insert_many(conn, self.instances)
        await schedule_store.record_many(conn, self.fires)
        await schedule_store.advance(conn, self.advances)
        self.instances.clear()
        self.fires.clear()
        self.advances.clear()


@dataclass(slots=True)
class _Firing:
    """One schedule being fired in a transaction: its buffered count moves as fires are held
    and started."""

    conn: asyncpg.Connection
    schedule: Schedule
    now: datetime
    buffered: int
    pending: Pending = field(default_factory=Pending)
    written: Written = field(default_factory=Written)
    started: list[UUID] = field(default_factory=list)
    """The instances started here (maybe not written yet: `pending`)."""

    async def running(self) -> list[UUID]:
        """Its instances that have not ended: those in the database, then those started here."""
        stored = await schedule_store.running(self.conn, self.schedule)
        return stored + [i for i in self.started if i not in stored]

    async def start(self, nominal_at: datetime, why: str) -> tuple[FireOutcome, UUID | None, str]:
        """Start an instance for the fire; START_FAILED (with the reason) when the definition
        or the inputs refuse it."""
        s = self.schedule
        try:
            found = await instances.resolved_definition(self.conn, s.definition, s.version)
            if found is None:
                what = f" version {s.version}" if s.version is not None else ""
                why = f"definition {s.definition!r}{what} not found"
                return FireOutcome.START_FAILED, None, why
            version, definition = found
            inputs = resolve_inputs(definition, s.inputs)
        except DefinitionError as exc:
            problems = "; ".join(f"{p.path}: {p.message}" for p in exc.problems[:5])
            return FireOutcome.START_FAILED, None, f"the start was refused: {problems}"
        new = instances.new_instance(
            definition=s.definition,
            version=version,
            inputs=inputs,
            started_by=s.starter,
            started_how=StartedHow.SCHEDULE,
            trigger=trigger_for_schedule(s.id, nominal_at),
        )
        self.pending.instances.append(new)
        self.written.messages.append(new.command)
        self.started.append(new.id)
        return FireOutcome.STARTED, new.id, why

    async def fire(
        self, nominal_at: datetime, due_at: datetime, how: str, why: str, overlap: Overlap
    ) -> Fire:
        """One fire under `overlap`: started, held, skipped, or the running runs cancelled
        and this one held until they ended."""
        if overlap is Overlap.ALLOW and not self.buffered:
            # Whatever runs, it starts: no need to count the runs (a fire a second adds up).
            running: list[UUID] = []
            decision = OverlapDecision(
                OverlapAction.START, FireOutcome.STARTED, "overlap=allow: started"
            )
        else:
            running = list(await self.running())
            decision = overlap_decision(
                overlap, len(running), self.buffered, self.schedule.policy.max_buffered
            )
        if decision.replaces_buffered and self.buffered:
            await schedule_store.unbuffer_all(
                self.conn,
                self.schedule.id,
                self.now,
                f"replaced by the fire of {nominal_at.isoformat()} (overlap=cancel_previous)",
            )
            self.buffered = 0
        reason = f"{why}; {decision.reason}"
        instance_id: UUID | None = None
        started_at: datetime | None = None
        outcome = decision.outcome
        if decision.action is OverlapAction.START:
            outcome, instance_id, reason = await self.start(nominal_at, reason)
            started_at = self.now if instance_id else None
        elif decision.action in (OverlapAction.BUFFER, OverlapAction.CANCEL_PREVIOUS):
            self.buffered += 1
            if decision.action is OverlapAction.CANCEL_PREVIOUS:
                await self.cancel(running, nominal_at)
        row = Fire(
            nominal_at=nominal_at,
            outcome=outcome,
            how=how,
            reason=reason,
            decided_at=self.now,
            due_at=due_at,
            instance_id=instance_id,
            started_at=started_at,
        )
        self.written.fires.append(row)
        return row

    async def cancel(self, running: Sequence[UUID], nominal_at: datetime) -> None:
        """Ask for the cancel of the running runs, as an operator's cancel does (its rules
        apply: nothing non-restartable is forced)."""
        by = self.schedule.starter
        reason = f"overlap=cancel_previous: the fire of {nominal_at.isoformat()} replaces it"
        await self.pending.write(self.conn)  # a cancel request refers to its instance's row
        for instance_id in running:
            at = await self.conn.fetchval(
                "INSERT INTO cancel_requests (instance_id, by, reason) VALUES ($1, $2, $3)"
                " ON CONFLICT (instance_id) DO NOTHING RETURNING requested_at",
                instance_id,
                by,
                reason,
            )
            if at is None:
                continue  # a cancel was asked already
            messages = [
                OutboxMessage.of(
                    Queue.COMMANDS,
                    CancelInstance(instance_id=instance_id, reason=reason, by=by),
                ),
                OutboxMessage.of(
                    Stream.CANCELLATIONS, InstanceCancelled(instance_id=instance_id, by=by, at=at)
                ),
            ]
            await outbox.stage(self.conn, messages)
            self.written.messages.extend(messages)


async def fire_due(
    conn: asyncpg.Connection,
    schedule: Schedule,
    now: datetime,
    tolerance: timedelta = MISSED_AFTER,
    pending: Pending | None = None,
) -> Written:
    """Decide every nominal time of `schedule` due at `now` (the database's clock), a ledger
    row per decision (skipped ranges summarised), an instance per fire that starts; then the
    schedule's next due time. A fire due more than `tolerance` before `now` was missed
    (`plan_due`). Just resumed, the fires due up to the resume are the pause's, decided by the
    operator's answer (`plan_resume`), and those due since by the usual rules: two plans in a
    row decide what one over both would. Nominal times already in the ledger (a backfill or a
    triggered run got there first) are left as they are. With `pending`, the instances it
    starts are left there for the caller to write (with those of other schedules) before the
    commit."""
    firing = _Firing(conn, schedule, now, schedule.buffered, pending or Pending())
    last = schedule.last_nominal_at
    if schedule.resume_catchup is not None and schedule.paused_at is not None:
        resumed = min(schedule.resumed_at or now, now)
        paused = plan_resume(
            schedule.spec,
            schedule.policy,
            schedule.id,
            last,
            min(schedule.paused_at, resumed),
            resumed,
            schedule.resume_catchup,
        )
        await _decide(firing, paused, "resume")
        last = paused.last_nominal_at
    plan = plan_due(schedule.spec, schedule.policy, schedule.id, last, now, tolerance=tolerance)
    await _decide(firing, plan, "catchup")
    firing.pending.fires += [(schedule.id, f) for f in firing.written.fires]
    firing.pending.advances.append(
        schedule_store.Advance(schedule.id, plan.last_nominal_at, plan.next_due_at, firing.buffered)
    )
    if pending is None:
        await firing.pending.write(conn)
    return firing.written


async def _decide(firing: _Firing, plan: Plan, how_late: str) -> None:
    """The plan's decisions as ledger rows (`how_late` for the fires decided late: missed or
    paused) and fires, in `firing`."""
    schedule, now = firing.schedule, firing.now
    if firing.pending.known is not None:
        known = firing.pending.known.get(schedule.id, {})
    else:
        known = await schedule_store.decided(
            firing.conn,
            schedule.id,
            [d.nominal_at for d in plan.decisions] + [r.first_nominal_at for r in plan.skipped],
        )
    for r in plan.skipped:
        if r.first_nominal_at not in known:
            firing.written.fires.append(
                Fire(
                    nominal_at=r.first_nominal_at,
                    last_nominal_at=r.last_nominal_at,
                    count=r.count,
                    outcome=r.outcome,
                    how=how_late,
                    reason=r.reason,
                    decided_at=now,
                )
            )
    for d in plan.decisions:
        if d.nominal_at in known:
            continue
        how = how_late if d.catchup else "schedule"
        if d.fire:
            await firing.fire(d.nominal_at, d.due_at, how, d.reason, schedule.policy.overlap)
            continue
        assert d.outcome is not None
        firing.written.fires.append(
            Fire(
                nominal_at=d.nominal_at,
                outcome=d.outcome,
                how=how,
                reason=d.reason,
                decided_at=now,
                due_at=d.due_at,
            )
        )


async def release_buffered(conn: asyncpg.Connection, schedule: Schedule, now: datetime) -> Written:
    """Start the oldest buffered fire of `schedule` when none of its runs is active (one at a
    time: the next waits for it in turn)."""
    firing = _Firing(conn, schedule, now, schedule.buffered)
    if await schedule_store.running(conn, schedule):
        return firing.written
    held = await schedule_store.oldest_buffered(conn, schedule.id)
    if held is None:  # the count drifted (a deleted row): trust the ledger
        await schedule_store.set_buffered(conn, schedule.id, 0)
        return firing.written
    why = f"{held['reason']}; the earlier run ended at {now.isoformat()}"
    outcome, instance_id, reason = await firing.start(held["nominal_at"], why)
    fire = Fire(
        nominal_at=held["nominal_at"],
        outcome=outcome,
        how=held["how"],
        reason=reason,
        decided_at=now,
        due_at=held["due_at"],
        instance_id=instance_id,
        started_at=now if instance_id else None,
    )
    firing.written.fires.append(fire)
    await firing.pending.write(conn)
    await schedule_store.record(conn, schedule.id, [fire])
    await schedule_store.set_buffered(conn, schedule.id, max(0, schedule.buffered - 1))
    return firing.written


async def fire_now(
    conn: asyncpg.Connection, schedule: Schedule, now: datetime, overlap: Overlap | None = None
) -> Written:
    """A run now, asked by an operator (`POST /v1/schedules/{id}/trigger`): nominal time
    `now`, under the schedule's overlap policy unless `overlap` is given."""
    firing = _Firing(conn, schedule, now, schedule.buffered)
    fire = await firing.fire(
        now, now, "trigger", "triggered by an operator", overlap or schedule.policy.overlap
    )
    await firing.pending.write(conn)
    await schedule_store.record(conn, schedule.id, [fire])
    await schedule_store.set_buffered(conn, schedule.id, firing.buffered)
    return firing.written


async def backfill(
    conn: asyncpg.Connection,
    schedule: Schedule,
    nominal: Sequence[datetime],
    now: datetime,
    overlap: Overlap | None = None,
) -> Written:
    """Run these nominal times (`plan_backfill`'s), oldest first, under `overlap` (the
    schedule's policy by default): each one already STARTED or BUFFERED is left alone, so a
    repeated backfill starts nothing twice; one recorded skipped (missed, paused, overlapped,
    failed to start) gets its run, and its ledger row says so."""
    known = await schedule_store.decided(conn, schedule.id, nominal)
    firing = _Firing(conn, schedule, now, schedule.buffered)
    times = nominal_times(schedule.spec)
    for at in nominal:
        earlier = known.get(at)
        if earlier in (FireOutcome.STARTED, FireOutcome.BUFFERED):
            continue
        if earlier is not None:
            await _out_of_range(conn, schedule.id, times, at)
        why = "backfill" + (f" (was {earlier})" if earlier else "")
        await firing.fire(at, at, "backfill", why, overlap or schedule.policy.overlap)
    await firing.pending.write(conn)
    await schedule_store.record(conn, schedule.id, firing.written.fires)
    await schedule_store.set_buffered(conn, schedule.id, firing.buffered)
    return firing.written


async def _out_of_range(
    conn: asyncpg.Connection, schedule_id: str, times: NominalTimes, nominal_at: datetime
) -> None:
    """When a range row holds `nominal_at`, split it around it: every nominal time stays
    covered by exactly one row once `nominal_at` has its own."""
    held = await schedule_store.range_holding(conn, schedule_id, nominal_at)
    if held is None:
        return
    first, last, count = held["nominal_at"], held["last_nominal_at"], held["count"]
    before: tuple[datetime, int | None] | None = None
    after: tuple[datetime, int | None] | None = None
    if nominal_at > first:
        prev = next(iter(times.upto(nominal_at - _US)))
        before = (prev, times.count(first - _US, prev))
    following = times.first_after(nominal_at)
    if following is not None and following <= last:
        left = before[1] if before is not None else 0
        rest = count - left - 1 if count is not None and left is not None else None
        after = (following, rest)
    await schedule_store.split_range(conn, schedule_id, held, nominal_at, before, after)
