"""The server that held a flagged attempt, as the registry shows it now.

A flag raised while that server still heartbeats was not a crash: for a `redelivered` flag its
broker connection blipped, the broker gave its message to another worker, and the original
attempt may still be running there and finish (its late result resolves the flag by itself).
Retrying it then could run it twice, so `retry` asks for `"force": true`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Request
from pydantic import TypeAdapter, ValidationError

from paceline_admin import server_store
from paceline_admin.instance_models import HolderView
from paceline_contracts.states import ServerStatus
from paceline_engine.state import FlagKind

ALIVE_MARGIN = timedelta(seconds=1)
"""A heartbeat must arrive this long after the flag to count as a sign of life since it: the
flag's time is the scheduler's clock, the heartbeat's the database's."""
REPORTED_KINDS = frozenset({FlagKind.OUTCOME_UNKNOWN.value, FlagKind.DRAIN_DEADLINE.value})
"""Flags raised from the holder's own report that the attempt ended."""
_MOMENT = TypeAdapter(datetime)

Servers = Mapping[str, asyncpg.Record]
"""Registry rows (`server_store` view, LOST derived) by server id."""


def _lost_after_s(request: Request) -> float:
    lost_after_s: float = request.app.state.settings.server_lost_after_s
    return lost_after_s


LostAfter = Annotated[float, Depends(_lost_after_s)]
"""PACELINE_SERVER_LOST_AFTER_S: a server silent for longer is LOST."""


def holder_ids(flags: Iterable[Any]) -> list[str]:
    """The servers named by these flags (state documents' `flag` objects)."""
    ids = {f.get("server_id") for f in flags if isinstance(f, Mapping)}
    return sorted(i for i in ids if isinstance(i, str))


async def lookup(pool: asyncpg.Pool, flags: Iterable[Any], *, lost_after_s: float) -> Servers:
    return await server_store.some(pool, holder_ids(flags), lost_after_s=lost_after_s)


def _moment(value: Any) -> datetime | None:
    try:
        return _MOMENT.validate_python(value) if value is not None else None
    except ValidationError:
        return None


def _at(moment: datetime | None) -> str:
    return moment.isoformat(timespec="milliseconds") if moment else "an unknown time"


def _lists(row: asyncpg.Record, instance_id: str, step: str, attempt: int) -> bool:
    entries = row["in_flight"] if isinstance(row["in_flight"], list) else []
    return any(
        isinstance(e, Mapping)
        and str(e.get("instance_id")) == instance_id
        and e.get("step") == step
        and e.get("attempt") == attempt
        for e in entries
    )


def holder_view(
    instance_id: Any, step: str, activity: Mapping[str, Any], servers: Servers
) -> HolderView | None:
    """The holder of the activity's flag, or None when the flag names no server."""
    flag = activity.get("flag")
    if not isinstance(flag, Mapping) or not isinstance(flag.get("server_id"), str):
        return None
    server_id: str = flag["server_id"]
    attempt = int(flag.get("attempt") or activity.get("attempt") or 0)
    row = servers.get(server_id)
    if row is None:
        return HolderView(
            server_id=server_id,
            status=None,
            last_heartbeat=None,
            alive_since_flag=False,
            lists_attempt_in_flight=False,
            may_still_finish=False,
            note=f"{server_id} is not in the server registry (removed): nothing shows it alive "
            "since the flag",
        )
    status = ServerStatus(row["status"])
    last: datetime = row["last_heartbeat"]
    flagged_at = _moment(flag.get("flagged_at"))
    alive = (
        status not in (ServerStatus.LOST, ServerStatus.DRAINED)
        and flagged_at is not None
        and last > flagged_at + ALIVE_MARGIN
    )
    # The holder's own report of the attempt's end (a result) is where a flag of these kinds
    # comes from, and a reported end sets `finished_at`: then the attempt will not finish.
    reported = flag.get("kind") in REPORTED_KINDS or activity.get("finished_at") is not None
    listed = _lists(row, str(instance_id), step, attempt)
    return HolderView(
        server_id=server_id,
        status=status,
        last_heartbeat=last,
        alive_since_flag=alive,
        lists_attempt_in_flight=listed,
        # Alive is not enough: its heartbeats list what it still runs, and an attempt it no
        # longer lists (its claim was refused after the blip, say) will not finish there.
        may_still_finish=alive and not reported and listed,
        note=_note(server_id, status, last, flagged_at, alive, reported, listed, attempt),
    )


def _note(
    server_id: str,
    status: ServerStatus,
    last: datetime,
    flagged_at: datetime | None,
    alive: bool,
    reported: bool,
    listed: bool,
    attempt: int,
) -> str:
    if status is ServerStatus.LOST:
        return f"{server_id} is LOST: no heartbeat since {_at(last)} (it died, or is cut off)"
    if status is ServerStatus.DRAINED:
        return f"{server_id} has drained (last heartbeat at {_at(last)}): it runs nothing more"
    if not alive and flagged_at is not None and last > flagged_at:
        return (
            f"{server_id} is {status.value}; its last heartbeat (at {_at(last)}) came within "
            f"{ALIVE_MARGIN.total_seconds():g}s of the flag (at {_at(flagged_at)}), too close to "
            "tell from one sent before it; it shows LOST if it stays silent"
        )
    if not alive:
        return (
            f"{server_id} is {status.value} but has not heartbeated since the flag (at "
            f"{_at(flagged_at)}; its last heartbeat was at {_at(last)}); it shows LOST if it "
            "stays silent"
        )
    since = f"since the flag (at {_at(flagged_at)}; its last heartbeat at {_at(last)})"
    if reported:
        return (
            f"{server_id} has heartbeated {since}, and it reported the end of attempt {attempt} "
            "itself: the original attempt will not finish"
        )
    if not listed:
        return (
            f"{server_id} has heartbeated {since}: a broker connection blip, not a crash; but "
            f"it no longer runs attempt {attempt}, so the original attempt will not finish"
        )
    return (
        f"{server_id} has heartbeated {since}: a broker connection blip, not a crash; it "
        f"still runs attempt {attempt}, which may still finish"
    )
