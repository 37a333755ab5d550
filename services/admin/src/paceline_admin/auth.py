"""Bearer-token authentication for every /v1 route: a request is the principal whose token it
carries (`PACELINE_ADMIN_TOKEN`'s is `admin`; `PACELINE_ADMIN_TOKENS` names the others).

The token given is compared in constant time with every configured token (`Principals`), and
never logged or echoed. Who a request is comes from its token only: what a mutating request
records as `by` (or `started_by`) is that principal's name, whatever headers or body say.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from paceline_admin.principals import Principals
from paceline_admin.problems import ApiError, Handler, error_response

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect"})

# auto_error=False: a missing header must get our own 401 problem, not FastAPI's error.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="`Authorization: Bearer <token>` on every /v1 request: a principal's token "
    "(`PACELINE_ADMIN_TOKEN`, the principal `admin`, or one of `PACELINE_ADMIN_TOKENS`). What a "
    "request does is recorded with that principal's name.",
)


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "send a principal's token as `Authorization: Bearer <token>`",
        kind="unauthorized",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _principal(request: Request, given: str | None) -> str | None:
    principals: Principals = request.app.state.settings.principals
    return principals.authenticate(given)


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The name of the principal whose token the request carries; 401 without one."""
    name = _principal(request, credentials.credentials if credentials is not None else None)
    if name is None:
        raise unauthorized()
    return name


Authorized = Annotated[str, Depends(require_token)]
"""A route parameter that enforces the token, documents it in OpenAPI and is the name of the
principal who asks (FastAPI computes it once a request, also when the router requires it)."""


def token_first(handler: Handler) -> Handler:
    """FastAPI decodes a JSON body before it runs dependencies, so a malformed body would be
    reported before the token is checked. Wrapped, the validation handler checks it first:
    nothing about a request is reported to a caller who may not make it."""

    async def checked(request: Request, exc: Exception) -> Response:
        scheme, given = get_authorization_scheme_param(request.headers.get("Authorization"))
        needs_token = request.url.path not in OPEN_PATHS
        if needs_token and not (
            scheme.lower() == "bearer" and _principal(request, given or None) is not None
        ):
            return error_response(unauthorized())
        return await handler(request, exc)

    return checked
