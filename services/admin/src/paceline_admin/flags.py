"""Activities that wait for an operator, across instances (resolve them under /v1/instances)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Query

from paceline_admin import holders
from paceline_admin import instance_store as store
from paceline_admin.activities import flag_view
from paceline_admin.auth import require_token
from paceline_admin.holders import LostAfter, Servers
from paceline_admin.instance_models import FlaggedActivity, FlagPage
from paceline_admin.paging import (
    FLAG_CURSOR,
    Limit,
    cursor_id,
    cursor_parts,
    cursor_query,
    cursor_time,
    encode_cursor,
)
from paceline_admin.params import Text
from paceline_admin.problems import problem_responses
from paceline_admin.resources import Db

router = APIRouter(
    prefix="/v1/flags",
    tags=["flags"],
    dependencies=[Depends(require_token)],
    responses=problem_responses(401, 422, 500, 503),
)


def _after(cursor: str) -> tuple[datetime, UUID, str]:
    at, instance_id, step = cursor_parts(cursor, 3)
    return cursor_time(at), cursor_id(instance_id), step


def _item(row: Any, servers: Servers) -> FlaggedActivity:
    activity: dict[str, Any] = row["activity"]
    return FlaggedActivity(
        instance_id=row["instance_id"],
        definition=row["definition"],
        version=row["version"],
        step=row["step"],
        type=activity.get("type", ""),
        attempt=int(activity.get("attempt", 0)),
        restartable=bool(activity.get("restartable", False)),
        flag=flag_view(row["instance_id"], row["step"], activity, servers),
        instance_url=f"/v1/instances/{row['instance_id']}",
    )


@router.get("", response_model=FlagPage)
async def list_flags(
    pool: Db,
    lost_after_s: LostAfter,
    limit: Limit = 50,
    cursor: Annotated[str | None, cursor_query(FLAG_CURSOR)] = None,
    definition: Annotated[str | None, Query(description="Only this definition."), Text] = None,
) -> FlagPage:
    """Every activity that waits for an operator: the INTERRUPTED activities of FLAGGED
    instances, oldest flag first, a page at a time, each with the server that held the attempt
    as the registry shows it now (`flag.holder`: whether it has been alive since the flag, so
    that the original attempt may still finish). Resolve one with
    `POST /v1/instances/{id}/activities/{step}/resolve`."""
    rows = await store.flag_page(
        pool,
        definition=definition,
        after=_after(cursor) if cursor else None,
        limit=limit + 1,
    )
    page = rows[:limit]
    servers = await holders.lookup(
        pool, (r["activity"].get("flag") for r in page), lost_after_s=lost_after_s
    )
    items = [_item(r, servers) for r in page]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last["flagged_at"], last["instance_id"], last["step"])
    return FlagPage(items=items, next_cursor=next_cursor)
