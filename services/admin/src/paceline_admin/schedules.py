"""Schedules (issue 11; docs/schedules.md): `POST|GET /v1/schedules`, `GET|PATCH|DELETE
/v1/schedules/{id}`, and `pause`, `resume`, `trigger`, `backfill` and the fire ledger (`fires`).

The admin API writes a schedule's row; any scheduler fires it when its `next_due_at` (the
database's clock) comes. Every time the API writes is the database's clock too. A created
schedule (or one whose spec changed) fires strictly after that moment: its `last_nominal_at`
is then. A pause clears `next_due_at` (no scheduler looks at it); a resume makes it due at once,
with the operator's catch-up answer, so the next scheduler round decides the fires of the pause
(`plan_resume`). A trigger or a backfill fires here, with the row locked
(`schedule_store.lock`), in one transaction: ledger rows, instances and their start commands
(`paceline_starts.firing`); the commands are published after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Body, Depends, Header, Path, Query, Response
from pydantic import ValidationError

from paceline_admin import schedule_admin_store as store
from paceline_admin import sending
from paceline_admin.auth import Authorized, require_token
from paceline_admin.documents import as_json_document, digest
from paceline_admin.filters import chosen, one_of, several_of
from paceline_admin.paging import (
    MAX_CURSOR_LENGTH,
    NAME_CURSOR,
    Limit,
    cursor_query,
    cursor_time,
    encode_cursor,
)
from paceline_admin.params import Text
from paceline_admin.problems import ApiError, ProblemItem, problem_responses, summarize
from paceline_admin.resources import Broker, BrokerConnection, Db
from paceline_admin.schedule_models import (
    MOMENT_DESCRIPTION,
    MOMENT_PATTERN,
    SCHEDULE_ID_PATTERN,
    BackfillRequest,
    BackfillResult,
    CreateScheduleRequest,
    FireCounts,
    FirePage,
    FireView,
    NextFire,
    PauseRequest,
    PlannedFire,
    ResumeRequest,
    SchedulePage,
    SchedulePolicyView,
    ScheduleSpecView,
    ScheduleSummary,
    ScheduleView,
    TriggerRequest,
    UpdateScheduleRequest,
    moment,
    policy_problems,
    spec_problems,
)
from paceline_engine.definitions import DefinitionError, resolve_inputs
from paceline_engine.schedule_spec import FireOutcome, SchedulePolicy, ScheduleSpec, fire_times
from paceline_engine.schedules import BackfillTooLarge, due_at, plan_backfill
from paceline_starts import firing, instances, schedule_store
from paceline_starts.schedule_store import Fire

log = logging.getLogger(__name__)

NEXT_FIRES = 5
"""A schedule's view shows this many of its next fire times."""
FIRE_CURSOR = r"^-?[0-9]{1,16}$"
"""The ledger, by nominal time: the last row's, in microseconds since 1970 (a backfill may
reach just before it, with an offset)."""

ScheduleId = Annotated[str, Path(description="The schedule's id.", pattern=SCHEDULE_ID_PATTERN)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[\x20-\x7e]+$",
        description="Makes retries safe: a retry with the same key and body answers with the "
        "schedule it created; the same key with another body is refused (422).",
    ),
]


class PausedFilter(StrEnum):
    TRUE = "true"
    FALSE = "false"


router = APIRouter(
    prefix="/v1/schedules",
    tags=["schedules"],
    dependencies=[Depends(require_token)],
    responses=problem_responses(401, 422, 500, 503),
)


# --- checks -----------------------------------------------------------------------------------


def not_found(schedule_id: str) -> ApiError:
    return ApiError(404, f"schedule {schedule_id!r} does not exist", kind="not-found")


def _invalid(problems: list[ProblemItem]) -> ApiError:
    return ApiError(
        422,
        summarize(problems, "the schedule"),
        kind="invalid-schedule",
        title="Invalid schedule",
        errors=problems,
    )


