"""Cancelling an instance.

The request is recorded in `cancel_requests` in one transaction with two outbox messages: the
`CancelInstance` command for the scheduler and the `InstanceCancelled` broadcast on the
cancellations stream, which every worker reads (they start nothing more of the instance and
stop what of it they run, without a round trip per activity). Both are published after the
commit. Then the answer waits, briefly, for the scheduler to record the cancel (CANCELLING or
CANCELLED): from then on it refuses every claim of the instance, so nothing of it starts after
the answer. Only one request per instance is recorded; a repeat, or the loser of two at the
same moment, answers as the first did.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from uuid import UUID

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from paceline_admin import instance_store, request_store, sending
from paceline_admin.instance_models import CancelAccepted, CancelInfo, WaitingActivity
from paceline_admin.problems import ApiError
from paceline_contracts.messages import CancelInstance, InstanceCancelled
from paceline_contracts.queues import Queue, Stream
from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_infra import db, outbox
from paceline_infra.amqp import Publisher
from paceline_infra.outbox import OutboxMessage
from paceline_infra.telemetry import in_instance

log = logging.getLogger(__name__)

DEFAULT_REASON: str = CancelInstance.model_fields["reason"].default
RECORD_WAIT_S = 3.0
"""How long the answer waits for the scheduler to record the cancel. Not recorded by then, it
answers anyway: the command is durable, and the scheduler applies it when it takes it."""
RECORD_POLL_S = 0.05
ENDED = (InstanceStatus.COMPLETED, InstanceStatus.FAILED)
"""Ended other than by a cancel: there is nothing to cancel."""


def recorded(status: InstanceStatus) -> bool:
    """Whether the scheduler has recorded a cancel (or the instance ended: nothing changes)."""
    return status is InstanceStatus.CANCELLING or status.is_final


def waiting_for(status: InstanceStatus, activities: dict[str, Any]) -> list[WaitingActivity]:
    """While CANCELLING: the running activities (granted to a worker before the cancel was
    recorded) that the cancel waits for; none otherwise."""
    if status is not InstanceStatus.CANCELLING:
        return []
    return [
        WaitingActivity(
            step=step,
            attempt=int(a.get("attempt") or 0),
            server=a.get("claimed_by") or a.get("server_id"),
        )
        for step, a in sorted(activities.items())
        if isinstance(a, dict) and a.get("status") == ActivityStatus.RUNNING
    ]


def _overtaken(instance_id: UUID, status: InstanceStatus, first: CancelInfo) -> ApiError:
    """The instance ended on its own before the scheduler could apply the cancel."""
    return ApiError(
        409,
        f"instance {instance_id} ended {status.value} before the cancel asked by {first.by} "
        f"at {first.requested_at.isoformat()} could be applied: nothing was cancelled",
        kind="instance-ended",
    )


def _info(row: Any) -> CancelInfo:
    return CancelInfo(by=row["by"], reason=row["reason"], requested_at=row["requested_at"])


def _engine_info(value: Any) -> CancelInfo | None:
    """The engine's record of a cancel (`InstanceState.cancel`), for one without a request."""
    if not isinstance(value, dict):
        return None
    try:
        return CancelInfo.model_validate(value)
    except ValueError:
        return None


def _ended(instance_id: UUID, status: InstanceStatus, target: Any) -> ApiError:
    when = f" at {target['finished_at'].isoformat()}" if target["finished_at"] else ""
    error = target["error"]
    why = (
        f" ({error.get('kind')}: {error.get('message')})"
        if status is InstanceStatus.FAILED and isinstance(error, dict)
        else ""
    )
    return ApiError(
        409,
        f"instance {instance_id} has already ended: {status.value}{when}{why}; there is nothing "
        "to cancel",
        kind="instance-ended",
    )


