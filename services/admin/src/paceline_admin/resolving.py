"""Resolving a flagged activity: an operator's decision, recorded once per flagged attempt.

The decision is recorded in `resolve_requests` (keyed by instance, step and attempt) in one
transaction with its `ResolveActivity` command in the outbox, and published after the commit.
Of two decisions at the same moment exactly one is recorded and sent; the other, and any later
one on the same attempt, is refused naming the first. A `retry` while the server that held the
attempt has been alive since the flag (the original may still finish) needs `"force": true`.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from paceline_admin import holders, request_store, sending, server_store
from paceline_admin.documents import as_json_document
from paceline_admin.instance_models import ResolveAccepted, ResolveRequest
from paceline_admin.problems import ApiError, summarize
from paceline_contracts.messages import ResolveActivity
from paceline_contracts.queues import Queue
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_infra import outbox
from paceline_infra.amqp import Publisher
from paceline_infra.outbox import OutboxMessage
from paceline_infra.telemetry import in_instance

log = logging.getLogger(__name__)


def _output(body: ResolveRequest) -> dict[str, Any] | None:
    """The output to send: only `skip` takes one (`{}` when omitted; `ResolveRequest` refuses
    it with another action), and it must be storable."""
    if body.action != "skip":
        return None
    output, problems = as_json_document(body.output, "output")
    if problems:
        raise ApiError(
            422,
            summarize(problems, "the output"),
            kind="invalid-output",
            title="Invalid output",
            errors=problems,
        )
    assert isinstance(output, dict)
    return output


def _decision(row: Any) -> str:
    forced = " (forced)" if row["forced"] else ""
    return (
        f"{row['by']} chose {row['action']}{forced} at "
        f"{row['requested_at'].isoformat(timespec='milliseconds')}"
    )


def _already(step: str, row: Any, now: str = "") -> ApiError:
    return ApiError(
        409,
        f"attempt {row['attempt']} of activity {step!r} was already resolved: "
        f"{_decision(row)}{now}",
        kind="already-resolved",
    )


async def _not_flagged(
    pool: asyncpg.Pool, instance_id: UUID, step: str, activity: dict[str, Any]
) -> ApiError:
    current, attempt = activity.get("status"), int(activity.get("attempt") or 0)
    earlier = await request_store.latest_resolve(pool, instance_id, step)
    # The decision that took it out of the flag: on this attempt (skip, fail), or a retry of
    # the one before.
    if earlier is not None and (
        earlier["attempt"] == attempt
        or (earlier["action"] == "retry" and earlier["attempt"] == attempt - 1)
    ):
        return _already(step, earlier, f"; it is now {current} at attempt {attempt}")
    return ApiError(
        409,
        f"activity {step!r} of instance {instance_id} is {current}, not flagged "
        f"({ActivityStatus.INTERRUPTED.value}): there is nothing to resolve",
        kind="not-flagged",
    )


async def resolve_activity(
    pool: asyncpg.Pool,
    publisher: Publisher,
    connection: AbstractRobustConnection,
    instance_id: UUID,
    step: str,
    body: ResolveRequest,
    *,
    by: str,
    lost_after_s: float,
) -> ResolveAccepted:
    output = _output(body)
    target = await request_store.resolve_target(pool, instance_id, step)
    if target is None:
        raise ApiError(404, f"instance {instance_id} does not exist", kind="not-found")
    activity = target["activity"]
    if not isinstance(activity, dict):
        raise ApiError(
            404,
            f"instance {instance_id} has no activity {step!r} (it is not an activity step, "
            "or it has not run yet)",
            kind="not-found",
        )
    status = InstanceStatus(target["status"])
    if status.is_final:
        raise ApiError(
            409, f"instance {instance_id} has already ended ({status.value})", kind="instance-ended"
        )
    if status is InstanceStatus.CANCELLING or target["cancel_by"] is not None:
        asked = (
            f" by {target['cancel_by']} at {target['cancel_requested_at'].isoformat()}"
            if target["cancel_by"] is not None
            else ""
        )
        raise ApiError(
            409,
            f"instance {instance_id} is being cancelled (cancel requested{asked}): its flagged "
            "activities are cancelled with it, there is nothing to resolve",
            kind="instance-cancelling",
        )
    if activity.get("status") != ActivityStatus.INTERRUPTED:
        raise await _not_flagged(pool, instance_id, step, activity)
    attempt = int(activity.get("attempt") or 0)
    earlier = await request_store.resolve_request(pool, instance_id, step, attempt)
    if earlier is not None:
        raise _already(step, earlier)
    if body.action == "retry" and not body.force:
        await _refuse_if_holder_alive(pool, instance_id, step, activity, lost_after_s)
    sending.require_broker(connection, "resolve")
    command = ResolveActivity(
        instance_id=instance_id,
        step=step,
        action=body.action,
        output=output,
        by=by,
        attempt=attempt,
        forced=body.force,
    )
    traceparent = target["traceparent"]
    # In the instance's own trace, so that the operator's decision shows up in it.
    with in_instance(
        "resolve activity",
        traceparent,
        {
            "paceline.instance_id": str(instance_id),
            "paceline.step": step,
            "paceline.action": body.action,
            "paceline.by": by,
        },
    ):
        message = OutboxMessage.of(Queue.COMMANDS, command)
        winner = None
        async with pool.acquire() as conn, conn.transaction():
            first = await request_store.insert_resolve(
                conn,
                instance_id,
                step,
                attempt,
                action=body.action,
                by=by,
                forced=body.force,
            )
            if first:
                await outbox.stage(conn, [message])
            else:
                winner = await request_store.resolve_request(conn, instance_id, step, attempt)
        if not first:
            if winner is None:  # the decision it conflicted with is gone (its instance too)
                raise ApiError(409, "a concurrent decision was undone; try again", kind="conflict")
            raise _already(step, winner)
        await sending.flush(pool, publisher, [message], f"resolve of {instance_id} {step}")
        log.info(
            "%s chose %s for attempt %d of %s of %s%s",
            by,
            body.action,
            attempt,
            step,
            instance_id,
            " (forced)" if body.force else "",
        )
    return ResolveAccepted(id=instance_id, step=step, action=body.action)


async def _refuse_if_holder_alive(
    pool: asyncpg.Pool,
    instance_id: UUID,
    step: str,
    activity: dict[str, Any],
    lost_after_s: float,
) -> None:
    flag = activity.get("flag")
    server_id = flag.get("server_id") if isinstance(flag, dict) else None
    if not isinstance(server_id, str):
        return
    row = await server_store.one(pool, server_id, lost_after_s=lost_after_s)
    servers = {server_id: row} if row is not None else {}
    holder = holders.holder_view(instance_id, step, activity, servers)
    if holder is not None and holder.may_still_finish:
        raise ApiError(
            409,
            f"{holder.note}. A retry now could run attempt {activity.get('attempt')} of "
            f"{step!r} twice: wait for its result (a late result resolves the flag by itself), "
            'or send "force": true to retry anyway',
            kind="holder-alive",
        )
