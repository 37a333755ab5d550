"""Request and response shapes of the schedule routes (they are the OpenAPI schemas).

A request's shape is what its schema says, no less: every field typed, every closed set an
`enum`, every time and duration a `pattern`. What a schema cannot say (a cron expression that
croniter reads and that some date matches, a zone the time-zone database has, an offset or a
jitter shorter than the interval, `end_at` not before `start_at`, a duration within 30 days,
inputs that fit the definition) the engine's rules check (`paceline_engine.schedule_spec`), and
each problem is listed in one 422 `invalid-schedule` (`spec_problems`, `policy_problems`).
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from paceline_admin.params import Text, Version, whole_number
from paceline_admin.problems import ProblemItem
from paceline_admin.schemas import refer
from paceline_engine.definitions import MAX_DURATION_S
from paceline_engine.schedule_spec import (
    Catchup,
    FireOutcome,
    Overlap,
    SchedulePolicy,
    ScheduleSpec,
)

SCHEDULE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A schedule's id: 1 to 128 letters, digits, `.`, `_` and `-`, starting with a letter or a
digit (it is part of URLs, and of `started_by`: `schedule:<id>`)."""

_YEAR = r"(?:19[7-9][0-9]|2[0-9]{3})"
_LEAP_YEAR = r"(?:19(?:7[26]|8[048]|9[26])|2[0-9](?:[02468][48]|[13579][26]|[2468]0)|2[048]00)"
_MONTH_DAY = (
    r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    r"|02-(?:0[1-9]|1[0-9]|2[0-8]))"
)
MOMENT_PATTERN = (
    rf"^(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
    r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
)
"""An instant as RFC 3339 writes it, with its offset (`2030-01-01T02:00:00Z`,
`2030-01-01T03:00:00+01:00`), from 1970 to 2999, at most to the microsecond: exactly the dates
that exist (February 29 of leap years only), so that every string of the pattern is an instant."""
MOMENT_DESCRIPTION = (
    "An instant with its offset, as RFC 3339 writes it: `2030-01-01T02:00:00Z` or "
    "`2030-01-01T03:00:00+01:00` (years 1970 to 2999, at most 6 decimals of a second)."
)

DURATION_PATTERN = r"^(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h)?|(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+)$"
"""A duration as text: a number of seconds, or parts with units (`90s`, `15m`, `1h30m`, `1d`)."""
CRON_PATTERN = r"^[A-Za-z0-9*?,/#@ -]{1,200}$"
"""The characters of a cron expression (fields separated by spaces; `@daily` and the like)."""
ZONE_PATTERN = r"^[A-Za-z0-9_+./-]{1,64}$"
"""The characters of an IANA zone name (`Europe/Paris`, `America/Port-au-Prince`, `Etc/GMT+5`)."""
NOTE_PATTERN = r"^[^\x00]*$"
MAX_NOTE = 1000


def _duration(minimum: float, *, exclusive: bool = False) -> tuple[PlainValidator, WithJsonSchema]:
    """A duration: a JSON number of seconds in range, or a text of DURATION_PATTERN (whose
    value the engine checks: at most 30 days). One type, so that a problem is at the field's
    path (a union would add the alternative's name to it)."""
    low = "exclusiveMinimum" if exclusive else "minimum"
    schema = {
        "anyOf": [
            {"type": "number", low: minimum, "maximum": MAX_DURATION_S},
            {"type": "string", "maxLength": 64, "pattern": DURATION_PATTERN},
        ]
    }

    def check(value: Any) -> float | str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
            above = seconds > minimum if exclusive else seconds >= minimum
            if not (math.isfinite(seconds) and above and seconds <= MAX_DURATION_S):
                bound = "more than" if exclusive else "at least"
                raise ValueError(f"{bound} {minimum:g} and at most {MAX_DURATION_S} seconds")
            return seconds
        if isinstance(value, str):
            if len(value) > 64 or not re.fullmatch(DURATION_PATTERN, value):
                raise ValueError("not a duration such as '90s', '15m', '1h30m' or '1d'")
            return value
        raise ValueError("a number of seconds, or a text such as '15m'")

    return PlainValidator(check), WithJsonSchema(schema)


Duration = Annotated[float | str, *_duration(0)]
IntervalDuration = Annotated[float | str, *_duration(1)]
PositiveDuration = Annotated[float | str, *_duration(0, exclusive=True)]
_DURATION = (
    " Seconds, or a text such as `90s`, `15m`, `1h30m`, `1d` (at most 30 days; "
    "docs/schedules.md#durations)."
)


