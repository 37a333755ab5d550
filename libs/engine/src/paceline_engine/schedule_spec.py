"""What a schedule is: its spec and policy as the admin API takes them (issue 11, "Schedules"),
and the nominal fire times a spec means. Pure: no I/O, no clock.

Nominal fire times are UTC instants, computed the same way by every scheduler:

- **cron**: a POSIX 5-field cron expression (minute, hour, day of month, month, day of week; a
  day of month and a day of week both restricted means either, as in POSIX cron), matched in
  the spec's IANA `timezone` by croniter. We ask croniter only for matching *wall-clock* times
  (naive local times) and turn each into an instant ourselves, by the issue's DST rule: a local
  time that does not exist (spring forward) fires at the next valid instant (02:30 on the day
  Paris skips 02:00-03:00 fires at 03:00 local), and several such times fire once; a local time
  that exists twice (fall back) fires once, at its first occurrence. croniter 7's own
  timezone-aware iteration moves a missing daily time to the next valid instant, but skips a
  missing time of an hourly expression, fires a repeated local time twice (a daily
  `30 1 * * *` in America/New_York at 01:30 EDT and again at 01:30 EST), and, started inside
  the repeated hour, returns its second occurrence (tests/unit/test_schedules.py,
  `TestCroniterAlone`). Iterating wall-clock times keeps the set of fire times the same
  wherever an iteration starts.
- **interval**: `epoch + offset + k * interval` for every integer k, where epoch is the Unix
  epoch (1970-01-01T00:00:00Z): fixed instants, unaffected by DST or by when the schedule was
  created (Temporal anchors its interval specs the same way).

Both honour `start_at <= nominal <= end_at`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from functools import lru_cache
from itertools import islice
from typing import Annotated, Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from paceline_engine.definitions import MAX_DURATION_S, parse_duration

__all__ = [
    "EPOCH",
    "MAX_FIRE_TIMES",
    "Catchup",
    "FireOutcome",
    "NominalTimes",
    "Overlap",
    "SchedulePolicy",
    "ScheduleSpec",
    "fire_times",
    "nominal_times",
    "parse_span",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
"""The anchor of interval schedules: the Unix epoch, UTC."""
MAX_FIRE_TIMES = 10_000
"""The most fire times one `fire_times` call lists."""
MIN_INTERVAL = timedelta(seconds=1)
"""The shortest interval: fires are database rows, not sub-second timers."""
COUNT_BUDGET = 10_000
"""Cron fire times counted one by one before a count gives up (`NominalTimes.count`)."""

_US = timedelta(microseconds=1)
_SPAN = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_SPAN_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SPAN_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
_CRON_MACROS = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)


class Catchup(StrEnum):
    """What to do with fires missed while no scheduler ran, or while the schedule was paused."""

    SKIP = "skip"
    """None runs: each is recorded SKIPPED_MISSED (or SKIPPED_PAUSED)."""
    LATEST = "latest"
    """One run, for the most recent missed fire (Airflow's `catchup=False`)."""
    ALL = "all"
    """Each runs, oldest first, at most `max_catchup`, only inside `catchup_window` (Airflow's
    `catchup=True`, bounded like Temporal's schedule catch-up window)."""


class Overlap(StrEnum):
    """What a fire does while an earlier run of the schedule is still active."""

    SKIP = "skip"
    """Not started: SKIPPED_OVERLAP."""
    BUFFER_ONE = "buffer_one"
    """Held until the active run ends (one at most; a further fire is skipped)."""
    BUFFER_ALL = "buffer_all"
    """Each held until the runs before it ended, up to `max_buffered`."""
    ALLOW = "allow"
    """Started at once, beside the active runs."""
    CANCEL_PREVIOUS = "cancel_previous"
    """The active runs are cancelled (by the cancel rules: a non-restartable activity is never
    forced), and this one starts when they ended."""


class FireOutcome(StrEnum):
    """The outcome of one nominal fire time in the fire ledger."""

    STARTED = "STARTED"
    """An instance was started for it."""
    SKIPPED_OVERLAP = "SKIPPED_OVERLAP"
    """Not started: an earlier run was active (overlap policy)."""
    SKIPPED_MISSED = "SKIPPED_MISSED"
    """Not started: missed while no scheduler ran, and the catch-up policy did not run it."""
    SKIPPED_PAUSED = "SKIPPED_PAUSED"
    """Not started: due while the schedule was paused, and the resume did not run it."""
    BUFFERED = "BUFFERED"
    """Waiting for the active run to end (overlap policy); STARTED once it starts."""
    START_FAILED = "START_FAILED"
    """The start was refused (say, the definition is gone or the inputs no longer fit)."""


def parse_span(value: Any) -> timedelta:
    """A schedule's duration: what `parse_duration` (definitions.py) reads (a number of seconds,
    or `"500ms"`, `"30s"`, `"5m"`, `"1.5h"`), and also days (`"1d"`) and several parts
    (`"1h30m"`, `"2m30s"`). At most 30 days, not negative, to the microsecond.

    Raises ValueError naming the value."""
    if isinstance(value, str) and _SPAN.fullmatch(text := value.strip()):
        seconds = sum(float(n) * _SPAN_UNITS[unit] for n, unit in _SPAN_PART.findall(text))
        if seconds > MAX_DURATION_S:
            raise ValueError("a duration is at most 30 days")
    else:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            if isinstance(value, str) and "not a duration" in str(exc):
                raise ValueError(
                    f"{value!r} is not a duration (like '90s', '15m', '1h30m', '1d')"
                ) from None
            raise
    return timedelta(microseconds=round(seconds * 1_000_000))


def _as_written(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read true as 1.0
        parse_span(value)  # raises: not a duration
    return float(value) if isinstance(value, int | float) else value


Span = Annotated[str | float, BeforeValidator(_as_written)]
"""A duration as the user wrote it (`"15m"`, `"1h30m"`, or seconds). Checked by `parse_span`
in the model's own check, with the model's other rules, so that one bad duration does not hide
the other problems of a spec."""


def _span_problems(model: BaseModel, names: tuple[str, ...]) -> list[str]:
    """`name: why` for each of these duration fields of `model` that `parse_span` refuses."""
    problems = []
    for name in names:
        value = getattr(model, name)
        if value is None:
            continue
        try:
            parse_span(value)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
    return problems


@lru_cache(maxsize=256)
def zone_of(name: str) -> tzinfo:
    """The IANA time zone `name` (ZoneInfo, from the system's zone files or the tzdata
    package); raises ValueError for a name that is not one."""
    if name == "UTC":
        return UTC
    if name == "localtime":  # the machine's own zone: schedulers could disagree
        raise ValueError("'localtime' is not a zone name: name the zone (say Europe/Paris)")
    if name.startswith(("posix/", "right/")) or name == "Factory":
        # Copies and oddities of the system's zone files (right/ counts leap seconds): not in
        # the tzdata package, so two machines could read them differently or not at all.
        raise ValueError(f"{name!r} is not a canonical IANA zone name (such as Europe/Paris)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{name!r} is not an IANA time zone (such as Europe/Paris)") from None


def _cron_problem(expression: str) -> str | None:
    fields = expression.split()
    if expression.strip() not in _CRON_MACROS and len(fields) != 5:
        return (
            f"{expression!r} has {len(fields)} fields: a cron expression has 5 "
            "(minute hour day-of-month month day-of-week), as in '0 2 * * *'"
        )
    try:
        # The first match after 2000 proves the expression can fire at all ('0 0 30 2 *'
        # cannot); croniter looks up to 50 years ahead.
        croniter(expression, datetime(2000, 1, 1)).get_next(datetime)
    except (ValueError, TypeError, KeyError) as exc:
        if "find next date" in str(exc):
            return f"{expression!r} never fires (no date matches it)"
        return f"{expression!r} is not a cron expression: {exc}"
    return None


class ScheduleSpec(BaseModel):
    """When a schedule fires: exactly one of `cron` and `interval`."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    cron: str | None = None
    """A POSIX 5-field cron expression (`"0 2 * * *"`), or croniter's `@hourly`, `@daily`,
    `@weekly`, `@monthly`, `@yearly`; matched in `timezone`."""
    interval: Span | None = None
    """Fire every this long (`"15m"`, `"1h30m"`, `"90s"`; at least 1 s), at
    `epoch + offset + k * interval` (UTC), whatever the timezone."""
    offset: Span | None = None
    """For an interval: shifts its fire times from the epoch, less than the interval
    (`interval: "1h", offset: "15m"` fires at a quarter past every hour, UTC)."""
    timezone: str = "UTC"
    """The IANA zone a cron expression is read in (`"Europe/Paris"`)."""
    start_at: AwareDatetime | None = None
    """No fire before this instant (null: none)."""
    end_at: AwareDatetime | None = None
    """No fire after this instant (null: none)."""
    jitter: Span = "0s"
    """Each fire is due up to this long after its nominal time, by an amount fixed per
    schedule and nominal time (`schedules.due_at`). Less than the interval."""

    @model_validator(mode="after")
    def _check(self) -> ScheduleSpec:
        problems = _span_problems(self, ("interval", "offset", "jitter"))
        if (self.cron is None) == (self.interval is None):
            problems.append("a spec has exactly one of 'cron' and 'interval'")
        if self.cron is not None and (problem := _cron_problem(self.cron)):
            problems.append(f"cron: {problem}")
        try:
            zone_of(self.timezone)
        except ValueError as exc:
            problems.append(f"timezone: {exc}")
        if self.offset is not None and self.interval is None:
            problems.append("offset: only an interval takes an offset")
        if self.interval is not None and not problems:
            interval = self.interval_delta
            if interval < MIN_INTERVAL:
                problems.append("interval: at least 1s")
            if self.offset is not None and self.offset_delta >= interval:
                problems.append("offset: less than the interval")
            if self.jitter_delta >= interval:
                problems.append("jitter: less than the interval")
        if self.start_at and self.end_at and self.end_at < self.start_at:
            problems.append("end_at: before start_at")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def zone(self) -> tzinfo:
        return zone_of(self.timezone)

    @property
    def interval_delta(self) -> timedelta:
        """The interval (zero for a cron spec)."""
        return timedelta(0) if self.interval is None else parse_span(self.interval)

    @property
    def offset_delta(self) -> timedelta:
        return timedelta(0) if self.offset is None else parse_span(self.offset)

    @property
    def jitter_delta(self) -> timedelta:
        return parse_span(self.jitter)


class SchedulePolicy(BaseModel):
    """What a schedule does with missed fires and with overlapping runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    catchup: Catchup = Catchup.LATEST
    """Fires missed while no scheduler ran: `skip`, `latest` (one run, the most recent) or
    `all` (see `Catchup`)."""
    catchup_window: Span = "6h"
    """With `catchup: all`, only fires due at most this long ago run (more than zero, at
    most 30 days). Six hours by default: a run per missed fire of a longer outage is rarely
    what anyone wants, and `latest` covers it."""
    max_catchup: int = Field(default=10, ge=1, le=1000, strict=True)
    """With `catchup: all` (or a resume with `all`), at most this many missed fires run: the
    most recent ones in the window, oldest first."""
    overlap: Overlap = Overlap.SKIP
    """What a fire does while an earlier run is active (see `Overlap`)."""
    max_buffered: int = Field(default=100, ge=1, le=10_000, strict=True)
    """With `overlap: buffer_all`, fires held at most; a fire beyond it is SKIPPED_OVERLAP."""

    @model_validator(mode="after")
    def _check(self) -> SchedulePolicy:
        problems = _span_problems(self, ("catchup_window",))
        if not problems and self.window <= timedelta(0):
            problems.append("catchup_window: more than zero")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def window(self) -> timedelta:
        return parse_span(self.catchup_window)


# --- nominal fire times ------------------------------------------------------------------------


def _us(moment: datetime) -> int:
    """Microseconds since the epoch; `moment` is aware."""
    return (moment - EPOCH) // _US


def _at(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def aware(moment: datetime, name: str) -> datetime:
    """`moment` in UTC; raises ValueError when it has no offset."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name}: an aware datetime (with an offset), not {moment.isoformat()}")
    return moment.astimezone(UTC)


class NominalTimes(ABC):
    """The nominal fire times of a spec, as UTC instants, in both directions."""

    def __init__(self, spec: ScheduleSpec) -> None:
        self.spec = spec
        self.start = aware(spec.start_at, "start_at") if spec.start_at else None
        self.end = aware(spec.end_at, "end_at") if spec.end_at else None

    @abstractmethod
    def after(self, moment: datetime) -> Iterator[datetime]:
        """Every fire time strictly after `moment`, ascending (ends at `end_at`)."""

    @abstractmethod
    def upto(self, moment: datetime) -> Iterator[datetime]:
        """Every fire time at or before `moment`, descending (ends at `start_at`)."""

    def count(self, after: datetime, upto: datetime) -> int | None:
        """How many fire times are in (after, upto]; None when a cron spec has more than
        `COUNT_BUDGET` there (they are not counted one by one beyond it)."""
        n = 0
        for moment in self.after(after):
            if moment > upto:
                return n
            n += 1
            if n > COUNT_BUDGET:
                return None
        return n

    def first_after(self, moment: datetime) -> datetime | None:
        return next(iter(self.after(moment)), None)


class _IntervalTimes(NominalTimes):
    def __init__(self, spec: ScheduleSpec) -> None:
        super().__init__(spec)
        self.every = spec.interval_delta // _US
        self.offset = spec.offset_delta // _US
        # The range of k: start_at <= offset + k * every <= end_at.
        self.k_low = (
            None if self.start is None else -((self.offset - _us(self.start)) // self.every)
        )
        self.k_high = None if self.end is None else self._k_upto(_us(self.end))

    def _k_upto(self, us: int) -> int:
        return (us - self.offset) // self.every

    def _k_after(self, moment: datetime) -> int:
        k = self._k_upto(_us(moment)) + 1
        return k if self.k_low is None else max(k, self.k_low)

    def _k_until(self, moment: datetime) -> int:
        k = self._k_upto(_us(moment))
        return k if self.k_high is None else min(k, self.k_high)

    def after(self, moment: datetime) -> Iterator[datetime]:
        k = self._k_after(moment)
        while self.k_high is None or k <= self.k_high:
            try:
                yield _at(self.offset + k * self.every)
            except OverflowError:  # past the year 9999
                return
            k += 1

    def upto(self, moment: datetime) -> Iterator[datetime]:
        k = self._k_until(moment)
        while self.k_low is None or k >= self.k_low:
            try:
                yield _at(self.offset + k * self.every)
            except OverflowError:  # before the year 1
                return
            k -= 1

    def count(self, after: datetime, upto: datetime) -> int:
        return max(0, self._k_until(upto) - self._k_after(after) + 1)


class _CronTimes(NominalTimes):
    def __init__(self, spec: ScheduleSpec) -> None:
        super().__init__(spec)
        assert spec.cron is not None
        self.expression = spec.cron
        self.zone = spec.zone

    def wall(self, moment: datetime) -> datetime:
        """The naive local time of an instant."""
        return moment.astimezone(self.zone).replace(tzinfo=None)

    def instant(self, wall: datetime) -> datetime:
        """The instant a matching local time fires at (the DST rule): its first occurrence,
        or, for a local time that does not exist, the instant the clocks jumped past it."""
        if self.zone is UTC:
            return wall.replace(tzinfo=UTC)
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        if self.wall(first) == wall:
            return first
        # In a gap: fold=0 reads it with the offset before the jump (an instant after it),
        # fold=1 with the offset after (an instant before it). Search the jump between them.
        low = _us(wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)) // 1_000_000
        high = -(-_us(first) // 1_000_000)
        before = _at(low * 1_000_000).astimezone(self.zone).utcoffset()
        while high - low > 1:
            middle = (low + high) // 2
            if _at(middle * 1_000_000).astimezone(self.zone).utcoffset() == before:
                low = middle
            else:
                high = middle
        return _at(high * 1_000_000)

    def _walls(self, start: datetime, backwards: bool) -> Iterator[datetime]:
        it = croniter(self.expression, start)
        step = it.get_prev if backwards else it.get_next
        while True:
            try:
                yield cast(datetime, step(datetime))
            except (ValueError, OverflowError):  # no further match (CroniterBadDateError)
                return

    def after(self, moment: datetime) -> Iterator[datetime]:
        if self.start is not None and moment < self.start:
            moment = self.start - _US
        # Walls up to `moment`'s own fire at their first occurrence, at or before it.
        last = moment
        for wall in self._walls(self.wall(moment), backwards=False):
            fire = self.instant(wall)
            if fire <= last:  # a gap's times after the first; a repeated time's second pass
                continue
            if self.end is not None and fire > self.end:
                return
            yield fire
            last = fire

    def upto(self, moment: datetime) -> Iterator[datetime]:
        if self.end is not None and moment > self.end:
            moment = self.end
        local = moment.astimezone(self.zone)
        # In the second pass of a repeated hour, later walls of that hour fired (first pass)
        # before `moment`: start from the end of the repeated hour.
        shift = timedelta(0)
        if local.fold:
            first, second = local.replace(fold=0).utcoffset(), local.utcoffset()
            assert first is not None and second is not None
            shift = first - second
        start = local.replace(tzinfo=None) + shift + timedelta(minutes=1)
        last: datetime | None = None
        for wall in self._walls(start, backwards=True):
            fire = self.instant(wall)
            if fire > moment or (last is not None and fire >= last):
                continue
            if self.start is not None and fire < self.start:
                return
            yield fire
            last = fire


def nominal_times(spec: ScheduleSpec) -> NominalTimes:
    """The nominal fire times of `spec` (see the module's docstring)."""
    return _CronTimes(spec) if spec.cron is not None else _IntervalTimes(spec)


def fire_times(spec: ScheduleSpec, after: datetime, count: int) -> list[datetime]:
    """The next `count` (0 to `MAX_FIRE_TIMES`) nominal fire times strictly after `after` (an
    aware datetime), as UTC datetimes, ascending; fewer when `end_at` comes first.

    Raises ValueError for a naive `after` or a count out of range."""
    if not 0 <= count <= MAX_FIRE_TIMES:
        raise ValueError(f"count: 0 to {MAX_FIRE_TIMES}, not {count}")
    return list(islice(nominal_times(spec).after(aware(after, "after")), count))
