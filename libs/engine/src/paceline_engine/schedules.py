"""The decisions of schedules (issue 11): which nominal fire times are due, which of them run,
what overlapping runs do, what a backfill covers. Pure functions of (spec, policy, state, now):
no I/O, no clock read; `now` is the database's clock, passed in by the caller.

How a scheduler uses them: in one transaction per due schedule, `plan_due` from the last
nominal time it decided (`Plan.last_nominal_at`, stored with the schedule; a new schedule's
creation time) to now; one ledger row per decision (`FireDecision`, keyed on the schedule and
its nominal time) and per `SkippedRange`; for each decision that fires, `overlap_decision` says
whether it starts, waits or is skipped; then the schedule's `last_nominal_at` and
`next_due_at` are stored. On resume, `plan_resume` does the same with the operator's answer.

Definitions (docs/schedules.md tells the same):

- A nominal time's **due instant** is the nominal time plus its jitter (`due_at`).
- A fire is **missed** when its due instant is more than `tolerance` (60 s by default) before
  `now`: a scheduler that runs a little late fires on time, not as a catch-up.
- Fires are decided in order of nominal time, and a plan covers every nominal time after
  `last_nominal_at` whose due instant has come, so two plans that follow each other cover the
  same nominal times as one plan over both.
- **A bounded ledger.** Every nominal time gets exactly one decision, but a plan lists one by
  one only the most recent `max(detail, max_catchup)` fires that were missed (and every fire on
  time); older missed ones are one `SkippedRange` (first and last nominal time, how many), so
  a year without a scheduler on an every-second schedule is 101 rows, not 31 million.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from paceline_engine.schedule_spec import (
    COUNT_BUDGET,
    EPOCH,
    MAX_FIRE_TIMES,
    Catchup,
    FireOutcome,
    NominalTimes,
    Overlap,
    SchedulePolicy,
    ScheduleSpec,
    aware,
    fire_times,
    nominal_times,
    parse_span,
)

__all__ = [
    "DETAIL_ROWS",
    "EPOCH",
    "MAX_BACKFILL",
    "MAX_FIRE_TIMES",
    "MISSED_AFTER",
    "BackfillTooLarge",
    "Catchup",
    "FireDecision",
    "FireOutcome",
    "Overlap",
    "OverlapAction",
    "OverlapDecision",
    "Plan",
    "SchedulePolicy",
    "ScheduleSpec",
    "SkippedRange",
    "due_at",
    "fire_times",
    "jitter_of",
    "overlap_decision",
    "parse_span",
    "plan_backfill",
    "plan_due",
    "plan_resume",
]

MISSED_AFTER = timedelta(seconds=60)
"""A fire due longer ago than this is missed (handled by the catch-up policy); a fire due
less long ago is on time, however late the scheduler got to it."""
MAX_TOLERANCE = timedelta(hours=1)
DETAIL_ROWS = 100
"""Missed fires a plan lists one by one (at least `max_catchup`); older ones are summarised."""
MAX_BACKFILL = 1_000
"""Nominal times one backfill covers at most."""
_US = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class FireDecision:
    """What happens to one nominal fire time: fire (start it, subject to the overlap policy)
    or skip it with `outcome`."""

    nominal_at: datetime
    """The nominal fire time (UTC): the ledger's key."""
    due_at: datetime
    """When it became due: `nominal_at` plus its jitter."""
    fire: bool
    """Start it (then `overlap_decision` says STARTED, BUFFERED or SKIPPED_OVERLAP)."""
    outcome: FireOutcome | None
    """When not fired: SKIPPED_MISSED or SKIPPED_PAUSED. None when it fires."""
    catchup: bool
    """It fires late, as a catch-up (missed or paused), not on time."""
    lateness: timedelta
    """`now - due_at`."""
    reason: str
    """Why, for the ledger."""