Moment = Annotated[str, Field(pattern=MOMENT_PATTERN, description=MOMENT_DESCRIPTION)]
Note = Annotated[str, Field(max_length=MAX_NOTE, pattern=NOTE_PATTERN)]


def moment(text: str) -> datetime:
    """An instant of `MOMENT_PATTERN` (which only exact, existing instants fit)."""
    return datetime.fromisoformat(text)


_STRICT = ConfigDict(extra="forbid", strict=True)


class ScheduleSpecBody(BaseModel):
    """When a schedule fires: exactly one of `cron` and `interval` (docs/schedules.md#the-spec).
    Unknown fields are refused."""

    model_config = _STRICT

    cron: Annotated[str, Field(pattern=CRON_PATTERN)] | None = Field(
        default=None,
        description="A 5-field cron expression (minute hour day-of-month month day-of-week, "
        "`0 2 * * *`), or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`; matched in "
        "`timezone`. One that some date matches.",
    )
    interval: IntervalDuration | None = Field(
        default=None,
        description="Fire every this long (at least 1 s), at epoch + offset + k * interval "
        "(UTC)." + _DURATION,
    )
    offset: Duration | None = Field(
        default=None,
        description="With `interval` only: shifts its fire times; less than the interval."
        + _DURATION,
    )
    timezone: Annotated[str, Field(pattern=ZONE_PATTERN)] = Field(
        default="UTC",
        description="The IANA time zone the cron expression is read in (`Europe/Paris`).",
    )
    start_at: Moment | None = Field(default=None, description="No fire before this instant.")
    end_at: Moment | None = Field(
        default=None, description="No fire after this instant (not before `start_at`)."
    )
    jitter: Duration = Field(
        default="0s",
        description="Each fire is due up to this long after its nominal time (fixed per "
        "schedule and nominal time); less than the interval." + _DURATION,
    )


class SchedulePolicyBody(BaseModel):
    """What a schedule does with fires it missed and with runs that overlap
    (docs/schedules.md#the-policy). Unknown fields are refused."""

    model_config = _STRICT

    catchup: Catchup = Field(
        default=Catchup.LATEST,
        strict=False,
        description="Fires missed while no scheduler ran: `skip` (none runs), `latest` (one "
        "run, the most recent) or `all` (each in `catchup_window`, at most `max_catchup`).",
    )
    catchup_window: PositiveDuration = Field(
        default="6h",
        description="With `all`: only fires due at most this long ago run; more than zero."
        + _DURATION,
    )
    max_catchup: Annotated[int, Field(ge=1, le=1000), whole_number()] = Field(
        default=10, description="With `all`: at most this many missed fires run (1 to 1,000)."
    )
    overlap: Overlap = Field(
        default=Overlap.SKIP,
        strict=False,
        description="What a fire does while an earlier run is active: `skip`, `buffer_one`, "
        "`buffer_all`, `allow` or `cancel_previous` (docs/schedules.md#overlap).",
    )
    max_buffered: Annotated[int, Field(ge=1, le=10_000), whole_number()] = Field(
        default=100, description="With `buffer_all`: fires held at most (1 to 10,000)."
    )


_INPUTS = refer(
    "Inputs",
    "The inputs of each run, checked against the definition (the version named, or the "
    "latest); defaults are filled in at each fire.",
)


class CreateScheduleRequest(BaseModel):
    """A new schedule. Unknown fields are refused, and so is a value of another JSON type."""

    model_config = _STRICT

    id: str = Field(
        pattern=SCHEDULE_ID_PATTERN,
        description="The schedule's id, chosen by its author: 1 to 128 letters, digits, `.`, "
        "`_` and `-`, starting with a letter or a digit.",
    )
    definition: Annotated[str, Text] = Field(description="The definition each fire starts.")
    version: Version | None = Field(
        default=None, description="The version to run; null: the latest at each fire."
    )
    inputs: Annotated[dict[str, Any], _INPUTS] = Field(default_factory=dict)
    spec: ScheduleSpecBody = Field(description="When it fires.")
    policy: SchedulePolicyBody = Field(
        default_factory=SchedulePolicyBody,
        description="Catch-up and overlap; every field has a default.",
    )
    paused: bool = Field(default=False, description="Created paused: nothing fires until a resume.")
    note: Note | None = Field(default=None, description="Free text for people (who owns it).")


_NOT_NULL = ("definition", "inputs", "spec", "policy")


def _omit_rather_than_null(schema: dict[str, Any]) -> None:
    """A PATCH's `definition`, `inputs`, `spec` and `policy` are omitted to keep them, never
    null: their schema is the value's alone."""
    for name in _NOT_NULL:
        field = schema["properties"][name]
        alternatives = [a for a in field.pop("anyOf") if a.get("type") != "null"]
        field.pop("default", None)
        (only,) = alternatives
        field.update(only)


