"""Starting an instance: validate, record it PENDING with its start command in one
transaction (the outbox), then publish the command. An Idempotency-Key makes retries safe."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
from opentelemetry import trace
from opentelemetry.context import Context

from paceline_admin import definition_store, instance_store, sending
from paceline_admin.documents import as_json_document, digest
from paceline_admin.instance_models import StartedInstance, StartInstanceRequest
from paceline_admin.parsed import parsed
from paceline_admin.problems import ApiError, ProblemItem, summarize
from paceline_contracts.messages import StartInstance
from paceline_contracts.queues import Queue
from paceline_engine.definitions import DefinitionError, resolve_inputs
from paceline_engine.state import InstanceState
from paceline_infra import outbox
from paceline_infra.amqp import Publisher
from paceline_infra.outbox import OutboxMessage
from paceline_infra.telemetry import caller_links, inject, trace_id_hex, tracer

log = logging.getLogger(__name__)


def request_hash(definition: str, version: int, inputs: Any) -> str:
    """sha256 of the canonical JSON of what the request asks for, to tell a retry from a
    different request that reuses an Idempotency-Key."""
    return digest({"definition": definition, "version": version, "inputs": inputs})


def _replay(row: asyncpg.Record, request: StartInstanceRequest, inputs: Any) -> StartedInstance:
    # "Version as resolved": a retry that named no version matches the version its first
    # attempt resolved, even when a newer version was created in between.
    version = request.version if request.version is not None else row["version"]
    if row["request_hash"] != request_hash(request.definition, version, inputs):
        raise ApiError(
            422,
            "this Idempotency-Key was already used for a different request",
            kind="idempotency-key-reused",
            title="Idempotency-Key reused",
        )
    return StartedInstance(
        id=row["id"],
        status=row["status"],
        definition=row["definition"],
        version=row["version"],
        trace_id=row["trace_id"],
    )


async def _resolve(
    pool: asyncpg.Pool, request: StartInstanceRequest, problems: list[ProblemItem]
) -> tuple[int, dict[str, Any]]:
    """The version that runs and the inputs it starts with; 404 for an unknown definition,
    422 listing every problem with the inputs (`problems`: those found already)."""
    row = await definition_store.one_version(pool, request.definition, request.version)
    if row is None:
        what = f" version {request.version}" if request.version is not None else ""
        raise ApiError(
            404,
            f"definition {request.definition!r}{what} does not exist",
            kind="unknown-definition",
        )
    try:
        definition = await parsed(row["name"], row["version"], row["body"])
    except DefinitionError as exc:
        # Stored definitions were valid when created; the engine's rules may have changed.
        raise ApiError(
            409,
            f"definition {request.definition!r} version {row['version']} no longer "
            "validates; create a new version",
            kind="stale-definition",
            errors=_items(exc),
        ) from exc
    try:
        resolved = resolve_inputs(definition, request.inputs)
    except DefinitionError as exc:
        problems = problems + _items(exc)
    if problems:
        raise _invalid_inputs(problems)
    return row["version"], resolved


def _items(exc: DefinitionError) -> list[ProblemItem]:
    return [ProblemItem(path=p.path or "body", message=p.message) for p in exc.problems]


def _invalid_inputs(items: list[ProblemItem]) -> ApiError:
    return ApiError(
        422,
        summarize(items, "the inputs"),
        kind="invalid-inputs",
        title="Invalid inputs",
        errors=items,
    )


@contextmanager
def instance_root(
    instance_id: uuid.UUID, definition: str, version: int, started_by: str
) -> Iterator[trace.Span]:
    """The instance's root span: a fresh trace of its own (one per instance, whatever the
    caller sent), always recorded, linked to the caller's span. Every later span of the
    instance descends from it: its context is stored with the instance."""
    with tracer().start_as_current_span(
        f"instance {definition}",
        context=Context(),
        links=caller_links(),
        attributes={
            "paceline.instance_id": str(instance_id),
            "paceline.definition": definition,
            "paceline.version": version,
            "paceline.by": started_by,
        },
    ) as span:
        yield span


async def start_instance(
    pool: asyncpg.Pool,
    publisher: Publisher,
    request: StartInstanceRequest,
    *,
    started_by: str,
    idempotency_key: str | None,
) -> tuple[StartedInstance, bool]:
    """The instance, and whether it is the replay of an earlier request with the same key."""
    given, problems = as_json_document(request.inputs, "inputs")
    if idempotency_key is not None and not problems:
        existing = await instance_store.by_idempotency_key(pool, idempotency_key)
        if existing is not None:
            return _replay(existing, request, given), True
    version, resolved = await _resolve(pool, request, problems)

    instance_id = uuid.uuid4()
    with instance_root(instance_id, request.definition, version, started_by) as span:
        headers = inject()
        valid = span.get_span_context().is_valid  # not without a tracer provider
        command = OutboxMessage.of(Queue.COMMANDS, StartInstance(instance_id=instance_id))
        state = InstanceState(inputs=resolved).document()
        async with pool.acquire() as conn, conn.transaction():
            inserted = await instance_store.insert_pending(
                conn,
                instance_id=instance_id,
                definition=request.definition,
                version=version,
                state=state,
                trace_id=trace_id_hex(span) if valid else None,
                traceparent=headers.get("traceparent"),
                started_by=started_by,
                idempotency_key=idempotency_key,
                request_hash=request_hash(request.definition, version, given),
            )
            if inserted is not None:
                await outbox.stage(conn, [command])
        if inserted is None:
            # A concurrent request with the same key committed first: answer as its retry.
            assert idempotency_key is not None
            existing = await instance_store.by_idempotency_key(pool, idempotency_key)
            if existing is None:
                raise ApiError(
                    409,
                    "a concurrent request with this Idempotency-Key was undone; try again",
                    kind="conflict",
                )
            return _replay(existing, request, given), True
        await sending.flush(pool, publisher, [command], f"start command {command.id}")
    return StartedInstance(
        id=instance_id,
        status=inserted["status"],
        definition=inserted["definition"],
        version=inserted["version"],
        trace_id=inserted["trace_id"],
    ), False