@dataclass(frozen=True, slots=True)
class SkippedRange:
    """Nominal times a plan skips without listing them: every fire time of the spec from
    `first_nominal_at` to `last_nominal_at`, both included. The ledger keeps it as one row,
    keyed on `first_nominal_at`."""

    first_nominal_at: datetime
    last_nominal_at: datetime
    count: int | None
    """How many fire times the range holds; None for a cron schedule with more than 10,000
    there (not counted one by one)."""
    outcome: FireOutcome
    """SKIPPED_MISSED or SKIPPED_PAUSED."""
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """Every nominal time after the last one decided whose due instant has come, decided."""

    decisions: tuple[FireDecision, ...]
    """One per nominal time, oldest first (after `skipped`)."""
    skipped: tuple[SkippedRange, ...]
    """Older nominal times summarised, oldest first (at most two: missed, then paused)."""
    last_nominal_at: datetime
    """The newest nominal time decided (the one given when none was): the next plan starts
    after it."""
    next_nominal_at: datetime | None
    """The first nominal time not decided yet; None when the schedule has no more fires."""
    next_due_at: datetime | None
    """When it is due: when to plan again."""

    @property
    def fires(self) -> tuple[FireDecision, ...]:
        """The decisions that fire, oldest first."""
        return tuple(d for d in self.decisions if d.fire)


# --- jitter ------------------------------------------------------------------------------------


def jitter_of(schedule_id: str, nominal_at: datetime, bound: timedelta) -> timedelta:
    """The jitter of one fire: a fraction of `bound` fixed by the schedule's id and the nominal
    time (the first 53 bits of a SHA-256 of both), in [0, bound). Every scheduler computes the
    same, so a fire's due instant never depends on which one fires it."""
    bound_us = bound // timedelta(microseconds=1)
    if bound_us <= 0:
        return timedelta(0)
    key = f"{schedule_id}|{(aware(nominal_at, 'nominal_at') - EPOCH) // timedelta(microseconds=1)}"
    fraction = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 11
    return timedelta(microseconds=(fraction * bound_us) >> 53)


class _Due:
    def __init__(self, spec: ScheduleSpec, schedule_id: str) -> None:
        self.schedule_id = schedule_id
        self.jitter = spec.jitter_delta

    def __call__(self, nominal: datetime, following: datetime | None) -> datetime:
        """`nominal`'s due instant; never at or after the `following` nominal time."""
        bound = self.jitter if following is None else min(self.jitter, following - nominal)
        return nominal + jitter_of(self.schedule_id, nominal, bound)


def due_at(spec: ScheduleSpec, schedule_id: str, nominal_at: datetime) -> datetime:
    """When the fire of `nominal_at` is due: `nominal_at` plus `jitter_of` the spec's jitter,
    or of the time to the next nominal time when that is shorter (fires never change order)."""
    nominal_at = aware(nominal_at, "nominal_at")
    return _Due(spec, schedule_id)(nominal_at, nominal_times(spec).first_after(nominal_at))


# --- plans -------------------------------------------------------------------------------------

_ON_TIME, _MISSED, _PAUSED = "on time", "missed", "paused"
_SKIPPED = {_MISSED: FireOutcome.SKIPPED_MISSED, _PAUSED: FireOutcome.SKIPPED_PAUSED}


def _when(moment: datetime, spec: ScheduleSpec) -> str:
    local = moment.astimezone(spec.zone)
    text = local.isoformat(timespec="seconds")
    return text.replace("+00:00", "Z") if spec.zone is UTC else f"{text} {spec.timezone}"


def _seconds(span: timedelta) -> str:
    seconds = span.total_seconds()
    if seconds < 120:
        return f"{seconds:.3g}s"
    if seconds < 7200:
        return f"{seconds / 60:.3g}m"
    return f"{seconds / 3600:,.4g}h"