async def _check_definition(
    conn: asyncpg.Pool | asyncpg.Connection,
    definition: str,
    version: int | None,
    inputs: dict[str, Any],
    problems: list[ProblemItem],
) -> None:
    """404 for an unknown definition or version; 422 listing `problems` (those found already)
    and every problem of the inputs with the definition (the version named, or the latest)."""
    row = await instances.stored_definition(conn, definition, version)
    if row is None:
        what = f" version {version}" if version is not None else ""
        raise ApiError(
            404, f"definition {definition!r}{what} does not exist", kind="unknown-definition"
        )
    try:
        parsed = await instances.parsed(row["name"], row["version"], row["body"])
    except DefinitionError as exc:
        raise ApiError(
            409,
            f"definition {definition!r} version {row['version']} no longer validates; create "
            "a new version",
            kind="stale-definition",
            errors=[ProblemItem(path=p.path or "body", message=p.message) for p in exc.problems],
        ) from exc
    try:
        resolve_inputs(parsed, inputs if isinstance(inputs, dict) else {})
    except DefinitionError as exc:
        problems = problems + [
            ProblemItem(path=p.path or "inputs", message=p.message) for p in exc.problems
        ]
    if problems:
        raise _invalid(problems)


def _next_due(spec: ScheduleSpec, schedule_id: str, after: datetime) -> datetime | None:
    """When the first fire strictly after `after` is due; None when none is to come."""
    following = fire_times(spec, after, 1)
    return due_at(spec, schedule_id, following[0]) if following else None


def _stored(spec: ScheduleSpec | SchedulePolicy) -> dict[str, Any]:
    stored: dict[str, Any] = spec.model_dump(mode="json")
    return stored


def _timing(spec: ScheduleSpec) -> tuple[Any, ...]:
    """What the fire times and due instants depend on (`"15m"` and `900` are one interval)."""
    return (
        spec.cron,
        spec.interval_delta,
        spec.offset_delta,
        spec.timezone,
        spec.start_at,
        spec.end_at,
        spec.jitter_delta,
    )


# --- views ------------------------------------------------------------------------------------


def _engine_spec(schedule_id: str, raw: Any) -> ScheduleSpec | None:
    try:
        return ScheduleSpec.model_validate(raw)
    except ValidationError:
        log.warning("schedule %s: its stored spec no longer validates: %r", schedule_id, raw)
        return None


def _spec_view(schedule_id: str, raw: Any) -> ScheduleSpecView:
    spec = _engine_spec(schedule_id, raw)
    return ScheduleSpecView.model_validate(_stored(spec) if spec is not None else raw)


def _policy_view(raw: Any) -> SchedulePolicyView:
    with contextlib.suppress(ValidationError):
        raw = _stored(SchedulePolicy.model_validate(raw))
    return SchedulePolicyView.model_validate(raw)


def _summary(row: asyncpg.Record) -> ScheduleSummary:
    fields = {k: row[k] for k in ScheduleSummary.model_fields if k != "spec"}
    return ScheduleSummary(**fields, spec=_spec_view(row["id"], row["spec"]))


def fire_view(row: asyncpg.Record | Fire) -> FireView:
    if isinstance(row, Fire):
        return FireView(
            nominal_at=row.nominal_at,
            last_nominal_at=row.last_nominal_at,
            count=row.count,
            outcome=row.outcome,
            how=row.how,
            instance_id=row.instance_id,
            due_at=row.due_at,
            decided_at=row.decided_at,
            started_at=row.started_at,
            lateness_ms=row.lateness_ms,
            reason=row.reason,
        )
    return FireView(**dict(row))


