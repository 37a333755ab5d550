"""The admin service's settings: the shared `PACELINE_*` ones plus its port, its principals
(who may call it, each with a token of their own) and their groups.

The forms of `PACELINE_ADMIN_TOKENS` and `PACELINE_GROUPS` are described in `principals`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode, SettingsConfigDict

from paceline_admin.principals import (
    ADMIN,
    MIN_TOKEN_LENGTH,
    NamedToken,
    Principals,
    conflicts,
    parse_groups,
    read_tokens,
)
from paceline_infra.settings import Settings

__all__ = ["MAX_BODY_BYTES", "MIN_TOKEN_LENGTH", "AdminSettings"]

MAX_BODY_BYTES = 1024 * 1024
"""Requests with a larger body are refused with 413 before anything parses them."""

NONE_GIVEN = (
    "no token is given: set PACELINE_ADMIN_TOKEN (the principal `admin`), "
    "PACELINE_ADMIN_TOKENS (`name=token` pairs, or `@` and the path of a file of them), or both"
)


def _groups(value: Any) -> Any:
    return parse_groups(value) if isinstance(value, str) else value


class AdminSettings(Settings):
    # A validation error's text would show the value given: a token, or a file of them.
    model_config = SettingsConfigDict(hide_input_in_errors=True)

    admin_port: int = Field(default=8080, ge=1, le=65535)
    """The port the HTTP API listens on (all interfaces)."""
    admin_token: SecretStr | None = None
    """The token of the principal `admin`. This or `admin_tokens` is required: there is no
    safe default, so the service refuses to start with neither (`make run` generates this
    one when it is unset). Never logged."""
    admin_tokens: Annotated[tuple[NamedToken, ...], NoDecode] = Field(
        default=(), validate_default=True
    )
    """Other principals, each with its own token: `alice=<token>,bob=<token>`, `@<path>` (a
    file of `name=token` lines), or both. Never logged."""
    groups: Annotated[dict[str, tuple[str, ...]], NoDecode, BeforeValidator(_groups)] = Field(
        default_factory=dict, validate_default=True
    )
    """Groups of principals: `netops=alice,bob;leads=carol`."""

    _principals: Principals = PrivateAttr()

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"use at least {MIN_TOKEN_LENGTH} characters")
        return token

    @field_validator("admin_tokens", mode="before")
    @classmethod
    def _parsed_one_principal_per_name_and_token(cls, value: Any, info: ValidationInfo) -> Any:
        # Every problem at once, and here rather than in a model validator so that the message
        # names the setting. A PACELINE_ADMIN_TOKEN that is itself invalid (not in
        # `info.data`) has been reported already and takes no part.
        if isinstance(value, str):
            tokens, problems = read_tokens(value)
        elif isinstance(value, tuple | list) and all(isinstance(v, NamedToken) for v in value):
            tokens, problems = tuple(value), []
        else:
            return value  # not a form of ours: the type's own validation says so
        if "admin_token" in info.data:
            if info.data["admin_token"] is None and not tokens and not problems:
                raise ValueError(NONE_GIVEN)
            problems += conflicts(_admin(info.data["admin_token"]) + tokens)
        else:
            problems += conflicts(tokens)
        if problems:
            raise ValueError("; ".join(problems))
        return tokens

    @field_validator("groups")
    @classmethod
    def _members_are_principals(
        cls, groups: dict[str, tuple[str, ...]], info: ValidationInfo
    ) -> dict[str, tuple[str, ...]]:
        if groups and "admin_token" in info.data and "admin_tokens" in info.data:
            Principals(_admin(info.data["admin_token"]) + info.data["admin_tokens"], groups)
        return groups

    @model_validator(mode="after")
    def _build_principals(self) -> AdminSettings:
        self._principals = Principals(_admin(self.admin_token) + self.admin_tokens, self.groups)
        return self

    @property
    def principals(self) -> Principals:
        """Who may call the API (every token, `admin`'s included) and their groups."""
        return self._principals


def _admin(token: SecretStr | None) -> tuple[NamedToken, ...]:
    return () if token is None else (NamedToken(ADMIN, token, "PACELINE_ADMIN_TOKEN"),)