@dataclass(frozen=True, slots=True)
class _Context:
    spec: ScheduleSpec
    policy: SchedulePolicy
    now: datetime
    catchup: Catchup
    paused_at: datetime | None

    def prefix(self, kind: str, due: datetime) -> str:
        now = _when(self.now, self.spec)
        if kind == _PAUSED:
            assert self.paused_at is not None
            return (
                f"due while paused (due {_when(due, self.spec)}; paused "
                f"{_when(self.paused_at, self.spec)}, resumed {now})"
            )
        return f"missed while no scheduler ran (due {_when(due, self.spec)}, now {now})"

    @property
    def answer(self) -> str:
        resumed = "resumed with " if self.paused_at else ""
        return f"{resumed}catchup={self.catchup}"


def _plan(
    spec: ScheduleSpec,
    policy: SchedulePolicy,
    schedule_id: str,
    last_nominal: datetime,
    now: datetime,
    *,
    tolerance: timedelta,
    detail: int,
    catchup: Catchup,
    paused_at: datetime | None,
) -> Plan:
    last_nominal, now = aware(last_nominal, "last_nominal"), aware(now, "now")
    if not timedelta(0) <= tolerance <= MAX_TOLERANCE:
        raise ValueError(f"tolerance: 0 to {MAX_TOLERANCE}, not {tolerance}")
    if detail < 1:
        raise ValueError(f"detail: at least 1, not {detail}")
    times = nominal_times(spec)
    due = _Due(spec, schedule_id)
    ctx = _Context(spec, policy, now, catchup, paused_at)

    def kind(due_instant: datetime) -> str:
        if paused_at is not None:
            return _MISSED if due_instant <= paused_at else _PAUSED
        return _ON_TIME if now - due_instant <= tolerance else _MISSED

    # Walk back from now: every fire on time, then up to `keep` missed ones; the rest is a range.
    upcoming = times.after(max(now, last_nominal))
    following = next(upcoming, None)
    after_that = next(upcoming, None) if following is not None else None
    nxt: tuple[datetime, datetime] | None = None
    if following is not None:
        nxt = (following, due(following, after_that))
    keep = max(detail, policy.max_catchup)
    rows: list[tuple[datetime, datetime, str]] = []
    late = 0
    summarised: datetime | None = None
    for nominal in times.upto(now):
        if nominal <= last_nominal:
            break
        due_instant = due(nominal, following)
        following = nominal
        if due_instant > now:  # only the newest can be: due instants keep nominal order
            nxt = (nominal, due_instant)
            continue
        k = kind(due_instant)
        if k != _ON_TIME:
            if late == keep:
                summarised = nominal
                break
            late += 1
        rows.append((nominal, due_instant, k))
    rows.reverse()

    decisions = _decide(rows, ctx)
    skipped = () if summarised is None else _ranges(times, due, last_nominal, summarised, ctx, rows)
    newest = rows[-1][0] if rows else last_nominal
    return Plan(
        decisions=decisions,
        skipped=skipped,
        last_nominal_at=newest,
        next_nominal_at=nxt[0] if nxt else None,
        next_due_at=nxt[1] if nxt else None,
    )


def _decide(rows: list[tuple[datetime, datetime, str]], ctx: _Context) -> tuple[FireDecision, ...]:
    late = [i for i, (_, _, k) in enumerate(rows) if k != _ON_TIME]
    on_time = [i for i, (_, _, k) in enumerate(rows) if k == _ON_TIME]
    picked: list[int] = []
    if ctx.catchup is Catchup.LATEST and late and not on_time:
        picked = [late[-1]]
    elif ctx.catchup is Catchup.ALL:
        inside = [i for i in late if ctx.now - rows[i][1] <= ctx.policy.window]
        picked = inside[-ctx.policy.max_catchup :]
    chosen = {row: position for position, row in enumerate(picked, 1)}
    decisions: list[FireDecision] = []
    for i, (nominal, due_instant, k) in enumerate(rows):
        lateness = ctx.now - due_instant
        if k == _ON_TIME:
            reason = f"due {_when(due_instant, ctx.spec)}; on time ({_seconds(lateness)} late)"
            decisions.append(
                FireDecision(nominal, due_instant, True, None, False, lateness, reason)
            )
            continue
        fire = i in chosen
        why = _why(ctx, fire, chosen.get(i, 0), len(chosen), due_instant, rows)
        reason = f"{ctx.prefix(k, due_instant)}; {why}"
        outcome = None if fire else _SKIPPED[k]
        decisions.append(FireDecision(nominal, due_instant, fire, outcome, True, lateness, reason))
    return tuple(decisions)