async def _view(conn: asyncpg.Connection, schedule_id: str) -> ScheduleView:
    """The schedule as `GET /v1/schedules/{id}` shows it (in the caller's transaction)."""
    row = await store.one(conn, schedule_id)
    if row is None:
        raise not_found(schedule_id)
    now = await schedule_store.now(conn)
    spec = _engine_spec(schedule_id, row["spec"])
    upcoming: list[NextFire] = []
    if spec is not None:
        after = max(now, row["last_nominal_at"])
        upcoming = [
            NextFire(nominal_at=at, due_at=due_at(spec, schedule_id, at))
            for at in fire_times(spec, after, NEXT_FIRES)
        ]
    last = await store.last_fire(conn, schedule_id)
    counts, exact = await store.counts(conn, schedule_id)
    running, running_count = await store.running(conn, schedule_id)
    return ScheduleView(
        **_summary(row).model_dump(),
        inputs=row["inputs"],
        policy=_policy_view(row["policy"]),
        paused_at=row["paused_at"],
        pause_note=row["pause_note"],
        resume_catchup=row["resume_catchup"],
        next_fires=upcoming,
        last_fire=fire_view(last) if last is not None else None,
        counts=FireCounts(**counts),
        counts_exact=exact,
        running=running,
        running_count=running_count,
    )


# --- routes -----------------------------------------------------------------------------------


@router.post(
    "",
    status_code=201,
    response_model=ScheduleView,
    responses=problem_responses(400, 404, 409, 413),
)
async def create_schedule(
    body: CreateScheduleRequest,
    response: Response,
    principal: Authorized,
    pool: Db,
    idempotency_key: IdempotencyKey = None,
) -> ScheduleView:
    """Create a schedule; it fires strictly after this moment (the database's clock), unless
    created `paused`. The principal whose token the request carries is its `created_by`.

    404 for an unknown definition or version; 422 `invalid-schedule` listing every problem of
    the spec, the policy and the inputs (checked against the version named, or the latest);
    409 `schedule-exists` for an id taken. A retry with the same `Idempotency-Key` and body
    answers 201 with the schedule it created (`Idempotent-Replayed: true`)."""
    inputs, problems = as_json_document(body.inputs, "inputs")
    request_digest = None if problems else digest(body.model_dump(mode="json", by_alias=True))
    response.headers["Location"] = f"/v1/schedules/{body.id}"
    if idempotency_key is not None and request_digest is not None:
        existing = await store.by_key(pool, idempotency_key)
        if existing is not None:
            return await _replay(pool, existing, request_digest, response)
    spec, spec_issues = spec_problems(body.spec)
    policy, policy_issues = policy_problems(body.policy)
    problems += spec_issues + policy_issues
    await _check_definition(pool, body.definition, body.version, inputs, problems)
    assert spec is not None and policy is not None and request_digest is not None
    async with pool.acquire() as conn, conn.transaction():
        now = await schedule_store.now(conn)
        created = await store.insert(
            conn,
            schedule_id=body.id,
            definition=body.definition,
            version=body.version,
            inputs=inputs,
            spec=_stored(spec),
            policy=_stored(policy),
            note=body.note,
            paused=body.paused,
            now=now,
            next_due_at=_next_due(spec, body.id, now),
            created_by=principal,
            idempotency_key=idempotency_key,
            request_hash=request_digest,
        )
        view = await _view(conn, body.id) if created else None
    if view is None:
        # The id or the key is taken: by a retry with the same key that committed first (a
        # replay), or by another schedule.
        existing = await store.by_key(pool, idempotency_key) if idempotency_key else None
        if existing is None:
            raise ApiError(409, f"a schedule {body.id!r} exists already", kind="schedule-exists")
        return await _replay(pool, existing, request_digest, response)
    log.info("schedule %s created by %s (%s)", body.id, principal, body.definition)
    return view


async def _replay(
    pool: asyncpg.Pool, existing: asyncpg.Record, request_digest: str, response: Response
) -> ScheduleView:
    if existing["request_hash"] != request_digest:
        raise ApiError(
            422,
            "this Idempotency-Key was already used for a different schedule",
            kind="idempotency-key-reused",
            title="Idempotency-Key reused",
        )
    response.headers["Location"] = f"/v1/schedules/{existing['id']}"
    response.headers["Idempotent-Replayed"] = "true"
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        return await _view(conn, existing["id"])


