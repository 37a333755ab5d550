"""The activities of an instance, from the engine's state document, for the API."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from paceline_admin.holders import Servers, holder_view
from paceline_admin.instance_models import ActivityView, CrashView, FlagView
from paceline_engine.definitions import DefinitionError, parse_definition

log = logging.getLogger(__name__)


def step_order(definition_body: Any) -> dict[str, int]:
    """Step id -> position in the definition, depth first. The state's `activities` object
    comes back from jsonb with its keys re-sorted (jsonb keeps no insertion order), so the
    dispatch order is gone; the definition's order is the stable one to show."""
    try:
        definition = parse_definition(definition_body)
    except (DefinitionError, RecursionError):
        log.warning("a stored definition no longer parses; activities shown unordered")
        return {}
    return {step.id: i for i, step in enumerate(definition.walk())}


def activity_views(
    instance_id: Any, activities: Mapping[str, Any], definition_body: Any, servers: Servers
) -> list[ActivityView]:
    """`activities` in their order, or in the definition's order when `definition_body` is
    given (for rows stored without a position). `servers`: the registry rows of the servers
    the flags name (`holders.lookup`)."""
    steps: list[str] = list(activities)
    if definition_body is not None:
        order = step_order(definition_body)
        steps.sort(key=lambda step: (order.get(step, len(order)), step))
    return [_view(instance_id, step, activities[step], servers) for step in steps]


def _view(instance_id: Any, step: str, state: Mapping[str, Any], servers: Servers) -> ActivityView:
    # Read as a tolerant reader: fields the engine may add later are ignored.
    return ActivityView(
        step=step,
        type=state.get("type", ""),
        status=state["status"],
        restartable=bool(state.get("restartable", False)),
        attempts=int(state.get("attempt", 0)),
        server=state.get("server_id"),
        started_at=state.get("started_at"),
        finished_at=state.get("finished_at"),
        output=state.get("output"),
        error=state.get("error"),
        reason=state.get("reason"),
        claimed_by=state.get("claimed_by"),
        interruptions=int(state.get("interruptions") or 0),
        isolated=bool(state.get("isolated", False)),
        crashes=_crashes(step, state.get("crashes")),
        flag=flag_view(instance_id, step, state, servers),
    )


def _crashes(step: str, crashes: Any) -> list[CrashView]:
    views: list[CrashView] = []
    for crash in crashes if isinstance(crashes, list) else ():
        try:
            views.append(CrashView.model_validate(crash))
        except ValidationError:
            log.warning("activity %s: a crash record that does not fit: %r", step, crash)
    return views


def flag_view(
    instance_id: Any, step: str, activity: Mapping[str, Any], servers: Servers
) -> FlagView | None:
    """The engine's `Flag` (with `server_id`) as the API shows it (with `server`), and the
    server that held the attempt as the registry shows it now."""
    flag = activity.get("flag")
    if not isinstance(flag, Mapping):
        return None
    return FlagView(
        kind=flag.get("kind", ""),
        reason=flag.get("reason", ""),
        attempt=int(flag.get("attempt", 0)),
        server=flag.get("server_id"),
        held_since=flag.get("held_since"),
        flagged_at=flag["flagged_at"],
        holder=holder_view(instance_id, step, activity, servers),
    )