def _why(
    ctx: _Context,
    fire: bool,
    position: int,
    fired: int,
    due_instant: datetime,
    rows: list[tuple[datetime, datetime, str]],
) -> str:
    answer = ctx.answer
    if ctx.catchup is Catchup.SKIP:
        return f"{answer}: none runs"
    if ctx.catchup is Catchup.LATEST:
        if fire:
            return f"{answer}: the most recent runs"
        if rows[-1][2] == _ON_TIME:
            on_time = sum(1 for _, _, k in rows if k == _ON_TIME)
            last = _when(rows[-1][0], ctx.spec)
            if on_time == 1:
                return f"{answer}: the fire on time at {last} runs instead"
            return f"{answer}: the {on_time} fires on time run instead (the last at {last})"
        return f"{answer} runs only {_when(rows[-1][0], ctx.spec)}"
    if fire:
        return f"{answer}: catch-up {position} of {fired}, oldest first"
    if ctx.now - due_instant > ctx.policy.window:
        return f"{answer}: outside the catch-up window ({ctx.policy.catchup_window})"
    return (
        f"{answer}: only the {ctx.policy.max_catchup} most recent in the window run (max_catchup)"
    )


def _ranges(
    times: NominalTimes,
    due: _Due,
    last_nominal: datetime,
    summarised: datetime,
    ctx: _Context,
    rows: list[tuple[datetime, datetime, str]],
) -> tuple[SkippedRange, ...]:
    """The nominal times in (last_nominal, summarised], none of which fires, as ranges: the
    missed ones, then (on a resume) those due while paused."""
    split = summarised  # the newest missed one (due by the pause, on a resume)
    if ctx.paused_at is not None:
        # The newest at or before the pause, or the one before it when its jitter put it after.
        split = last_nominal
        for nominal in times.upto(min(ctx.paused_at, summarised)):
            if nominal <= last_nominal:
                break
            if due(nominal, times.first_after(nominal)) <= ctx.paused_at:
                split = nominal
                break
    bounds: list[tuple[datetime | None, datetime, str]] = []
    if split > last_nominal:
        bounds.append((times.first_after(last_nominal), split, _MISSED))
    if split < summarised:
        bounds.append((times.first_after(split), summarised, _PAUSED))
    ranges: list[SkippedRange] = []
    for low, high, kind in bounds:
        assert low is not None
        count = times.count(low - _US, high)
        shown = (
            f"more than {COUNT_BUDGET:,} fires"
            if count is None
            else (f"{count:,} fire{'s' if count != 1 else ''}")
        )
        what = "due while paused" if kind == _PAUSED else "missed while no scheduler ran"
        why = _range_why(ctx, due(low, times.first_after(low)), due(high, times.first_after(high)))
        reason = (
            f"{shown} {what}, from {_when(low, ctx.spec)} to {_when(high, ctx.spec)} (summarised: "
            f"the ledger lists the {len(rows)} most recent one by one); "
            f"{why or _why(ctx, False, 0, 0, high, rows)}"
        )
        ranges.append(SkippedRange(low, high, count, _SKIPPED[kind], reason))
    return tuple(ranges)


def _range_why(ctx: _Context, oldest_due: datetime, newest_due: datetime) -> str | None:
    """With `all`, why a range of missed fires does not run (None for the other answers)."""
    if ctx.catchup is not Catchup.ALL:
        return None
    window = f"the catch-up window ({ctx.policy.catchup_window})"
    if ctx.now - newest_due > ctx.policy.window:
        return f"{ctx.answer}: outside {window}"
    if ctx.now - oldest_due <= ctx.policy.window:
        return f"{ctx.answer}: beyond the {ctx.policy.max_catchup} most recent (max_catchup)"
    return f"{ctx.answer}: outside {window} or beyond the {ctx.policy.max_catchup} most recent"


