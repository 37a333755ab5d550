"""The admin service's settings: the shared `PACELINE_*` ones plus its port and token."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from paceline_infra.settings import Settings

MAX_BODY_BYTES = 1024 * 1024
"""Requests with a larger body are refused with 413 before anything parses them."""

MIN_TOKEN_LENGTH = 16
"""A guessable token would guard nothing; `make run` generates a long random one."""


class AdminSettings(Settings):
    admin_port: int = Field(default=8080, ge=1, le=65535)
    """The port the HTTP API listens on (all interfaces)."""
    admin_token: SecretStr
    """The bearer token every /v1 request must carry. Required: there is no safe default, so
    the service refuses to start without one (`make run` generates one). Never logged."""

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, token: SecretStr) -> SecretStr:
        if len(token.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"use at least {MIN_TOKEN_LENGTH} characters")
        return token
