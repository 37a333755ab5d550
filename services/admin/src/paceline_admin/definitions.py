"""Routes for process definitions: create (a new version each time), list and read."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, Field, TypeAdapter

from paceline_admin import definition_store as store
from paceline_admin.auth import require_token
from paceline_admin.documents import YAML_TYPES, as_json_document, parse_body
from paceline_admin.paging import NAME_CURSOR, Limit, cursor_query, encode_cursor
from paceline_admin.params import MAX_VERSION, Text
from paceline_admin.problems import ApiError, ProblemItem, problem_responses, summarize
from paceline_admin.resources import Db
from paceline_admin.schemas import beyond_the_parser, ref
from paceline_engine.definitions import LIMITS, DefinitionError, parse_definition

NameParam = Annotated[str, Path(description="The definition's name."), Text]
VersionParam = Annotated[int, Path(ge=1, le=MAX_VERSION)]
_TIMESTAMP = TypeAdapter(datetime)
"""Timestamps as the response models write them."""

router = APIRouter(
    prefix="/v1/definitions",
    tags=["definitions"],
    dependencies=[Depends(require_token)],
    responses=problem_responses(401, 422, 500, 503),
)


class DefinitionVersion(BaseModel):
    """One immutable version of a definition."""

    version: int = Field(description="1 for the first, then one more for each create.")
    created_at: datetime
    definition: dict[str, Any] = Field(description="The definition as it was sent (as JSON).")


class CreatedDefinition(BaseModel):
    """One version of a definition, with its name (what a create stored)."""

    name: str
    version: int
    created_at: datetime
    definition: dict[str, Any] = Field(description="The definition as it was sent (as JSON).")


class DefinitionSummary(BaseModel):
    """The latest version of one definition."""

    name: str
    version: int = Field(description="The latest version.")
    created_at: datetime = Field(description="When the latest version was created.")
    versions: int = Field(description="How many versions exist.")


class DefinitionPage(BaseModel):
    items: list[DefinitionSummary] = Field(description="By name.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last one."
    )


class DefinitionDetail(BaseModel):
    name: str
    latest: int = Field(description="The latest version number.")
    versions: list[DefinitionVersion] = Field(description="Every version, oldest first.")


def validate(raw: Any) -> tuple[Any, list[ProblemItem]]:
    """The body as a JSON document, and every problem that keeps it from being stored as a
    definition, the documented limits (`paceline_engine.definitions.LIMITS`) included. Linear
    in the body's size; CPU only, so the route runs it in a worker thread."""
    document, problems = as_json_document(raw)
    if problems:
        return document, problems
    try:
        try:
            parse_definition(document, limits=LIMITS)
        except TypeError:
            parse_definition(_types_as_text(document), limits=LIMITS)
    except DefinitionError as exc:
        problems = [ProblemItem(path=p.path or "body", message=p.message) for p in exc.problems]
    except RecursionError:  # only past the nesting that as_json_document lets through
        problems = [ProblemItem(path="steps", message="nested too deeply")]
    # The published schema's few rules the parser does not check; one problem a place.
    seen = {p.path for p in problems}
    problems += [
        ProblemItem(path=path, message=message)
        for path, message in beyond_the_parser(document)
        if path not in seen
    ]
    return document, problems