def plan_due(
    spec: ScheduleSpec,
    policy: SchedulePolicy,
    schedule_id: str,
    last_nominal_at: datetime,
    now: datetime,
    *,
    tolerance: timedelta = MISSED_AFTER,
    detail: int = DETAIL_ROWS,
) -> Plan:
    """Decide every nominal time after `last_nominal_at` (the newest already decided; for a
    new schedule, its creation time) that is due at `now`, a schedule that is not paused.

    A fire due at most `tolerance` (0 to 1 h; 60 s by default) before `now` is on time and
    fires. Older ones were missed while no scheduler ran and follow `policy.catchup`: `skip`
    (none runs, each SKIPPED_MISSED), `latest` (the most recent runs, unless a fire is on time;
    Airflow's `catchup=False`) or `all` (each inside `catchup_window`, at most `max_catchup` of
    the most recent, oldest first; Airflow's `catchup=True` bounded by a window like Temporal's
    schedule catch-up window). Missed fires beyond the `max(detail, max_catchup)` most recent
    are summarised in `Plan.skipped`.

    Raises ValueError for a naive datetime, or `tolerance`/`detail` out of range."""
    return _plan(
        spec,
        policy,
        schedule_id,
        last_nominal_at,
        now,
        tolerance=tolerance,
        detail=detail,
        catchup=policy.catchup,
        paused_at=None,
    )


def plan_resume(
    spec: ScheduleSpec,
    policy: SchedulePolicy,
    schedule_id: str,
    last_nominal_at: datetime,
    paused_at: datetime,
    now: datetime,
    catchup: Catchup,
    *,
    detail: int = DETAIL_ROWS,
) -> Plan:
    """Decide, when a schedule paused at `paused_at` resumes at `now`, every nominal time after
    `last_nominal_at` that is due, with the operator's answer `catchup`: fires due while paused
    (SKIPPED_PAUSED when they do not run) and any missed before the pause (SKIPPED_MISSED) are
    handled alike: `skip` runs none, `latest` the most recent, `all` each inside the policy's
    `catchup_window`, at most `max_catchup`, oldest first. Bounded as `plan_due`.

    Raises ValueError for a naive datetime or `paused_at` after `now`."""
    paused_at = aware(paused_at, "paused_at")
    if paused_at > aware(now, "now"):
        raise ValueError("paused_at: after now")
    return _plan(
        spec,
        policy,
        schedule_id,
        last_nominal_at,
        now,
        tolerance=timedelta(0),
        detail=detail,
        catchup=Catchup(catchup),
        paused_at=paused_at,
    )


# --- overlap -----------------------------------------------------------------------------------


class OverlapAction(StrEnum):
    START = "start"
    """Start an instance now (STARTED, or START_FAILED if the start is refused)."""
    SKIP = "skip"
    """Do not start it: SKIPPED_OVERLAP."""
    BUFFER = "buffer"
    """Hold it (BUFFERED); start it when the runs before it ended, oldest first."""
    CANCEL_PREVIOUS = "cancel_previous"
    """Cancel the running instances, hold this fire (BUFFERED) and start it when they ended."""


@dataclass(frozen=True, slots=True)
class OverlapDecision:
    action: OverlapAction
    outcome: FireOutcome
    """The ledger outcome now: STARTED, SKIPPED_OVERLAP or BUFFERED."""
    reason: str
    replaces_buffered: bool = False
    """cancel_previous: the fire already held for an earlier cancel is replaced by this one
    (record it SKIPPED_OVERLAP)."""


