"""`GET /v1/instances/{id}/activities`: every activity of an instance, a page at a time.

`GET /v1/instances/{id}` embeds only the first `MAX_EMBEDDED_ACTIVITIES`; a process of
thousands of steps is read here, in definition order, filtered by status.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from paceline_admin import holders
from paceline_admin import instance_store as store
from paceline_admin.activities import activity_views
from paceline_admin.auth import require_token
from paceline_admin.filters import chosen, several_of
from paceline_admin.holders import LostAfter
from paceline_admin.instance_models import ActivityPage
from paceline_admin.instances import IdParam, not_found
from paceline_admin.paging import POSITION_CURSOR, Limit, cursor_parts, cursor_query, encode_cursor
from paceline_admin.problems import problem_responses
from paceline_admin.resources import Db
from paceline_contracts.states import ActivityStatus

StatusFilter = Annotated[
    list[Annotated[str, several_of(ActivityStatus)]] | None,
    Query(description="Only these statuses: repeat the parameter or separate them with commas."),
]

router = APIRouter(
    prefix="/v1/instances",
    tags=["instances"],
    dependencies=[Depends(require_token)],
    responses=problem_responses(401, 422, 500, 503),
)


def _after(cursor: str) -> tuple[int, str]:
    position, step = cursor_parts(cursor, 2)
    return int(position), step


@router.get(
    "/{instance_id}/activities", response_model=ActivityPage, responses=problem_responses(404)
)
async def list_activities(
    instance_id: IdParam,
    pool: Db,
    lost_after_s: LostAfter,
    limit: Limit = 100,
    cursor: Annotated[str | None, cursor_query(POSITION_CURSOR)] = None,
    status: StatusFilter = None,
) -> ActivityPage:
    """The instance's activities in definition order (activities stored before positions
    were recorded come last, by step id), optionally only those in the given statuses."""
    wanted = chosen(status, ActivityStatus, "status")
    after = _after(cursor) if cursor else None
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        if await store.current_status(conn, instance_id) is None:
            raise not_found(instance_id)
        rows = await store.activity_page(
            conn, instance_id, statuses=wanted, after=after, limit=limit + 1
        )
    shown = rows[:limit]
    activities = {r["step"]: r["state"] for r in shown}
    servers = await holders.lookup(
        pool,
        (a.get("flag") for a in activities.values() if isinstance(a, dict)),
        lost_after_s=lost_after_s,
    )
    last = shown[-1] if shown else None
    return ActivityPage(
        items=activity_views(instance_id, activities, None, servers),
        next_cursor=(
            encode_cursor(last["position"], last["step"])
            if last is not None and len(rows) > limit
            else None
        ),
    )