class UpdateScheduleRequest(BaseModel):
    """Changes to a schedule: each field given replaces the stored one, the others are kept.
    Unknown fields are refused (pause and resume have routes of their own)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_omit_rather_than_null)

    definition: Annotated[str, Text] | None = Field(
        default=None, description="The definition each fire starts."
    )
    version: Version | None = Field(
        default=None, description="The version to run; null: the latest at each fire."
    )
    inputs: Annotated[dict[str, Any], _INPUTS] | None = None
    spec: ScheduleSpecBody | None = Field(
        default=None,
        description="When it fires. A changed spec starts afresh: its first fire is the first "
        "after the change.",
    )
    policy: SchedulePolicyBody | None = Field(
        default=None, description="Catch-up and overlap, as a whole."
    )
    note: Note | None = Field(default=None, description="Free text for people; null clears it.")

    @field_validator(*_NOT_NULL, mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("omit the field to keep it; it cannot be null")
        return value


class PauseRequest(BaseModel):
    model_config = _STRICT

    note: Note | None = Field(default=None, description="Why it is paused, for people.")


class ResumeRequest(BaseModel):
    model_config = _STRICT

    catchup: Catchup | None = Field(
        default=None,
        strict=False,
        description="What to do with the fires due while it was paused (and any missed "
        "before): `skip`, `latest` or `all` (bounded by the policy's `catchup_window` and "
        "`max_catchup`). Null or omitted: the policy's `catchup`.",
    )


class TriggerRequest(BaseModel):
    model_config = _STRICT

    overlap: Overlap | None = Field(
        default=None,
        strict=False,
        description="How this run treats an active earlier run; null or omitted: the "
        "policy's `overlap`.",
    )


class BackfillRequest(BaseModel):
    """Runs for the schedule's nominal fire times in [`from`, `until`)."""

    model_config = _STRICT

    from_: Moment = Field(alias="from", description="The first instant of the window (included).")
    until: Moment = Field(
        description="The end of the window (excluded); not after now (the database's clock)."
    )
    overlap: Overlap | None = Field(
        default=None,
        strict=False,
        description="How the backfill's runs treat active runs; null or omitted: the policy's "
        "`overlap` (`allow` starts them all at once).",
    )
    dry_run: bool = Field(default=False, description="Only say what it would start.")


# --- engine checks ------------------------------------------------------------------------------


def _items(error: ValidationError, prefix: str, fields: set[str]) -> list[ProblemItem]:
    """The engine's problems at their paths: a field's own, or the model's (one message
    `field: problem; field: problem` for the rules that span fields)."""
    items: list[ProblemItem] = []
    for e in error.errors(include_url=False):
        message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        loc = [str(part) for part in e.get("loc", ()) if isinstance(part, str)]
        if loc and loc[0] in fields:
            items.append(ProblemItem(path=f"{prefix}.{loc[0]}", message=message))
            continue
        for part in message.split("; "):
            name, colon, rest = part.partition(": ")
            if colon and name in fields:
                items.append(ProblemItem(path=f"{prefix}.{name}", message=rest))
            else:
                items.append(ProblemItem(path=prefix, message=part))
    return items


def spec_problems(body: ScheduleSpecBody) -> tuple[ScheduleSpec | None, list[ProblemItem]]:
    """The engine's spec, or every problem the engine finds with it (at `spec.<field>`)."""
    raw = body.model_dump()
    for name in ("start_at", "end_at"):
        if raw[name] is not None:
            raw[name] = moment(raw[name])
    try:
        return ScheduleSpec.model_validate(raw), []
    except ValidationError as exc:
        return None, _items(exc, "spec", set(ScheduleSpec.model_fields))


def policy_problems(body: SchedulePolicyBody) -> tuple[SchedulePolicy | None, list[ProblemItem]]:
    try:
        return SchedulePolicy.model_validate(body.model_dump()), []
    except ValidationError as exc:
        return None, _items(exc, "policy", set(SchedulePolicy.model_fields))


# --- answers --------------------------------------------------------------------------------------


class ScheduleSpecView(BaseModel):
    """The spec as stored (every field, defaults included)."""

    cron: str | None
    interval: float | str | None
    offset: float | str | None
    timezone: str
    start_at: datetime | None
    end_at: datetime | None
    jitter: float | str


class SchedulePolicyView(BaseModel):
    """The policy as stored (every field, defaults included)."""

    catchup: Catchup
    catchup_window: float | str
    max_catchup: int
    overlap: Overlap
    max_buffered: int


