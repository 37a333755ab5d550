"""Schedules (issue 11): specs and policies, nominal fire times (cron in a time zone with the
issue's DST rule, intervals anchored on the epoch), jitter, the plans of due and resumed
schedules under each catch-up policy (bounded), overlap decisions and backfills."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from itertools import islice, pairwise
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from paceline_engine.schedule_spec import COUNT_BUDGET, nominal_times
from paceline_engine.schedules import (
    BackfillTooLarge,
    Catchup,
    FireOutcome,
    Overlap,
    OverlapAction,
    Plan,
    SchedulePolicy,
    ScheduleSpec,
    due_at,
    fire_times,
    jitter_of,
    overlap_decision,
    parse_span,
    plan_backfill,
    plan_due,
    plan_resume,
)

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def cron(expression: str, zone: str = "UTC", **extra: Any) -> ScheduleSpec:
    return ScheduleSpec(cron=expression, timezone=zone, **extra)


def every(interval: str, **extra: Any) -> ScheduleSpec:
    return ScheduleSpec(interval=interval, **extra)


def local(moments: list[datetime], zone: ZoneInfo) -> list[str]:
    return [m.astimezone(zone).isoformat(timespec="minutes") for m in moments]


def covered(spec: ScheduleSpec, plan: Plan) -> list[datetime]:
    """Every nominal time a plan decides: its ranges expanded, then its decisions."""
    out: list[datetime] = []
    for skipped in plan.skipped:
        span = expected_between(
            spec, skipped.first_nominal_at - timedelta(microseconds=1), skipped.last_nominal_at
        )
        if skipped.count is not None:
            assert len(span) == skipped.count
        out.extend(span)
    out.extend(d.nominal_at for d in plan.decisions)
    return out


def expected_between(spec: ScheduleSpec, after: datetime, upto: datetime) -> list[datetime]:
    times: list[datetime] = []
    for t in nominal_times(spec).after(after):
        if t > upto:
            break
        times.append(t)
    return times


# --- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15m", 900),
        ("1h30m", 5400),
        ("90s", 90),
        ("2m30s", 150),
        ("1d", 86_400),
        ("1d2h", 93_600),
        ("500ms", 0.5),
        ("1.5h", 5400),
        (" 1h ", 3600),
        (90, 90),
        (1.25, 1.25),
        ("30", 30),
        ("0s", 0),
    ],
)
def test_spans(text: Any, seconds: float) -> None:
    assert parse_span(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "not a duration"),
        ("1h 30m", "not a duration"),
        ("-5m", "not a duration"),
        ("31d", "at most 30 days"),
        ("720h1s", "at most 30 days"),
        (True, "number of seconds"),
        (-1, "not negative"),
        (None, "not a duration"),
    ],
)
def test_bad_spans(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_span(value)


# --- specs and policies ------------------------------------------------------------------------


def test_the_issue_example_validates_with_its_defaults() -> None:
    spec = ScheduleSpec.model_validate_json(
        '{"cron": "0 2 * * *", "timezone": "Europe/Paris", "start_at": null, "end_at": null,'
        ' "jitter": "0s"}'
    )
    policy = SchedulePolicy.model_validate_json(
        '{"catchup": "latest", "catchup_window": "6h", "max_catchup": 10, "overlap": "skip"}'
    )
    assert spec.zone == PARIS
    assert policy == SchedulePolicy()
    assert (policy.catchup, policy.window, policy.max_catchup) == (
        Catchup.LATEST,
        timedelta(hours=6),
        10,
    )
    assert (policy.overlap, policy.max_buffered) == (Overlap.SKIP, 100)
    assert ScheduleSpec(interval="15m").timezone == "UTC"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "exactly one of 'cron' and 'interval'"),
        ({"cron": "0 2 * * *", "interval": "1h"}, "exactly one of 'cron' and 'interval'"),
        ({"cron": "0 2 * *"}, "has 4 fields"),
        ({"cron": "0 0 2 * * *"}, "has 6 fields"),
        ({"cron": "61 * * * *"}, "is not a cron expression"),
        ({"cron": "0 2 * * mon-funday"}, "is not a cron expression"),
        ({"cron": "H 2 * * *"}, "is not a cron expression"),
        ({"cron": "0 0 30 2 *"}, "never fires"),
        ({"cron": "@reboot"}, "has 1 fields"),
        ({"interval": "0.5s"}, "at least 1s"),
        ({"interval": "soon"}, "not a duration"),
        ({"interval": "31d"}, "at most 30 days"),
        ({"interval": True}, "number of seconds"),
        ({"cron": "0 2 * * *", "offset": "5m"}, "only an interval takes an offset"),
        ({"interval": "1h", "offset": "1h"}, "offset: less than the interval"),
        ({"interval": "1m", "jitter": "1m"}, "jitter: less than the interval"),
        ({"interval": "1h", "timezone": "Mars/Olympus"}, "not an IANA time zone"),
        ({"interval": "1h", "timezone": "localtime"}, "name the zone"),
        ({"interval": "1h", "timezone": ""}, "not an IANA time zone"),
        ({"interval": "1h", "start_at": "2030-01-01T00:00:00"}, "timezone"),
        (
            {"interval": "1h", "start_at": "2030-01-02T00:00Z", "end_at": "2030-01-01T00:00Z"},
            "end_at: before start_at",
        ),
        ({"interval": "1h", "every": "day"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_specs_are_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ScheduleSpec.model_validate(raw)


def test_a_bad_duration_does_not_hide_the_other_problems_of_a_spec() -> None:
    """Every problem at once: a duration out of range is one problem among the others, not a
    field error that stops the spec's own checks."""
    raw = {
        "cron": "61 * * * *",
        "timezone": "Mars/Olympus",
        "jitter": "40d",
        "start_at": "2021-01-01T00:00:00Z",
        "end_at": "2020-01-01T00:00:00Z",
    }
    with pytest.raises(ValidationError) as refused:
        ScheduleSpec.model_validate(raw)
    message = str(refused.value)
    for problem in ("jitter: a duration is at most 30 days", "cron: ", "timezone: ", "end_at:"):
        assert problem in message, message
    for zone in ("posix/Europe/Paris", "right/UTC", "Factory"):
        with pytest.raises(ValidationError, match="not a canonical IANA zone"):
            ScheduleSpec.model_validate({"cron": "0 2 * * *", "timezone": zone})
    with pytest.raises(ValidationError) as refused:
        SchedulePolicy.model_validate({"catchup_window": "soon", "overlap": "allow"})
    assert "catchup_window: 'soon' is not a duration" in str(refused.value)


