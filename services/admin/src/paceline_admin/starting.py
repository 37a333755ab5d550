"""Starting an instance through the API: validate, record it PENDING with its start command in
one transaction (the outbox; paceline_starts.instances), then publish the command. An
Idempotency-Key makes retries safe."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from paceline_admin import instance_store, sending
from paceline_admin.documents import as_json_document, digest
from paceline_admin.instance_models import StartedInstance, StartInstanceRequest
from paceline_admin.problems import ApiError, ProblemItem, summarize
from paceline_engine.definitions import DefinitionError, resolve_inputs
from paceline_infra.amqp import Publisher
from paceline_starts import instances
from paceline_starts.instances import StartedHow

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
    row = await instances.stored_definition(pool, request.definition, request.version)
    if row is None:
        what = f" version {request.version}" if request.version is not None else ""
        raise ApiError(
            404,
            f"definition {request.definition!r}{what} does not exist",
            kind="unknown-definition",
        )
    try:
        definition = await instances.parsed(row["name"], row["version"], row["body"])
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

    async with pool.acquire() as conn, conn.transaction():
        staged = await instances.stage_instance(
            conn,
            definition=request.definition,
            version=version,
            inputs=resolved,
            started_by=started_by,
            started_how=StartedHow.API,
            idempotency_key=idempotency_key,
            request_hash=request_hash(request.definition, version, given),
        )
    if staged is None:
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
    await sending.flush(pool, publisher, [staged.command], f"start command {staged.command.id}")
    return StartedInstance(
        id=staged.id,
        status=staged.status,
        definition=staged.definition,
        version=staged.version,
        trace_id=staged.trace_id,
    ), False
