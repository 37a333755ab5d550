"""Bearer-token authentication for every /v1 route.

There is one token (PACELINE_ADMIN_TOKEN); its holder is called `admin-token`. The token is
compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from paceline_admin.problems import ApiError, Handler, error_response

SUBJECT = "admin-token"
"""Who a request with the token is, for `started_by` when the caller names no one."""
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect"})

# auto_error=False: a missing header must get our own 401 problem, not FastAPI's error.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="`Authorization: Bearer <PACELINE_ADMIN_TOKEN>` on every /v1 request.",
)


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "send the admin token as `Authorization: Bearer <token>`",
        kind="unauthorized",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _matches(request: Request, given: str | None) -> bool:
    expected: str = request.app.state.settings.admin_token.get_secret_value()
    # Bytes, not str: compare_digest refuses non-ASCII str, and a header may hold any latin-1.
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    if credentials is None or not _matches(request, credentials.credentials):
        raise unauthorized()
    return SUBJECT


Authorized = Annotated[str, Depends(require_token)]
"""A route parameter that both enforces the token and documents it in OpenAPI."""


def token_first(handler: Handler) -> Handler:
    """FastAPI decodes a JSON body before it runs dependencies, so a malformed body would be
    reported before the token is checked. Wrapped, the validation handler checks it first:
    nothing about a request is reported to a caller who may not make it."""

    async def checked(request: Request, exc: Exception) -> Response:
        scheme, given = get_authorization_scheme_param(request.headers.get("Authorization"))
        needs_token = request.url.path not in OPEN_PATHS
        if needs_token and not (scheme.lower() == "bearer" and _matches(request, given or None)):
            return error_response(unauthorized())
        return await handler(request, exc)

    return checked