@router.get("", response_model=SchedulePage)
async def list_schedules(
    pool: Db,
    limit: Limit = 50,
    cursor: Annotated[str | None, cursor_query(NAME_CURSOR)] = None,
    definition: Annotated[str | None, Query(description="Only this definition."), Text] = None,
    paused: Annotated[
        Annotated[str, one_of(PausedFilter)] | None,
        Query(description="Only paused (`true`) or only unpaused (`false`) schedules."),
    ] = None,
) -> SchedulePage:
    """Schedules by id, a page at a time."""
    wanted = chosen(paused, PausedFilter, "paused") if paused is not None else []
    rows = await store.page(
        pool,
        definition=definition,
        paused=(wanted[0] == PausedFilter.TRUE) if wanted else None,
        after=cursor,
        limit=limit + 1,
    )
    items = [_summary(r) for r in rows[:limit]]
    more = len(rows) > limit
    return SchedulePage(items=items, next_cursor=encode_cursor(items[-1].id) if more else None)


@router.get("/{schedule_id}", response_model=ScheduleView, responses=problem_responses(404))
async def get_schedule(schedule_id: ScheduleId, pool: Db) -> ScheduleView:
    """The schedule with its next 5 fire times, its last fire, its ledger's counts by outcome
    and its running instances."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        return await _view(conn, schedule_id)


@router.patch(
    "/{schedule_id}",
    response_model=ScheduleView,
    responses=problem_responses(400, 404, 409, 413),
)
async def update_schedule(
    schedule_id: ScheduleId, body: UpdateScheduleRequest, principal: Authorized, pool: Db
) -> ScheduleView:
    """Change the fields given (the others are kept), checked as a create's. A changed spec
    starts afresh: its first fire is the first after this moment (fire times of the former
    spec not decided yet are dropped)."""
    given = body.model_fields_set
    async with pool.acquire() as conn, conn.transaction():
        row = await store.one(conn, schedule_id, lock=True)
        if row is None:
            raise not_found(schedule_id)
        problems: list[ProblemItem] = []
        inputs = row["inputs"]
        if "inputs" in given:
            inputs, problems = as_json_document(body.inputs, "inputs")
        spec = _engine_spec(schedule_id, row["spec"])
        if body.spec is not None:
            spec, spec_issues = spec_problems(body.spec)
            problems += spec_issues
        policy_raw = row["policy"]
        if body.policy is not None:
            policy, policy_issues = policy_problems(body.policy)
            problems += policy_issues
            policy_raw = _stored(policy) if policy is not None else policy_raw
        definition = body.definition if body.definition is not None else row["definition"]
        version = body.version if "version" in given else row["version"]
        await _check_definition(conn, definition, version, inputs, problems)
        if spec is None:  # a stored spec the engine refuses now, and no new one
            raise _invalid([ProblemItem(path="spec", message="the stored one no longer fits")])
        now = await schedule_store.now(conn)
        last_nominal_at, next_due_at = row["last_nominal_at"], row["next_due_at"]
        paused_at, resume_catchup = row["paused_at"], row["resume_catchup"]
        before = _engine_spec(schedule_id, row["spec"])
        if before is None or _timing(spec) != _timing(before):
            last_nominal_at = now
            next_due_at = None if row["paused"] else _next_due(spec, schedule_id, now)
            if not row["paused"]:  # a resume not applied yet: nothing of its pause is left
                paused_at = resume_catchup = None
        await store.update(
            conn,
            schedule_id,
            definition=definition,
            version=version,
            inputs=inputs,
            spec=_stored(spec),
            policy=policy_raw,
            note=body.note if "note" in given else row["note"],
            last_nominal_at=last_nominal_at,
            next_due_at=next_due_at,
            paused_at=paused_at,
            resume_catchup=resume_catchup,
            now=now,
        )
        view = await _view(conn, schedule_id)
    log.info("schedule %s changed by %s (%s)", schedule_id, principal, ", ".join(sorted(given)))
    return view


@router.delete(
    "/{schedule_id}",
    status_code=204,
    responses={204: {"description": "Deleted, with its ledger."}, **problem_responses(404)},
)
async def delete_schedule(schedule_id: ScheduleId, principal: Authorized, pool: Db) -> Response:
    """Delete the schedule and its fire ledger. Its running instances keep running."""
    if not await store.delete(pool, schedule_id):
        raise not_found(schedule_id)
    log.info("schedule %s deleted by %s", schedule_id, principal)
    return Response(status_code=204)


@router.post(
    "/{schedule_id}/pause",
    response_model=ScheduleView,
    responses=problem_responses(400, 404, 413),
)
async def pause_schedule(
    schedule_id: ScheduleId,
    principal: Authorized,
    pool: Db,
    body: Annotated[PauseRequest | None, Body()] = None,
) -> ScheduleView:
    """Pause: nothing fires until a resume. Pausing a paused schedule keeps when its pause
    began (and replaces the note, when one is given)."""
    note = body.note if body is not None else None
    async with pool.acquire() as conn, conn.transaction():
        if await store.one(conn, schedule_id, lock=True) is None:
            raise not_found(schedule_id)
        await store.pause(conn, schedule_id, note, await schedule_store.now(conn))
        view = await _view(conn, schedule_id)
    log.info("schedule %s paused by %s", schedule_id, principal)
    return view


@router.post(
    "/{schedule_id}/resume",
    response_model=ScheduleView,
    responses=problem_responses(400, 404, 413),
)
async def resume_schedule(
    schedule_id: ScheduleId,
    principal: Authorized,
    pool: Db,
    body: Annotated[ResumeRequest | None, Body()] = None,
) -> ScheduleView:
    """Resume a paused schedule: the next scheduler round decides the fires due while it was
    paused with `catchup` (the policy's when omitted), and it fires on from then. A schedule
    that is not paused is left as it is."""
    async with pool.acquire() as conn, conn.transaction():
        row = await store.one(conn, schedule_id, lock=True)
        if row is None:
            raise not_found(schedule_id)
        if row["paused"]:
            catchup = body.catchup if body is not None else None
            if catchup is None:
                catchup = _policy_view(row["policy"]).catchup
            await store.resume(conn, schedule_id, catchup.value, await schedule_store.now(conn))
            log.info("schedule %s resumed by %s (catchup=%s)", schedule_id, principal, catchup)
        return await _view(conn, schedule_id)


@router.post(
    "/{schedule_id}/trigger",
    response_model=FireView,
    responses=problem_responses(400, 404, 413),
)
async def trigger_schedule(
    schedule_id: ScheduleId,
    principal: Authorized,
    pool: Db,
    publisher: Broker,
    connection: BrokerConnection,
    body: Annotated[TriggerRequest | None, Body()] = None,
) -> FireView:
    """One run now (also while paused), under the schedule's overlap policy (or `overlap`): its
    ledger row, nominal time now (the database's clock), `how: trigger`. The outcome is
    STARTED, BUFFERED, SKIPPED_OVERLAP or START_FAILED (with the reason). 503 when the broker
    is not connected (nothing was recorded: try again)."""
    sending.require_broker(connection, "trigger")
    async with pool.acquire() as conn, conn.transaction():
        schedule = await schedule_store.lock(conn, schedule_id)
        if schedule is None:
            raise not_found(schedule_id)
        now = await schedule_store.now(conn)
        written = await firing.fire_now(
            conn, schedule, now, body.overlap if body is not None else None
        )
    await sending.flush(pool, publisher, written.messages, f"trigger of schedule {schedule_id}")
    (fire,) = written.fires
    log.info(
        "schedule %s triggered by %s: %s%s",
        schedule_id,
        principal,
        fire.outcome.value,
        f" instance {fire.instance_id}" if fire.instance_id else "",
    )
    return fire_view(fire)


@router.post(
    "/{schedule_id}/backfill",
    response_model=BackfillResult,
    responses=problem_responses(400, 404, 413),
)
async def backfill_schedule(
    schedule_id: ScheduleId,
    body: BackfillRequest,
    principal: Authorized,
    pool: Db,
    publisher: Broker,
    connection: BrokerConnection,
) -> BackfillResult:
    """A run for each nominal fire time of the spec in [`from`, `until`) (at most 1,000),
    oldest first, under the schedule's overlap policy (or `overlap`). A nominal time that is
    STARTED or BUFFERED in the ledger is left alone, so a repeated backfill starts nothing
    twice; one skipped or failed gets its run. `dry_run` writes nothing and says what it would
    fire. 422 `invalid-backfill` when `until` is not after `from`, is after now (the
    database's clock), or the window holds more than 1,000 fire times."""
    start, until = moment(body.from_), moment(body.until)
    if not body.dry_run:
        sending.require_broker(connection, "backfill")
    async with pool.acquire() as conn, conn.transaction():
        schedule = await schedule_store.lock(conn, schedule_id)
        if schedule is None:
            raise not_found(schedule_id)
        now = await schedule_store.now(conn)
        problems = []
        if until <= start:
            problems.append(ProblemItem(path="until", message="not after `from`"))
        if until > now:
            problems.append(
                ProblemItem(path="until", message=f"after now ({now.isoformat()}): not yet due")
            )
        nominal: tuple[datetime, ...] = ()
        if not problems:
            try:
                nominal = await asyncio.to_thread(plan_backfill, schedule.spec, start, until)
            except BackfillTooLarge as exc:
                problems.append(ProblemItem(path="body", message=str(exc)))
        if problems:
            raise ApiError(
                422,
                summarize(problems, "the backfill"),
                kind="invalid-backfill",
                title="Invalid backfill",
                errors=problems,
            )
        known = await schedule_store.decided(conn, schedule_id, nominal)
        planned = [
            PlannedFire(
                nominal_at=at,
                outcome=known.get(at),
                would_start=known.get(at) not in (FireOutcome.STARTED, FireOutcome.BUFFERED),
            )
            for at in nominal
        ]
        if body.dry_run:
            return BackfillResult(dry_run=True, fires=[], planned=planned)
        written = await firing.backfill(conn, schedule, nominal, now, body.overlap)
    await sending.flush(pool, publisher, written.messages, f"backfill of schedule {schedule_id}")
    log.info(
        "schedule %s backfilled by %s from %s until %s: %d fired",
        schedule_id,
        principal,
        start.isoformat(),
        until.isoformat(),
        len(written.fires),
    )
    return BackfillResult(
        dry_run=False, fires=[fire_view(f) for f in written.fires], planned=planned
    )


@router.get("/{schedule_id}/fires", response_model=FirePage, responses=problem_responses(404))
async def list_fires(
    schedule_id: ScheduleId,
    pool: Db,
    limit: Limit = 50,
    cursor: Annotated[
        str | None,
        Query(
            pattern=FIRE_CURSOR,
            max_length=MAX_CURSOR_LENGTH,
            description="`next_cursor` of the previous page; omit for the first.",
        ),
    ] = None,
    since: Annotated[
        str | None,
        Query(
            pattern=MOMENT_PATTERN,
            description="Only rows of nominal times at or after this instant. "
            + MOMENT_DESCRIPTION,
        ),
    ] = None,
    until: Annotated[
        str | None,
        Query(
            pattern=MOMENT_PATTERN,
            description="Only rows of nominal times before this instant. " + MOMENT_DESCRIPTION,
        ),
    ] = None,
    outcome: Annotated[
        list[Annotated[str, several_of(FireOutcome)]] | None,
        Query(
            description="Only these outcomes: repeat the parameter or separate them with commas."
        ),
    ] = None,
) -> FirePage:
    """The fire ledger: one row per nominal fire time (older missed ones summarised as a
    range), by nominal time, oldest first. A range is listed when any of its fire times is
    in [`since`, `until`)."""
    outcomes = chosen(outcome, FireOutcome, "outcome")
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        if not await store.exists(conn, schedule_id):
            raise not_found(schedule_id)
        rows = await store.fires(
            conn,
            schedule_id,
            since=moment(since) if since else None,
            until=moment(until) if until else None,
            outcomes=outcomes,
            after=cursor_time(cursor) if cursor else None,
            limit=limit + 1,
        )
    items = [fire_view(r) for r in rows[:limit]]
    more = len(rows) > limit
    return FirePage(items=items, next_cursor=encode_cursor(items[-1].nominal_at) if more else None)