def overlap_decision(
    overlap: Overlap, running: int, buffered: int, max_buffered: int = 100
) -> OverlapDecision:
    """What a fire does given the schedule's `running` instances (not ended) and its
    `buffered` fires (held, not started yet; they start before this one). The policies are
    Temporal's schedule overlap policies: `skip`, `buffer_one` (one held at most),
    `buffer_all` (at most `max_buffered` held), `allow`, `cancel_previous` (Temporal's
    CANCEL_OTHER; the cancel follows Paceline's cancel rules).

    Raises ValueError for a negative count."""
    if running < 0 or buffered < 0 or max_buffered < 1:
        raise ValueError("running and buffered: not negative; max_buffered: at least 1")
    active = running + buffered
    busy = f"{running} running, {buffered} held"
    overlap = Overlap(overlap)
    start = OverlapDecision(OverlapAction.START, FireOutcome.STARTED, "no earlier run is active")
    if overlap is Overlap.ALLOW:
        reason = (
            f"overlap=allow: started beside the active runs ({busy})" if active else (start.reason)
        )
        return OverlapDecision(OverlapAction.START, FireOutcome.STARTED, reason)
    if overlap is Overlap.CANCEL_PREVIOUS:
        if running:
            return OverlapDecision(
                OverlapAction.CANCEL_PREVIOUS,
                FireOutcome.BUFFERED,
                f"overlap=cancel_previous: the {running} running cancelled; starts when they ended",
                replaces_buffered=buffered > 0,
            )
        if buffered:
            return OverlapDecision(
                OverlapAction.START,
                FireOutcome.STARTED,
                "overlap=cancel_previous: the earlier runs ended; starts in place of the fire "
                "held for them",
                replaces_buffered=True,
            )
        return start
    if not active:
        return start
    skip = OverlapDecision(OverlapAction.SKIP, FireOutcome.SKIPPED_OVERLAP, "")
    buffer = OverlapDecision(OverlapAction.BUFFER, FireOutcome.BUFFERED, "")
    if overlap is Overlap.SKIP:
        return _with(skip, f"overlap=skip: an earlier run is active ({busy})")
    if overlap is Overlap.BUFFER_ONE:
        if buffered:
            return _with(skip, f"overlap=buffer_one: one fire is held already ({busy})")
        return _with(buffer, f"overlap=buffer_one: held until the active run ends ({busy})")
    if buffered >= max_buffered:
        return _with(skip, f"overlap=buffer_all: the buffer is full ({max_buffered} held)")
    return _with(buffer, f"overlap=buffer_all: held, {buffered + 1} of at most {max_buffered}")


def _with(decision: OverlapDecision, reason: str) -> OverlapDecision:
    return OverlapDecision(decision.action, decision.outcome, reason, decision.replaces_buffered)


# --- backfill ----------------------------------------------------------------------------------


class BackfillTooLarge(ValueError):
    """A backfill over more nominal times than its limit."""

    def __init__(self, start: datetime, until: datetime, count: int | None, limit: int) -> None:
        shown = f"{count:,}" if count is not None else f"more than {COUNT_BUDGET:,}"
        super().__init__(
            f"the backfill from {start.isoformat()} until {until.isoformat()} covers {shown} "
            f"fire times: at most {limit:,} in one backfill (split it)"
        )
        self.count = count
        self.limit = limit


def plan_backfill(
    spec: ScheduleSpec, start: datetime, until: datetime, *, limit: int = MAX_BACKFILL
) -> tuple[datetime, ...]:
    """The nominal fire times in [start, until) (UTC, ascending), honouring start_at/end_at;
    the caller starts each one that has no ledger row yet, so a repeated backfill starts
    nothing twice.

    Raises BackfillTooLarge (a ValueError, with the count) past `limit` times, ValueError for
    a naive datetime or `until` not after `start`."""
    start, until = aware(start, "from"), aware(until, "until")
    if until <= start:
        raise ValueError("until: after from")
    times = nominal_times(spec)
    found: list[datetime] = []
    for nominal in times.after(start - _US):
        if nominal >= until:
            break
        if len(found) == limit:
            raise BackfillTooLarge(start, until, times.count(start - _US, until - _US), limit)
        found.append(nominal)
    return tuple(found)