class FireView(BaseModel):
    """One row of the fire ledger: a nominal fire time (or a range of them) and what became
    of it."""

    nominal_at: datetime = Field(description="The nominal fire time: the row's key.")
    last_nominal_at: datetime | None = Field(
        description="A range row (older missed fires summarised): the newest nominal time it "
        "covers; null for a row of one nominal time."
    )
    count: int | None = Field(
        description="A range row: how many fire times it covers (null: more than 10,000, not "
        "counted); null for a row of one."
    )
    outcome: FireOutcome = Field(
        description="STARTED, SKIPPED_OVERLAP, SKIPPED_MISSED, SKIPPED_PAUSED, BUFFERED "
        "(held until the active run ends) or START_FAILED."
    )
    how: str = Field(
        description="`schedule` (on time), `catchup` (missed while no scheduler ran), `resume` "
        "(due while paused), `trigger` or `backfill`."
    )
    instance_id: UUID | None = Field(description="The instance started for it.")
    due_at: datetime | None = Field(description="Its nominal time plus its jitter.")
    decided_at: datetime = Field(description="When it was decided (the database's clock).")
    started_at: datetime | None = Field(description="When its instance was created.")
    lateness_ms: int | None = Field(description="`started_at` - `due_at`, in milliseconds.")
    reason: str = Field(description="Why, for people.")


class NextFire(BaseModel):
    nominal_at: datetime
    due_at: datetime = Field(description="The nominal time plus its jitter.")


class FireCounts(BaseModel):
    """Nominal fire times in the ledger, by outcome (a range row counts each it covers)."""

    STARTED: int
    SKIPPED_OVERLAP: int
    SKIPPED_MISSED: int
    SKIPPED_PAUSED: int
    BUFFERED: int
    START_FAILED: int


class ScheduleSummary(BaseModel):
    """A schedule without its inputs, ledger and runs."""

    id: str
    definition: str
    version: int | None = Field(description="Null: the latest at each fire.")
    spec: ScheduleSpecView
    paused: bool
    note: str | None
    last_nominal_at: datetime = Field(
        description="The newest nominal time decided (at first, when it was created or its "
        "spec changed): the next fire comes after it."
    )
    next_due_at: datetime | None = Field(
        description="When a scheduler fires it next; null while paused, and when no fire is to "
        "come (past `end_at`)."
    )
    buffered: int = Field(description="Fires held (BUFFERED) until the active run ends.")
    created_by: str = Field(description="The principal who created it.")
    created_at: datetime
    updated_at: datetime
    revision: int = Field(description="1 when created; one more at each change through the API.")


class ScheduleView(ScheduleSummary):
    """A schedule with its next fire times, its last fire, its ledger's counts and its runs."""

    inputs: dict[str, Any]
    policy: SchedulePolicyView
    paused_at: datetime | None = Field(
        description="When the pause began; after a resume, until a scheduler has decided the "
        "fires of the pause."
    )
    pause_note: str | None
    resume_catchup: Catchup | None = Field(
        description="The answer of a resume that no scheduler has applied yet."
    )
    next_fires: list[NextFire] = Field(
        description="The next 5 nominal fire times (after now, or after the last decided); "
        "while paused, none of them fires unless it is resumed in time."
    )
    last_fire: FireView | None = Field(description="The ledger's newest row.")
    counts: FireCounts
    counts_exact: bool = Field(
        description="False when a range row holds more than 10,000 fire times, not counted: "
        "`counts` is then a lower bound."
    )
    running: list[UUID] = Field(
        description="Its instances that have not ended, oldest first (at most 100)."
    )
    running_count: int = Field(description="How many of its instances have not ended.")


class SchedulePage(BaseModel):
    items: list[ScheduleSummary] = Field(description="By id.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last one."
    )


class FirePage(BaseModel):
    items: list[FireView] = Field(description="By nominal time, oldest first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last one."
    )


class PlannedFire(BaseModel):
    """A nominal time of a backfill's window."""

    nominal_at: datetime
    outcome: FireOutcome | None = Field(
        description="What the ledger said of it before this backfill; null: nothing."
    )
    would_start: bool = Field(
        description="The backfill fires it (under its overlap policy): it had no ledger row, "
        "or a skipped or failed one. False for a STARTED or BUFFERED one, left alone."
    )


class BackfillResult(BaseModel):
    dry_run: bool
    fires: list[FireView] = Field(
        description="The ledger rows the backfill wrote, oldest first; none on a dry run."
    )
    planned: list[PlannedFire] = Field(
        description="Every nominal fire time of the window, oldest first, and whether the "
        "backfill fires it (on a dry run: would)."
    )