def test_several_spec_problems_are_reported_together() -> None:
    with pytest.raises(ValidationError) as raised:
        ScheduleSpec.model_validate(
            {"cron": "0 0 30 2 *", "timezone": "Nowhere/Town", "offset": "5m"}
        )
    text = str(raised.value)
    assert "never fires" in text
    assert "not an IANA time zone" in text
    assert "only an interval takes an offset" in text


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"catchup": "sometimes"}, "catchup"),
        ({"overlap": "queue"}, "overlap"),
        ({"catchup_window": "0s"}, "more than zero"),
        ({"catchup_window": "40d"}, "at most 30 days"),
        ({"max_catchup": 0}, "greater than or equal to 1"),
        ({"max_catchup": 1001}, "less than or equal to 1000"),
        ({"max_catchup": True}, "valid integer"),
        ({"max_catchup": "3"}, "valid integer"),
        ({"max_buffered": 0}, "greater than or equal to 1"),
        ({"retries": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_policies_are_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SchedulePolicy.model_validate(raw)


def test_specs_and_policies_are_frozen() -> None:
    spec = every("1h")
    with pytest.raises(ValidationError):
        spec.interval = "2h"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        SchedulePolicy().catchup = Catchup.ALL  # type: ignore[misc]
    assert spec == every("1h")
    assert hash(spec) == hash(every("1h"))


def test_outcomes_and_answers_are_closed_sets() -> None:
    assert [o.value for o in FireOutcome] == [
        "STARTED",
        "SKIPPED_OVERLAP",
        "SKIPPED_MISSED",
        "SKIPPED_PAUSED",
        "BUFFERED",
        "START_FAILED",
    ]
    assert [c.value for c in Catchup] == ["skip", "latest", "all"]
    assert [o.value for o in Overlap] == [
        "skip",
        "buffer_one",
        "buffer_all",
        "allow",
        "cancel_previous",
    ]


# --- cron fire times ---------------------------------------------------------------------------


def test_cron_in_utc() -> None:
    times = fire_times(cron("0 2 * * *"), utc(2030, 1, 1), 3)
    assert times == [utc(2030, 1, 1, 2), utc(2030, 1, 2, 2), utc(2030, 1, 3, 2)]
    assert all(t.tzinfo is UTC for t in times)


def test_fire_times_are_strictly_after() -> None:
    spec = cron("*/15 * * * *")
    assert fire_times(spec, utc(2030, 1, 1, 0, 15), 2) == [
        utc(2030, 1, 1, 0, 30),
        utc(2030, 1, 1, 0, 45),
    ]
    assert fire_times(spec, utc(2030, 1, 1, 0, 14, 59, 999999), 1) == [utc(2030, 1, 1, 0, 15)]


def test_after_may_be_given_in_any_offset() -> None:
    spec = cron("0 2 * * *")
    assert fire_times(spec, datetime(2030, 1, 1, 5, tzinfo=PARIS), 1) == [utc(2030, 1, 2, 2)]


def test_cron_follows_posix_day_rules_and_macros() -> None:
    # Day of month and day of week both restricted: either matches (POSIX).
    spec = cron("0 0 13 * fri")
    assert fire_times(spec, utc(2030, 9, 1), 3) == [
        utc(2030, 9, 6),
        utc(2030, 9, 13),
        utc(2030, 9, 20),
    ]
    assert fire_times(cron("@daily"), utc(2030, 1, 1, 5), 1) == [utc(2030, 1, 2)]
    assert fire_times(cron("@hourly"), utc(2030, 1, 1, 5, 1), 1) == [utc(2030, 1, 1, 6)]
    assert fire_times(cron("0 0 29 2 *"), utc(2030, 1, 1), 1) == [utc(2032, 2, 29)]


def test_cron_in_a_time_zone() -> None:
    spec = cron("0 2 * * *", "Europe/Paris")
    assert fire_times(spec, utc(2030, 1, 10), 1) == [utc(2030, 1, 10, 1)]  # CET
    assert fire_times(spec, utc(2030, 7, 9, 12), 1) == [utc(2030, 7, 10, 0)]  # CEST


def test_paris_spring_forward_daily_0230_fires_at_0300() -> None:
    # 2030-03-31: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
    times = fire_times(cron("30 2 * * *", "Europe/Paris"), utc(2030, 3, 29, 12), 4)
    assert local(times, PARIS) == [
        "2030-03-30T02:30+01:00",
        "2030-03-31T03:00+02:00",
        "2030-04-01T02:30+02:00",
        "2030-04-02T02:30+02:00",
    ]


def test_paris_fall_back_daily_0230_fires_once() -> None:
    # 2030-10-27: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice, fires once (the first).
    times = fire_times(cron("30 2 * * *", "Europe/Paris"), utc(2030, 10, 25, 12), 4)
    assert times == [
        utc(2030, 10, 26, 0, 30),
        utc(2030, 10, 27, 0, 30),
        utc(2030, 10, 28, 1, 30),
        utc(2030, 10, 29, 1, 30),
    ]
    assert local(times, PARIS)[1] == "2030-10-27T02:30+02:00"


def test_new_york_spring_forward_daily_0230_fires_at_0300() -> None:
    times = fire_times(cron("30 2 * * *", "America/New_York"), utc(2030, 3, 9, 12), 3)
    assert local(times, NEW_YORK) == [
        "2030-03-10T03:00-04:00",
        "2030-03-11T02:30-04:00",
        "2030-03-12T02:30-04:00",
    ]


def test_new_york_fall_back_daily_0130_fires_once() -> None:
    # 2030-11-03: 02:00 EDT goes back to 01:00 EST; 01:30 happens twice, fires once.
    times = fire_times(cron("30 1 * * *", "America/New_York"), utc(2030, 11, 2, 12), 3)
    assert times == [utc(2030, 11, 3, 5, 30), utc(2030, 11, 4, 6, 30), utc(2030, 11, 5, 6, 30)]


@pytest.mark.parametrize(
    ("zone", "after", "expected"),
    [
        (
            "Europe/Paris",
            utc(2030, 3, 30, 23),
            ["00:30+01:00", "01:30+01:00", "03:00+02:00", "03:30+02:00", "04:30+02:00"],
        ),
        (
            "Europe/Paris",
            utc(2030, 10, 26, 22),
            ["00:30+02:00", "01:30+02:00", "02:30+02:00", "03:30+01:00", "04:30+01:00"],
        ),
        (
            "America/New_York",
            utc(2030, 3, 10, 5),
            ["00:30-05:00", "01:30-05:00", "03:00-04:00", "03:30-04:00", "04:30-04:00"],
        ),
        (
            "America/New_York",
            utc(2030, 11, 3, 4),
            ["00:30-04:00", "01:30-04:00", "02:30-05:00", "03:30-05:00", "04:30-05:00"],
        ),
    ],
)
def test_hourly_cron_across_both_transitions(
    zone: str, after: datetime, expected: list[str]
) -> None:
    """Spring forward: 02:30 does not exist and fires at the next valid instant (03:00), then
    03:30. Fall back: the repeated half past fires once, so the next is an hour of wall clock
    (two of real time) later."""
    times = fire_times(cron("30 * * * *", zone), after, 5)
    assert [t[11:] for t in local(times, ZoneInfo(zone))] == expected


def test_times_in_a_gap_fire_once_at_its_end() -> None:
    times = fire_times(cron("*/20 * * * *", "Europe/Paris"), utc(2030, 3, 31, 0, 30), 4)
    assert local(times, PARIS) == [
        "2030-03-31T01:40+01:00",
        "2030-03-31T03:00+02:00",  # 02:00, 02:20 and 02:40 did not exist: one fire
        "2030-03-31T03:20+02:00",
        "2030-03-31T03:40+02:00",
    ]


def test_a_midnight_gap() -> None:
    # Chile moves from 00:00 to 01:00 on 2030-09-08: that day's midnight fires at 01:00.
    santiago = ZoneInfo("America/Santiago")
    times = fire_times(cron("0 0 * * *", "America/Santiago"), utc(2030, 9, 6, 12), 3)
    assert local(times, santiago) == [
        "2030-09-07T00:00-04:00",
        "2030-09-08T01:00-03:00",
        "2030-09-09T00:00-03:00",
    ]


def test_starting_inside_the_repeated_hour_does_not_fire_it_again() -> None:
    spec = cron("30 2 * * *", "Europe/Paris")
    # 01:10Z is 02:10 CET, the second pass of 02:xx: the 02:30 of that day fired at 00:30Z.
    assert fire_times(spec, utc(2030, 10, 27, 1, 10), 1) == [utc(2030, 10, 28, 1, 30)]
    assert fire_times(spec, utc(2030, 10, 27, 0, 29), 1) == [utc(2030, 10, 27, 0, 30)]
    assert fire_times(spec, utc(2030, 10, 27, 0, 30), 1) == [utc(2030, 10, 28, 1, 30)]
    spec = cron("30 1 * * *", "America/New_York")
    assert fire_times(spec, utc(2030, 11, 3, 6, 10), 1) == [utc(2030, 11, 4, 6, 30)]


def test_walking_back_agrees_with_walking_forward_across_transitions() -> None:
    for expression, zone, start in [
        ("30 * * * *", "Europe/Paris", utc(2030, 10, 26, 20)),
        ("*/20 * * * *", "Europe/Paris", utc(2030, 3, 30, 22)),
        ("30 1 * * *", "America/New_York", utc(2030, 10, 30)),
        ("*/10 * * * *", "America/New_York", utc(2030, 11, 3, 4)),
    ]:
        spec = cron(expression, zone)
        forward = fire_times(spec, start, 40)
        for moment in [*forward[4:], *(t + timedelta(minutes=7) for t in forward[3:-1])]:
            back = list(islice(nominal_times(spec).upto(moment), 4))
            assert back == sorted((t for t in forward if t <= moment), reverse=True)[:4]


class TestCroniterAlone:
    """What croniter 7 does with an aware start in a time zone, which schedules correct: if
    these change, croniter changed, and schedule_spec's DST notes need another look."""

    @staticmethod
    def aware(expression: str, start: datetime, n: int) -> list[datetime]:
        it = croniter(expression, start)
        return [it.get_next(datetime).astimezone(UTC) for _ in range(n)]

    def test_it_fires_a_repeated_daily_time_twice(self) -> None:
        times = self.aware("30 1 * * *", datetime(2030, 11, 2, 12, tzinfo=NEW_YORK), 2)
        assert times == [utc(2030, 11, 3, 5, 30), utc(2030, 11, 3, 6, 30)]
        ours = fire_times(cron("30 1 * * *", "America/New_York"), utc(2030, 11, 2, 16), 2)
        assert ours == [utc(2030, 11, 3, 5, 30), utc(2030, 11, 4, 6, 30)]

    def test_it_skips_a_missing_hourly_time_but_moves_a_missing_daily_time(self) -> None:
        hourly = self.aware("30 * * * *", datetime(2030, 3, 31, 1, 0, tzinfo=PARIS), 2)
        assert hourly == [utc(2030, 3, 31, 0, 30), utc(2030, 3, 31, 1, 30)]  # no 03:00
        daily = self.aware("30 2 * * *", datetime(2030, 3, 30, 12, tzinfo=PARIS), 1)
        assert daily == [utc(2030, 3, 31, 1)]  # 03:00 CEST, as our rule says

    def test_it_returns_the_second_pass_when_started_inside_it(self) -> None:
        start = utc(2030, 10, 27, 1, 10).astimezone(PARIS)
        assert self.aware("30 2 * * *", start, 1) == [utc(2030, 10, 27, 1, 30)]


# --- interval fire times -----------------------------------------------------------------------


def test_intervals_are_anchored_on_the_epoch() -> None:
    assert fire_times(every("15m"), utc(2030, 1, 1, 0, 7), 3) == [
        utc(2030, 1, 1, 0, 15),
        utc(2030, 1, 1, 0, 30),
        utc(2030, 1, 1, 0, 45),
    ]
    # 1h30m: epoch + k * 5400 s, whatever the day.
    times = fire_times(every("1h30m"), utc(2030, 1, 1), 3)
    assert all(int(t.timestamp()) % 5400 == 0 for t in times)
    assert times[1] - times[0] == timedelta(minutes=90)


def test_interval_offset() -> None:
    assert fire_times(every("1h", offset="15m"), utc(2030, 1, 1, 0, 15), 2) == [
        utc(2030, 1, 1, 1, 15),
        utc(2030, 1, 1, 2, 15),
    ]


def test_intervals_ignore_dst() -> None:
    spec = every("1h", timezone="Europe/Paris")
    times = fire_times(spec, utc(2030, 3, 30, 23, 30), 5)
    assert [b - a for a, b in pairwise(times)] == [timedelta(hours=1)] * 4
    assert local(times, PARIS)[:2] == ["2030-03-31T01:00+01:00", "2030-03-31T03:00+02:00"]


@pytest.mark.parametrize("spec", [every("1h"), cron("0 * * * *", "Europe/Paris")])
def test_start_at_and_end_at_bound_fire_times(spec: ScheduleSpec) -> None:
    bounded = spec.model_copy(update={"start_at": utc(2030, 1, 1, 3), "end_at": utc(2030, 1, 1, 6)})
    assert fire_times(bounded, utc(2030, 1, 1), 10) == [
        utc(2030, 1, 1, 3),  # start_at and end_at are included
        utc(2030, 1, 1, 4),
        utc(2030, 1, 1, 5),
        utc(2030, 1, 1, 6),
    ]
    assert fire_times(bounded, utc(2030, 1, 1, 6), 10) == []
    assert list(nominal_times(bounded).upto(utc(2031, 1, 1))) == [
        utc(2030, 1, 1, h) for h in (6, 5, 4, 3)
    ]


def test_start_at_between_interval_ticks() -> None:
    spec = every("1h", start_at=utc(2030, 1, 1, 3, 20))
    assert fire_times(spec, utc(2030, 1, 1), 1) == [utc(2030, 1, 1, 4)]


def test_fire_times_refuses_naive_times_and_huge_counts() -> None:
    with pytest.raises(ValueError, match="aware"):
        fire_times(every("1h"), datetime(2030, 1, 1), 1)
    with pytest.raises(ValueError, match="count"):
        fire_times(every("1h"), utc(2030, 1, 1), 10_001)
    assert fire_times(every("1h"), utc(2030, 1, 1), 0) == []


# --- jitter ------------------------------------------------------------------------------------


def test_jitter_is_deterministic_and_bounded() -> None:
    bound = timedelta(minutes=5)
    nominals = [utc(2030, 1, 1) + timedelta(minutes=i) for i in range(500)]
    first = [jitter_of("nightly", n, bound) for n in nominals]
    assert first == [jitter_of("nightly", n, bound) for n in nominals]
    assert all(timedelta(0) <= j < bound for j in first)
    # Spread over the bound, and not the same for another schedule.
    mean = sum(j.total_seconds() for j in first) / len(first)
    assert 120 < mean < 180
    assert max(first) > timedelta(minutes=4)
    assert min(first) < timedelta(minutes=1)
    other = [jitter_of("hourly", n, bound) for n in nominals]
    assert sum(a == b for a, b in zip(first, other, strict=True)) < 5
    assert jitter_of("x", nominals[0], timedelta(0)) == timedelta(0)


def test_due_at_adds_the_jitter() -> None:
    spec = every("1m", jitter="30s")
    for i in range(50):
        nominal = utc(2030, 1, 1) + timedelta(minutes=i)
        due = due_at(spec, "s", nominal)
        assert nominal <= due < nominal + timedelta(seconds=30)
        assert due == nominal + jitter_of("s", nominal, timedelta(seconds=30))
    assert due_at(every("1m"), "s", utc(2030, 1, 1)) == utc(2030, 1, 1)


def test_a_cron_jitter_never_passes_the_next_fire() -> None:
    spec = cron("* * * * *", jitter="10m")
    dues = [due_at(spec, "s", utc(2030, 1, 1) + timedelta(minutes=i)) for i in range(200)]
    for i, due in enumerate(dues):
        assert (
            utc(2030, 1, 1) + timedelta(minutes=i)
            <= due
            < utc(2030, 1, 1) + timedelta(minutes=i + 1)
        )


# --- plans -------------------------------------------------------------------------------------

HOURLY = every("1h")
POLICY = SchedulePolicy()


def outcomes(plan: Plan) -> list[tuple[str, str]]:
    return [
        (d.nominal_at.strftime("%H:%M"), "fire" if d.fire else str(d.outcome))
        for d in plan.decisions
    ]


def test_a_fire_on_time() -> None:
    plan = plan_due(HOURLY, POLICY, "s", utc(2030, 1, 1, 0), utc(2030, 1, 1, 1, 0, 30))
    assert outcomes(plan) == [("01:00", "fire")]
    (decision,) = plan.decisions
    assert not decision.catchup
    assert decision.lateness == timedelta(seconds=30)
    assert "on time" in decision.reason
    assert plan.fires == plan.decisions
    assert plan.last_nominal_at == utc(2030, 1, 1, 1)
    assert (plan.next_nominal_at, plan.next_due_at) == (utc(2030, 1, 1, 2), utc(2030, 1, 1, 2))


def test_nothing_due_yet() -> None:
    plan = plan_due(HOURLY, POLICY, "s", utc(2030, 1, 1, 0), utc(2030, 1, 1, 0, 59))
    assert plan.decisions == plan.skipped == ()
    assert plan.last_nominal_at == utc(2030, 1, 1, 0)
    assert plan.next_due_at == utc(2030, 1, 1, 1)


def test_a_new_schedule_fires_nothing_from_before_its_creation() -> None:
    created = utc(2030, 1, 1, 0, 40)
    plan = plan_due(HOURLY, POLICY, "s", created, created)
    assert plan.decisions == ()
    assert plan.next_due_at == utc(2030, 1, 1, 1)


@pytest.mark.parametrize(("late", "missed"), [(59, False), (60, False), (61, True), (3599, True)])
def test_the_lateness_tolerance(late: int, missed: bool) -> None:
    now = utc(2030, 1, 1, 1) + timedelta(seconds=late)
    skip = SchedulePolicy(catchup=Catchup.SKIP)
    plan = plan_due(HOURLY, skip, "s", utc(2030, 1, 1, 0), now)
    (decision,) = plan.decisions
    assert decision.fire is not missed
    assert decision.outcome is (FireOutcome.SKIPPED_MISSED if missed else None)
    wider = plan_due(HOURLY, skip, "s", utc(2030, 1, 1, 0), now, tolerance=timedelta(hours=1))
    assert wider.decisions[0].fire
    assert not wider.decisions[0].catchup


def test_catchup_skip() -> None:
    policy = SchedulePolicy(catchup=Catchup.SKIP)
    plan = plan_due(HOURLY, policy, "s", utc(2030, 1, 1, 0), utc(2030, 1, 1, 3, 10))
    assert outcomes(plan) == [
        ("01:00", "SKIPPED_MISSED"),
        ("02:00", "SKIPPED_MISSED"),
        ("03:00", "SKIPPED_MISSED"),
    ]
    assert all("catchup=skip" in d.reason for d in plan.decisions)
    assert plan.decisions[0].reason == (
        "missed while no scheduler ran (due 2030-01-01T01:00:00Z, now 2030-01-01T03:10:00Z); "
        "catchup=skip: none runs"
    )
    assert plan.last_nominal_at == utc(2030, 1, 1, 3)


def test_catchup_latest() -> None:
    plan = plan_due(HOURLY, POLICY, "s", utc(2030, 1, 1, 0), utc(2030, 1, 1, 3, 10))
    assert outcomes(plan) == [
        ("01:00", "SKIPPED_MISSED"),
        ("02:00", "SKIPPED_MISSED"),
        ("03:00", "fire"),
    ]
    assert plan.decisions[0].reason.endswith("catchup=latest runs only 2030-01-01T03:00:00Z")
    assert plan.decisions[2].catchup
    assert plan.decisions[2].lateness == timedelta(minutes=10)


def test_catchup_latest_gives_way_to_a_fire_on_time() -> None:
    plan = plan_due(HOURLY, POLICY, "s", utc(2030, 1, 1, 0), utc(2030, 1, 1, 3, 0, 20))
    assert outcomes(plan) == [
        ("01:00", "SKIPPED_MISSED"),
        ("02:00", "SKIPPED_MISSED"),
        ("03:00", "fire"),
    ]
    assert not plan.decisions[2].catchup
    assert "the fire on time at 2030-01-01T03:00:00Z runs instead" in plan.decisions[0].reason


def test_catchup_latest_runs_an_old_fire_too() -> None:
    daily = cron("0 2 * * *", "Europe/Paris")
    plan = plan_due(daily, POLICY, "s", utc(2030, 1, 1, 1), utc(2030, 1, 4, 9))
    assert [d.fire for d in plan.decisions] == [False, False, True]
    assert "2030-01-04T02:00:00+01:00 Europe/Paris" in plan.decisions[0].reason


def test_catchup_all_inside_the_window() -> None:
    policy = SchedulePolicy(catchup=Catchup.ALL)
    plan = plan_due(HOURLY, policy, "s", utc(2030, 1, 1, 0), utc(2030, 1, 1, 3, 10))
    assert outcomes(plan) == [("01:00", "fire"), ("02:00", "fire"), ("03:00", "fire")]
    assert [d.reason.split("; ")[-1] for d in plan.decisions] == [
        "catchup=all: catch-up 1 of 3, oldest first",
        "catchup=all: catch-up 2 of 3, oldest first",
        "catchup=all: catch-up 3 of 3, oldest first",
    ]


def test_catchup_all_only_inside_the_window() -> None:
    policy = SchedulePolicy(catchup=Catchup.ALL, catchup_window="3h30m")
    plan = plan_due(HOURLY, policy, "s", utc(2030, 1, 1, 0), utc(2030, 1, 1, 8, 0, 30))
    assert outcomes(plan) == [
        ("01:00", "SKIPPED_MISSED"),
        ("02:00", "SKIPPED_MISSED"),
        ("03:00", "SKIPPED_MISSED"),
        ("04:00", "SKIPPED_MISSED"),
        ("05:00", "fire"),
        ("06:00", "fire"),
        ("07:00", "fire"),
        ("08:00", "fire"),  # on time
    ]
    assert "outside the catch-up window (3h30m)" in plan.decisions[3].reason
    assert [d.catchup for d in plan.fires] == [True, True, True, False]


def test_catchup_all_at_most_max_catchup() -> None:
    policy = SchedulePolicy(catchup=Catchup.ALL, max_catchup=3)
    plan = plan_due(every("10m"), policy, "s", utc(2030, 1, 1, 0), utc(2030, 1, 1, 1, 5))
    assert [d.fire for d in plan.decisions] == [False, False, False, True, True, True]
    assert "only the 3 most recent in the window run (max_catchup)" in plan.decisions[0].reason
    assert [d.nominal_at for d in plan.fires] == [
        utc(2030, 1, 1, 0, 40),
        utc(2030, 1, 1, 0, 50),
        utc(2030, 1, 1, 1, 0),  # 5 minutes late: missed too
    ]


def test_jittered_fires_are_due_later() -> None:
    spec = every("1h", jitter="20m")
    nominal = utc(2030, 1, 1, 1)
    due = due_at(spec, "s", nominal)
    assert due > nominal
    before = plan_due(spec, POLICY, "s", utc(2030, 1, 1), due - timedelta(microseconds=1))
    assert before.decisions == ()
    assert (before.next_nominal_at, before.next_due_at) == (nominal, due)
    at = plan_due(spec, POLICY, "s", utc(2030, 1, 1), due)
    assert [(d.nominal_at, d.due_at, d.fire) for d in at.decisions] == [(nominal, due, True)]


def test_the_plan_stops_at_end_at() -> None:
    spec = every("1h", end_at=utc(2030, 1, 1, 2))
    plan = plan_due(spec, POLICY, "s", utc(2030, 1, 1), utc(2030, 1, 1, 5))
    assert [d.nominal_at for d in plan.decisions] == [utc(2030, 1, 1, 1), utc(2030, 1, 1, 2)]
    assert plan.next_due_at is None
    assert plan.next_nominal_at is None


def test_a_last_nominal_time_after_now_plans_nothing() -> None:
    plan = plan_due(HOURLY, POLICY, "s", utc(2030, 1, 1, 5), utc(2030, 1, 1, 3))
    assert plan.decisions == ()
    assert plan.last_nominal_at == utc(2030, 1, 1, 5)
    assert plan.next_due_at == utc(2030, 1, 1, 6)


def test_plans_refuse_naive_times_and_odd_parameters() -> None:
    with pytest.raises(ValueError, match="aware"):
        plan_due(HOURLY, POLICY, "s", datetime(2030, 1, 1), utc(2030, 1, 1))
    with pytest.raises(ValueError, match="aware"):
        plan_due(HOURLY, POLICY, "s", utc(2030, 1, 1), datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="tolerance"):
        plan_due(
            HOURLY, POLICY, "s", utc(2030, 1, 1), utc(2030, 1, 2), tolerance=timedelta(hours=2)
        )
    with pytest.raises(ValueError, match="detail"):
        plan_due(HOURLY, POLICY, "s", utc(2030, 1, 1), utc(2030, 1, 2), detail=0)


# --- a bounded ledger --------------------------------------------------------------------------


@pytest.mark.parametrize("catchup", list(Catchup))
def test_a_year_without_scheduler_every_second_is_bounded(catchup: Catchup) -> None:
    spec = every("1s", jitter="0.5s")
    policy = SchedulePolicy(catchup=catchup)
    last, now = utc(2029, 1, 1), utc(2030, 1, 1, 0, 0, 30)
    started = time.perf_counter()
    plan = plan_due(spec, policy, "busy", last, now)
    assert time.perf_counter() - started < 2
    # Every fire on time (the last 60 s or so) and the 100 most recent missed are listed.
    on_time = [d for d in plan.decisions if not d.catchup]
    assert 58 <= len(on_time) <= 61
    assert len(plan.decisions) == len(on_time) + 100
    (skipped,) = plan.skipped
    assert skipped.outcome is FireOutcome.SKIPPED_MISSED
    assert skipped.first_nominal_at == utc(2029, 1, 1, 0, 0, 1)
    assert skipped.last_nominal_at == plan.decisions[0].nominal_at - timedelta(seconds=1)
    total = 365 * 86_400 + 30 - (0 if plan.last_nominal_at == now else 1)
    assert skipped.count == total - len(plan.decisions)
    assert f"{skipped.count:,} fires missed while no scheduler ran" in skipped.reason
    assert plan.last_nominal_at >= now - timedelta(seconds=1)
    fires = len(plan.fires) - len(on_time)
    assert fires == {Catchup.SKIP: 0, Catchup.LATEST: 0, Catchup.ALL: 10}[catchup]


def test_a_year_without_scheduler_every_minute_is_bounded_and_says_so() -> None:
    spec = cron("* * * * *")
    started = time.perf_counter()
    plan = plan_due(spec, POLICY, "s", utc(2029, 1, 1), utc(2030, 1, 1, 0, 0, 30))
    assert time.perf_counter() - started < 5
    assert len(plan.decisions) == 101
    (skipped,) = plan.skipped
    assert skipped.count is None
    assert f"more than {COUNT_BUDGET:,} fires" in skipped.reason
    assert [d.nominal_at for d in plan.fires] == [utc(2030, 1, 1)]


def test_a_summarised_range_is_counted_when_it_is_small() -> None:
    plan = plan_due(every("1m"), POLICY, "s", utc(2030, 1, 1), utc(2030, 1, 1, 3), detail=10)
    (skipped,) = plan.skipped
    # 02:59 and 03:00 are on time, 02:49 to 02:58 the 10 most recent missed.
    assert (skipped.first_nominal_at, skipped.last_nominal_at) == (
        utc(2030, 1, 1, 0, 1),
        utc(2030, 1, 1, 2, 48),
    )
    assert skipped.count == 168
    assert [d.catchup for d in plan.decisions] == [True] * 10 + [False] * 2
    assert covered(every("1m"), plan) == expected_between(
        every("1m"), utc(2030, 1, 1), utc(2030, 1, 1, 3)
    )


def test_max_catchup_raises_the_listed_rows() -> None:
    policy = SchedulePolicy(catchup=Catchup.ALL, max_catchup=50)
    plan = plan_due(every("1m"), policy, "s", utc(2030, 1, 1), utc(2030, 1, 1, 3), detail=10)
    assert len([d for d in plan.decisions if d.catchup]) == 50
    assert len(plan.fires) == 52  # and the two on time
    assert "beyond the 50 most recent (max_catchup)" in plan.skipped[0].reason


# --- resume after a pause ----------------------------------------------------------------------


def resume(catchup: Catchup, **policy: Any) -> Plan:
    return plan_resume(
        HOURLY,
        SchedulePolicy(**policy),
        "s",
        utc(2030, 1, 1, 1),
        utc(2030, 1, 1, 1, 30),
        utc(2030, 1, 1, 5, 10),
        catchup,
    )


def test_resume_with_skip() -> None:
    plan = resume(Catchup.SKIP)
    assert outcomes(plan) == [(f"0{h}:00", "SKIPPED_PAUSED") for h in (2, 3, 4, 5)]
    assert plan.decisions[0].reason == (
        "due while paused (due 2030-01-01T02:00:00Z; paused 2030-01-01T01:30:00Z, resumed "
        "2030-01-01T05:10:00Z); resumed with catchup=skip: none runs"
    )
    assert plan.last_nominal_at == utc(2030, 1, 1, 5)
    assert plan.next_due_at == utc(2030, 1, 1, 6)


def test_resume_with_latest() -> None:
    plan = resume(Catchup.LATEST)
    assert outcomes(plan) == [
        ("02:00", "SKIPPED_PAUSED"),
        ("03:00", "SKIPPED_PAUSED"),
        ("04:00", "SKIPPED_PAUSED"),
        ("05:00", "fire"),
    ]


def test_resume_with_all() -> None:
    plan = resume(Catchup.ALL)
    assert [d.fire for d in plan.decisions] == [True] * 4
    assert all(d.catchup for d in plan.decisions)
    bounded = resume(Catchup.ALL, max_catchup=2)
    assert [d.fire for d in bounded.decisions] == [False, False, True, True]
    window = resume(Catchup.ALL, catchup_window="2h")
    assert [d.fire for d in window.decisions] == [False, False, True, True]
    assert "outside the catch-up window (2h)" in window.decisions[0].reason


def test_resume_a_fire_due_before_the_pause_was_missed() -> None:
    plan = plan_resume(
        HOURLY,
        POLICY,
        "s",
        utc(2030, 1, 1, 0),
        utc(2030, 1, 1, 1, 30),
        utc(2030, 1, 1, 3, 10),
        Catchup.SKIP,
    )
    assert outcomes(plan) == [
        ("01:00", "SKIPPED_MISSED"),
        ("02:00", "SKIPPED_PAUSED"),
        ("03:00", "SKIPPED_PAUSED"),
    ]


def test_a_long_pause_is_bounded_in_two_ranges() -> None:
    spec = every("1s")
    last, paused, now = utc(2030, 1, 1), utc(2030, 1, 2), utc(2030, 1, 9)
    plan = plan_resume(spec, POLICY, "s", last, paused, now, Catchup.LATEST, detail=5)
    missed, during = plan.skipped
    assert missed.outcome is FireOutcome.SKIPPED_MISSED
    assert (missed.first_nominal_at, missed.last_nominal_at) == (utc(2030, 1, 1, 0, 0, 1), paused)
    assert missed.count == 86_400
    assert during.outcome is FireOutcome.SKIPPED_PAUSED
    assert during.first_nominal_at == paused + timedelta(seconds=1)
    # The 10 most recent (max_catchup: more than detail) are listed.
    assert during.count == 7 * 86_400 - 10
    assert "due while paused" in during.reason
    assert [d.fire for d in plan.decisions] == [False] * 9 + [True]
    assert len(covered(spec, plan)) == 8 * 86_400


def test_resume_refuses_a_pause_after_now() -> None:
    with pytest.raises(ValueError, match="paused_at"):
        plan_resume(
            HOURLY, POLICY, "s", utc(2030, 1, 1), utc(2030, 1, 2), utc(2030, 1, 1), Catchup.ALL
        )


# --- overlap -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlap", "running", "buffered", "action", "outcome"),
    [
        (Overlap.SKIP, 0, 0, OverlapAction.START, FireOutcome.STARTED),
        (Overlap.SKIP, 1, 0, OverlapAction.SKIP, FireOutcome.SKIPPED_OVERLAP),
        (Overlap.BUFFER_ONE, 0, 0, OverlapAction.START, FireOutcome.STARTED),
        (Overlap.BUFFER_ONE, 1, 0, OverlapAction.BUFFER, FireOutcome.BUFFERED),
        (Overlap.BUFFER_ONE, 1, 1, OverlapAction.SKIP, FireOutcome.SKIPPED_OVERLAP),
        (Overlap.BUFFER_ONE, 0, 1, OverlapAction.SKIP, FireOutcome.SKIPPED_OVERLAP),
        (Overlap.BUFFER_ALL, 0, 0, OverlapAction.START, FireOutcome.STARTED),
        (Overlap.BUFFER_ALL, 1, 0, OverlapAction.BUFFER, FireOutcome.BUFFERED),
        (Overlap.BUFFER_ALL, 1, 99, OverlapAction.BUFFER, FireOutcome.BUFFERED),
        (Overlap.BUFFER_ALL, 1, 100, OverlapAction.SKIP, FireOutcome.SKIPPED_OVERLAP),
        (Overlap.BUFFER_ALL, 0, 3, OverlapAction.BUFFER, FireOutcome.BUFFERED),
        (Overlap.ALLOW, 0, 0, OverlapAction.START, FireOutcome.STARTED),
        (Overlap.ALLOW, 7, 0, OverlapAction.START, FireOutcome.STARTED),
        (Overlap.CANCEL_PREVIOUS, 0, 0, OverlapAction.START, FireOutcome.STARTED),
        (Overlap.CANCEL_PREVIOUS, 2, 0, OverlapAction.CANCEL_PREVIOUS, FireOutcome.BUFFERED),
    ],
)
def test_overlap_policies(
    overlap: Overlap, running: int, buffered: int, action: OverlapAction, outcome: FireOutcome
) -> None:
    decision = overlap_decision(overlap, running, buffered, 100)
    assert (decision.action, decision.outcome) == (action, outcome)
    assert decision.reason
    assert not decision.replaces_buffered


def test_overlap_reasons() -> None:
    assert overlap_decision(Overlap.SKIP, 1, 0).reason == (
        "overlap=skip: an earlier run is active (1 running, 0 held)"
    )
    assert "the buffer is full (5 held)" in overlap_decision(Overlap.BUFFER_ALL, 1, 5, 5).reason
    assert "held, 3 of at most 5" in overlap_decision(Overlap.BUFFER_ALL, 1, 2, 5).reason
    assert "one fire is held already" in overlap_decision(Overlap.BUFFER_ONE, 1, 1).reason
    assert "beside the active runs" in overlap_decision(Overlap.ALLOW, 2, 0).reason


def test_cancel_previous_replaces_a_fire_already_waiting() -> None:
    waiting = overlap_decision(Overlap.CANCEL_PREVIOUS, 1, 1)
    assert waiting.action is OverlapAction.CANCEL_PREVIOUS
    assert waiting.replaces_buffered
    ended = overlap_decision(Overlap.CANCEL_PREVIOUS, 0, 1)
    assert (ended.action, ended.replaces_buffered) == (OverlapAction.START, True)
    assert "the 1 running cancelled; starts when they ended" in waiting.reason


def test_overlap_takes_the_policy_as_text_and_refuses_negative_counts() -> None:
    assert overlap_decision("skip", 1, 0).action is OverlapAction.SKIP  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        overlap_decision(Overlap.SKIP, -1, 0)
    with pytest.raises(ValueError, match="max_buffered"):
        overlap_decision(Overlap.BUFFER_ALL, 1, 0, 0)


# --- backfill ----------------------------------------------------------------------------------


def test_backfill_covers_from_included_until_excluded() -> None:
    times = plan_backfill(HOURLY, utc(2030, 1, 1, 0), utc(2030, 1, 1, 5))
    assert times == tuple(utc(2030, 1, 1, h) for h in range(5))
    assert plan_backfill(HOURLY, utc(2030, 1, 1, 0), utc(2030, 1, 1, 5)) == times
    assert plan_backfill(HOURLY, utc(2030, 1, 1, 0, 1), utc(2030, 1, 1, 1)) == ()


def test_backfill_honours_the_spec() -> None:
    spec = cron("30 2 * * *", "Europe/Paris", start_at=utc(2030, 3, 30, 12))
    assert plan_backfill(spec, utc(2030, 3, 28), utc(2030, 4, 1)) == (
        utc(2030, 3, 31, 1),  # 03:00 CEST, the spring-forward day's 02:30
    )


@pytest.mark.parametrize(
    ("spec", "until", "count", "shown"),
    [
        (cron("* * * * *"), utc(2030, 1, 3), 2880, "2,880"),
        (every("1s"), utc(2031, 1, 1), 365 * 86_400, "31,536,000"),
        (cron("* * * * *"), utc(2030, 2, 1), None, "more than 10,000"),
    ],
)
def test_backfill_is_bounded(
    spec: ScheduleSpec, until: datetime, count: int | None, shown: str
) -> None:
    with pytest.raises(BackfillTooLarge) as raised:
        plan_backfill(spec, utc(2030, 1, 1), until)
    assert raised.value.count == count
    assert f"covers {shown} fire times: at most 1,000 in one backfill" in str(raised.value)


def test_backfill_limit_is_exact() -> None:
    assert (
        len(plan_backfill(every("1m"), utc(2030, 1, 1), utc(2030, 1, 1) + timedelta(minutes=1000)))
        == 1000
    )
    with pytest.raises(BackfillTooLarge):
        plan_backfill(every("1m"), utc(2030, 1, 1), utc(2030, 1, 1) + timedelta(minutes=1001))


def test_backfill_refuses_an_empty_or_naive_range() -> None:
    with pytest.raises(ValueError, match="until"):
        plan_backfill(HOURLY, utc(2030, 1, 2), utc(2030, 1, 1))
    with pytest.raises(ValueError, match="aware"):
        plan_backfill(HOURLY, datetime(2030, 1, 1), utc(2030, 1, 2))


# --- properties --------------------------------------------------------------------------------

ZONES = ["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "America/Santiago"]
CRONS = ["*/7 * * * *", "30 * * * *", "0 2 * * *", "30 1 * * *", "15 2 * * 0", "*/20 1-3 * * *"]
# Moments around the 2030 transitions of those zones, and ordinary ones.
AROUND = [
    utc(2030, 3, 31, 0),
    utc(2030, 10, 26, 23),
    utc(2030, 3, 10, 6),
    utc(2030, 11, 3, 5),
    utc(2030, 4, 6, 14),
    utc(2030, 10, 5, 15),
    utc(2030, 9, 8, 3),
    utc(2030, 4, 7, 2),
    utc(2030, 6, 1),
]


@st.composite
def moments(draw: st.DrawFn) -> datetime:
    base = draw(st.sampled_from(AROUND))
    return base + timedelta(seconds=draw(st.integers(-6 * 3600, 6 * 3600)))


@st.composite
def specs(draw: st.DrawFn) -> ScheduleSpec:
    if draw(st.booleans()):
        return cron(draw(st.sampled_from(CRONS)), draw(st.sampled_from(ZONES)))
    interval = draw(st.sampled_from([1, 7, 60, 600, 3600, 5400]))
    offset = draw(st.integers(0, interval - 1))
    jitter = draw(st.sampled_from([0, interval // 2]))
    return every(f"{interval}s", offset=f"{offset}s", jitter=f"{jitter}s")


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(spec=specs(), after=moments())
def test_fire_times_are_strictly_increasing_and_start_anywhere(
    spec: ScheduleSpec, after: datetime
) -> None:
    times = fire_times(spec, after, 30)
    assert times and times[0] > after
    assert all(a < b for a, b in pairwise(times))
    # Starting from any moment in between gives the same times from there on.
    for i in (3, 10, 20):
        middle = times[i] - timedelta(seconds=1)
        assert fire_times(spec, middle, 5) == times[i : i + 5]
        assert fire_times(spec, times[i], 5) == times[i + 1 : i + 6]
    # And walking back finds them too.
    assert list(islice(nominal_times(spec).upto(times[-1]), 30)) == times[::-1]


@SETTINGS
@given(
    spec=specs(),
    start=moments(),
    gap=st.integers(0, 8 * 3600),
    catchup=st.sampled_from(list(Catchup)),
    detail=st.integers(1, 6),
    max_catchup=st.integers(1, 4),
)
def test_a_plan_decides_each_nominal_time_exactly_once(
    spec: ScheduleSpec,
    start: datetime,
    gap: int,
    catchup: Catchup,
    detail: int,
    max_catchup: int,
) -> None:
    policy = SchedulePolicy(catchup=catchup, max_catchup=max_catchup, catchup_window="2h")
    now = start + timedelta(seconds=gap)
    plan = plan_due(spec, policy, "p", start, now, detail=detail)
    times = covered(spec, plan)
    assert times == expected_between(spec, start, plan.last_nominal_at)
    assert len(set(times)) == len(times)
    # Everything due is decided; what is not decided is not due.
    assert all(d.due_at <= now for d in plan.decisions)
    if plan.next_nominal_at is not None:
        assert plan.next_nominal_at == nominal_times(spec).first_after(plan.last_nominal_at)
        assert plan.next_due_at is not None and plan.next_due_at > now
    # Bounded, and no more catch-ups than the policy allows.
    late = [d for d in plan.decisions if d.catchup]
    assert len(late) <= max(detail, max_catchup)
    fired_late = [d for d in late if d.fire]
    limit = {Catchup.SKIP: 0, Catchup.LATEST: 1, Catchup.ALL: max_catchup}[catchup]
    assert len(fired_late) <= limit
    assert all((d.outcome is None) == d.fire for d in plan.decisions)
    assert all(d.reason for d in plan.decisions)


@SETTINGS
@given(
    spec=specs(),
    start=moments(),
    first=st.integers(0, 4 * 3600),
    second=st.integers(0, 4 * 3600),
    detail=st.integers(1, 5),
)
def test_two_plans_in_a_row_cover_what_one_plan_covers(
    spec: ScheduleSpec, start: datetime, first: int, second: int, detail: int
) -> None:
    now1 = start + timedelta(seconds=first)
    now2 = now1 + timedelta(seconds=second)
    one = plan_due(spec, POLICY, "p", start, now1, detail=detail)
    two = plan_due(spec, POLICY, "p", one.last_nominal_at, now2, detail=detail)
    both = plan_due(spec, POLICY, "p", start, now2, detail=detail)
    assert covered(spec, one) + covered(spec, two) == covered(spec, both)
    assert (two.last_nominal_at, two.next_due_at) == (both.last_nominal_at, both.next_due_at)


@SETTINGS
@given(
    spec=specs(),
    start=moments(),
    pause=st.integers(0, 3 * 3600),
    length=st.integers(0, 6 * 3600),
    catchup=st.sampled_from(list(Catchup)),
    detail=st.integers(1, 4),
)
def test_a_resume_decides_each_nominal_time_exactly_once(
    spec: ScheduleSpec, start: datetime, pause: int, length: int, catchup: Catchup, detail: int
) -> None:
    paused = start + timedelta(seconds=pause)
    now = paused + timedelta(seconds=length)
    plan = plan_resume(spec, POLICY, "p", start, paused, now, catchup, detail=detail)
    times = covered(spec, plan)
    assert times == expected_between(spec, start, plan.last_nominal_at)
    for decision in plan.decisions:
        if not decision.fire:
            paused_kind = decision.due_at > paused
            expected = FireOutcome.SKIPPED_PAUSED if paused_kind else FireOutcome.SKIPPED_MISSED
            assert decision.outcome is expected
    assert len(plan.fires) <= {Catchup.SKIP: 0, Catchup.LATEST: 1, Catchup.ALL: 10}[catchup]
    for skipped in plan.skipped:
        assert skipped.first_nominal_at <= skipped.last_nominal_at


# --- docs/schedules.md -------------------------------------------------------------------------

DOCS = (Path(__file__).resolve().parents[2] / "docs" / "schedules.md").read_text(encoding="utf-8")


def test_the_documented_schedules_validate() -> None:
    blocks = re.findall(r"^<!-- schedule -->\n```json\n(.*?)^```", DOCS, re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 2
    for block in blocks:
        body = json.loads(block)
        assert set(body) == {"spec", "policy"}
        ScheduleSpec.model_validate(body["spec"])
        SchedulePolicy.model_validate(body["policy"])


def dst_rows() -> list[list[str]]:
    lines = DOCS.splitlines()
    start = lines.index("<!-- dst-examples -->")
    rows = []
    for line in lines[start + 3 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


@pytest.mark.parametrize("row", dst_rows(), ids=lambda row: f"{row[0]} {row[1]} {row[2]}")
def test_the_documented_dst_examples(row: list[str]) -> None:
    expression, zone, after, shown = row
    expected = [cell.strip().strip("`") for cell in shown.split(",")]
    spec = cron(expression.strip("`"), zone)
    start = datetime.fromisoformat(after.replace("Z", "+00:00"))
    times = fire_times(spec, start, len(expected))
    assert local(times, ZoneInfo(zone)) == expected


def test_the_documented_bounded_ledger_reason() -> None:
    plan = plan_due(every("1s"), POLICY, "s", utc(2029, 1, 1), utc(2030, 1, 1, 0, 0, 30))
    reason = " ".join(plan.skipped[0].reason.split())
    assert reason in " ".join(DOCS.replace("`", "").split())
