"""Errors as RFC 9457 problem details (`application/problem+json`), for every failure path.

The goal is that bad input always gets a 4xx with a detail a person can act on; the 500
handler is only the last line of defence and never shows internals.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from paceline_infra import db

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
Handler = Callable[[Request, Exception], Awaitable[Response]]
TYPE_PREFIX = "urn:paceline:problem:"
RETRY_SOON = {"Retry-After": "2"}
"""On a 503 for an outage (the database or the broker restarting): when to ask again."""


class ProblemItem(BaseModel):
    """One thing wrong with the request."""

    path: str = Field(description="Where: e.g. `steps[1].type`, `inputs.host`, `query.limit`.")
    message: str = Field(description="What is wrong there.")


class ProblemDetails(BaseModel):
    """An error (RFC 9457). `type` names the kind of problem; `detail` is for a person."""

    type: str = Field(description="`about:blank` or a `urn:paceline:problem:<kind>` URN.")
    title: str = Field(description="A short summary of the kind of problem.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What happened to this request.")
    errors: list[ProblemItem] | None = Field(
        default=None, description="Every problem found, when there can be several."
    )


class ApiError(Exception):
    """Raised by a route to answer with a problem."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        title: str | None = None,
        errors: Iterable[ProblemItem] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.title = title
        self.errors = list(errors)
        self.headers = dict(headers or {})


def problem_response(
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    title: str | None = None,
    errors: Sequence[ProblemItem] = (),
    headers: Mapping[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": f"{TYPE_PREFIX}{kind}" if kind else "about:blank",
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = [e.model_dump() for e in errors]
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=dict(headers or {})
    )


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route's error statuses (the media type is fixed up later)."""
    return {s: {"model": ProblemDetails, "description": _phrase(s)} for s in statuses}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _loc_path(loc: Sequence[Any]) -> str:
    """`("body", "steps", 0, "id")` -> `steps[0].id`; `("query", "limit")` -> `query.limit`."""
    parts = list(loc)
    prefix = ""
    if parts and parts[0] == "body":
        parts.pop(0)
    elif parts:
        prefix = f"{parts.pop(0)}."
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return prefix + text if text else (prefix.rstrip(".") or "body")


def validation_items(errors: Sequence[Any]) -> list[ProblemItem]:
    # Only location and message: pydantic's `input` could echo large or secret values.
    return [
        ProblemItem(path=_loc_path(e.get("loc", ())), message=str(e.get("msg", "invalid")))
        for e in errors
    ]


def summarize(items: Sequence[ProblemItem], what: str = "the request") -> str:
    shown = "; ".join(f"{i.path}: {i.message}" for i in items[:5])
    more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
    count = f"{len(items)} problem{'s' if len(items) != 1 else ''}"
    return f"{count} in {what}: {shown}{more}"


def error_response(exc: ApiError) -> Response:
    return problem_response(
        exc.status,
        exc.detail,
        kind=exc.kind,
        title=exc.title,
        errors=exc.errors,
        headers=exc.headers,
    )


async def _on_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


def body_too_large(max_bytes: int) -> Response:
    """The answer to a request whose body is over the limit (`body_limit`)."""
    return problem_response(
        413, f"the request body is larger than {max_bytes} bytes", kind="body-too-large"
    )


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on the request's path, as the router itself matches
    them (Starlette's own 405 names only those of the first route that matches the path)."""
    allowed = []
    for method in METHODS:
        probe = {
            "type": "http",
            "method": method,
            "path": request.scope["path"],
            "root_path": request.scope.get("root_path", ""),
        }
        if any(route.matches(probe)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 404 and detail == _phrase(404):
        detail = f"no route matches {request.method} {request.url.path}"
    elif exc.status_code == 405:
        allowed = allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        detail = f"{request.method} is not allowed on {request.url.path}: use {headers['Allow']}"
    elif exc.status_code == 413:  # the framework's limit, for a body counted as it arrives
        return body_too_large(request.app.max_body_size)
    elif exc.status_code == 400:  # FastAPI could not read a body as JSON (not UTF-8, say)
        cause = exc.__cause__
        why = f": {cause}" if cause is not None else ""
        return problem_response(400, f"the body is not valid JSON{why}", kind="malformed-body")
    return problem_response(exc.status_code, detail, headers=headers)


async def on_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if broken is not None:
        reason = (broken.get("ctx") or {}).get("error", "not JSON")
        position = broken.get("loc", ("body", "?"))[-1]
        return problem_response(
            400, f"the body is not valid JSON: {reason} (at {position})", kind="malformed-body"
        )
    items = validation_items(errors)
    return problem_response(
        422, summarize(items), kind="invalid-request", title="Invalid request", errors=items
    )


async def _on_database_unavailable(request: Request, exc: Exception) -> Response:
    # A restart or failover of PostgreSQL is an outage to wait out, not a bug: the client
    # retries (with an Idempotency-Key, a start is safe to retry).
    log.warning("database unavailable on %s %s: %r", request.method, request.url.path, exc)
    return problem_response(
        503,
        "the database is unavailable; try again shortly",
        kind="database-unavailable",
        headers=RETRY_SOON,
    )


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "an unexpected error; it has been logged")


def install(app: FastAPI, on_validation: Handler = on_validation_error) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    for unavailable in db.UNAVAILABLE:
        app.add_exception_handler(unavailable, _on_database_unavailable)
    app.add_exception_handler(Exception, _on_unexpected)