async def cancel_instance(
    pool: asyncpg.Pool,
    publisher: Publisher,
    connection: AbstractRobustConnection,
    instance_id: UUID,
    *,
    by: str,
    reason: str | None,
) -> CancelAccepted:
    target = await request_store.cancel_target(pool, instance_id)
    if target is None:
        raise ApiError(404, f"instance {instance_id} does not exist", kind="not-found")
    status = InstanceStatus(target["status"])
    if target["by"] is not None:
        # A repeat: answered as the first was, with the current status.
        if status in ENDED:
            raise _overtaken(instance_id, status, _info(target))
        return await _answer(pool, instance_id, status, _info(target))
    if status in ENDED:
        raise _ended(instance_id, status, target)
    if status in (InstanceStatus.CANCELLING, InstanceStatus.CANCELLED):
        # Cancelled without a request of ours (an older version): as the engine recorded it.
        return CancelAccepted(
            id=instance_id, status=status, cancel=_engine_info(target["engine_cancel"])
        )
    sending.require_broker(connection, "cancel")
    first = await _record(pool, publisher, instance_id, target["traceparent"], by, reason)
    return await _answer(pool, instance_id, status, first)


async def _record(
    pool: asyncpg.Pool,
    publisher: Publisher,
    instance_id: UUID,
    traceparent: str | None,
    by: str,
    reason: str | None,
) -> CancelInfo:
    """Record the request with its command and broadcast, and publish them; or, when another
    request was recorded first (it committed while this one waited), that one."""
    reason = reason or DEFAULT_REASON
    # In the instance's own trace, so that the cancel shows up in it.
    with in_instance(
        "cancel instance",
        traceparent,
        {"paceline.instance_id": str(instance_id), "paceline.by": by},
    ):
        async with pool.acquire() as conn, conn.transaction():
            row = await request_store.insert_cancel(conn, instance_id, by=by, reason=reason)
            if row is None:
                first = await request_store.cancel_request(conn, instance_id)
                assert first is not None  # it conflicted with a committed row
                return _info(first)
            messages = [
                OutboxMessage.of(
                    Queue.COMMANDS,
                    CancelInstance(instance_id=instance_id, reason=reason, by=by),
                ),
                OutboxMessage.of(
                    Stream.CANCELLATIONS,
                    InstanceCancelled(instance_id=instance_id, by=by, at=row["requested_at"]),
                ),
            ]
            await outbox.stage(conn, messages)
        await sending.flush(pool, publisher, messages, f"cancel of {instance_id}")
        log.info("cancel of %s requested by %s: %s", instance_id, by, reason)
    return _info(row)


async def _answer(
    pool: asyncpg.Pool, instance_id: UUID, status: InstanceStatus, first: CancelInfo
) -> CancelAccepted:
    status, activities = await _wait_recorded(pool, instance_id, status)
    if status in ENDED:
        raise _overtaken(instance_id, status, first)
    return CancelAccepted(
        id=instance_id,
        status=status,
        cancel=first,
        waiting_for=waiting_for(status, activities),
    )


async def _wait_recorded(
    pool: asyncpg.Pool, instance_id: UUID, status: InstanceStatus
) -> tuple[InstanceStatus, dict[str, Any]]:
    """The status (and activities) once the scheduler has recorded the cancel, or the last
    seen when it did not within RECORD_WAIT_S (or the database stopped answering: the request
    is committed)."""
    activities: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECORD_WAIT_S
    while True:
        try:
            current = await instance_store.status_and_activities(pool, instance_id)
        except db.UNAVAILABLE as exc:
            log.warning("cancel of %s: could not see it recorded: %r", instance_id, exc)
            break
        if current is not None:
            status, activities = InstanceStatus(current[0]), current[1]
        if recorded(status):
            break
        if loop.time() >= deadline:
            log.warning(
                "cancel of %s not recorded by the scheduler within %.1fs; answered anyway",
                instance_id,
                RECORD_WAIT_S,
            )
            break
        await asyncio.sleep(RECORD_POLL_S)
    return status, activities