def _types_as_text(document: Any) -> Any:
    """The document with each step's `type` that is a list or an object written as JSON text.
    The engine's parser looks a type up in a set, which raises TypeError for those rather than
    reporting an unknown type; it reports the text instead (the path and the value shown)."""

    def steps(raw: Any) -> Any:
        return [step(s) for s in raw] if isinstance(raw, list) else raw

    def step(raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        fixed = dict(raw)
        if isinstance(raw.get("type"), list | dict):
            fixed["type"] = orjson.dumps(raw["type"]).decode()
        for key in ("then", "else"):
            if key in raw:
                fixed[key] = steps(raw[key])
        if isinstance(raw.get("parallel"), list):
            fixed["parallel"] = [steps(branch) for branch in raw["parallel"]]
        return fixed

    if not isinstance(document, dict):
        return document
    return {**document, "steps": steps(document.get("steps"))}


def _invalid(items: list[ProblemItem]) -> ApiError:
    return ApiError(
        422,
        summarize(items, "the definition"),
        kind="invalid-definition",
        title="Invalid definition",
        errors=items,
    )


_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "A process definition (docs/definitions.md) as JSON (also with no "
        "`Content-Type`, or any `+json` type), or as YAML of the same shape.",
        "content": {
            media: {"schema": ref("Definition")}
            for media in ("application/json", *sorted(YAML_TYPES))
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=CreatedDefinition,
    responses=problem_responses(400, 413, 415),
    openapi_extra=_BODY_DOC,
)
async def create_definition(request: Request, pool: Db) -> Response:
    """Validate and store a definition as the next version of its name. An invalid one, or one
    over a limit (steps, branches of a parallel step, nesting depth, expression length: see
    the README), is refused with 422 and every problem found in `errors`."""
    raw = await parse_body(await request.body(), request.headers.get("content-type"))
    # Off the event loop, so that the service keeps answering (/healthz, other requests) while
    # a large definition is checked. A thread suffices: validation is pure Python, which hands
    # the GIL to the loop's thread within the switch interval (5 ms). Measured on this 2-core
    # machine under uvicorn, /healthz polled every 10 ms during each POST (worst latency,
    # median of 3 POSTs), for 10,000 steps each reading the previous one's output (661 KiB,
    # validated in ~0.45 s): 564 ms on the loop, 106 ms in a thread (median 12 ms), 49 ms in
    # a ProcessPoolExecutor; for 10,000 plain noop steps: 200, 46 and 7 ms. A process pool
    # would also pickle the document both ways and add child processes to supervise and to
    # reap on a crash; for a 2-4x lower worst case, not worth it. A thread it is.
    document, problems = await asyncio.to_thread(validate, raw)
    if problems:
        raise _invalid(problems)
    row = await store.insert_next_version(pool, document["name"], document)
    # The document as sent, serialised by orjson: the model's own validation and
    # serialisation would walk the whole definition again on the loop, for nothing.
    body = {
        "name": row["name"],
        "version": row["version"],
        "created_at": _TIMESTAMP.dump_python(row["created_at"], mode="json"),
        "definition": document,
    }
    location = f"/v1/definitions/{row['name']}/versions/{row['version']}"
    return Response(
        orjson.dumps(body),
        status_code=201,
        media_type="application/json",
        headers={"Location": location},
    )


@router.get("", response_model=DefinitionPage)
async def list_definitions(
    pool: Db,
    limit: Limit = 50,
    cursor: Annotated[str | None, cursor_query(NAME_CURSOR)] = None,
) -> DefinitionPage:
    """The latest version of every definition, by name."""
    rows = await store.latest_page(pool, cursor, limit + 1)
    items = [DefinitionSummary(**dict(r)) for r in rows[:limit]]
    next_cursor = encode_cursor(items[-1].name) if len(rows) > limit else None
    return DefinitionPage(items=items, next_cursor=next_cursor)


def _not_found(name: str, version: int | None = None) -> ApiError:
    what = f"definition {name!r}" + (f" has no version {version}" if version else " does not exist")
    return ApiError(404, what, kind="not-found")


@router.get("/{name}", response_model=DefinitionDetail, responses=problem_responses(404))
async def get_definition(name: NameParam, pool: Db) -> DefinitionDetail:
    """A definition with all its versions."""
    rows = await store.all_versions(pool, name)
    if not rows:
        raise _not_found(name)
    versions = [
        DefinitionVersion(version=r["version"], created_at=r["created_at"], definition=r["body"])
        for r in rows
    ]
    return DefinitionDetail(name=name, latest=versions[-1].version, versions=versions)


@router.get(
    "/{name}/versions/{version}", response_model=CreatedDefinition, responses=problem_responses(404)
)
async def get_definition_version(
    name: NameParam, version: VersionParam, pool: Db
) -> CreatedDefinition:
    """One version of a definition."""
    row = await store.one_version(pool, name, version)
    if row is None:
        raise _not_found(name, version)
    return CreatedDefinition(
        name=name, version=row["version"], created_at=row["created_at"], definition=row["body"]
    )
