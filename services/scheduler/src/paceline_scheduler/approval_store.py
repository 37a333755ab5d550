"""The scheduler's writes of approvals (table `approvals`, migration 0007): created once per
attempt under a unique key, escalated, closed; and the lock a timeout takes before it may
decide (the admin API takes the same lock to record a decision)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

import asyncpg

from paceline_contracts.messages import ApprovalRequested
from paceline_contracts.queues import Stream
from paceline_engine.events import CloseApproval, CreateApproval, EscalateApproval
from paceline_infra.outbox import OutboxMessage

_IDS = uuid.UUID("5f0c3b9e-6a53-4d43-9a51-3a4f8f0e2c71")
"""Namespace of approval ids: an approval's id is derived from what makes it unique."""

ApprovalDecision = CreateApproval | EscalateApproval | CloseApproval


def approval_id(instance_id: UUID, step: str, attempt: int) -> UUID:
    """The id of the approval of this attempt (uuid5): the same in every replay."""
    return uuid.uuid5(_IDS, f"{instance_id}/{step}/{attempt}")


async def apply(
    conn: asyncpg.Connection,
    instance_id: UUID,
    definition: str,
    requester: str,
    decisions: Sequence[ApprovalDecision],
    now: datetime,
) -> list[OutboxMessage]:
    """Write the engine's approval decisions; the announcements to send (in the outbox)."""
    messages: list[OutboxMessage] = []
    for d in decisions:
        key = approval_id(instance_id, d.step, d.attempt)
        if isinstance(d, CreateApproval):
            await conn.execute(
                """
                INSERT INTO approvals (id, instance_id, step, attempt, definition, title,
                    details, approvers, required, forbid_requester, requester, choices, status,
                    due_at, created_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'PENDING', $13, $14)
                ON CONFLICT (instance_id, step, attempt) DO NOTHING
                """,
                key,
                instance_id,
                d.step,
                d.attempt,
                definition,
                d.title,
                d.details,
                d.approvers,
                d.required,
                d.forbid_requester,
                requester,
                d.choices,
                d.due_at,
                now,
            )
            announcement = ApprovalRequested(
                approval_id=key,
                instance_id=instance_id,
                definition=definition,
                step=d.step,
                attempt=d.attempt,
                title=d.title,
                approvers=d.approvers,
                required=d.required,
                choices=d.choices,
                due_at=d.due_at,
                requested_at=now,
            )
            messages.append(OutboxMessage.of(Stream.APPROVALS, announcement))
        elif isinstance(d, EscalateApproval):
            await conn.execute(
                "UPDATE approvals SET approvers = $2, escalation_level = $3"
                " WHERE id = $1 AND status = 'PENDING'",
                key,
                d.approvers,
                d.level,
            )
        else:
            # An admin's decision may have closed it already (DECIDED): it stays as it is.
            await conn.execute(
                "UPDATE approvals SET status = $2, decision = $3, decided_by = $4,"
                " decided_at = coalesce(decided_at, $5) WHERE id = $1 AND status = 'PENDING'",
                key,
                d.status,
                d.decision,
                d.decided_by,
                now,
            )
    return messages


async def timeout_may_decide(
    conn: asyncpg.Connection, instance_id: UUID, step: str, attempt: int
) -> bool:
    """Lock the approval and say whether it is still undecided. A decision the admin API
    recorded first (its command not applied yet) wins over the timeout: the timeout is then
    dropped, and the decision's command ends the approval."""
    status = await conn.fetchval(
        "SELECT status FROM approvals WHERE id = $1 FOR UPDATE",
        approval_id(instance_id, step, attempt),
    )
    return status in (None, "PENDING")
