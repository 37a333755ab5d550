"""The CLI's settings: `PACELINE_URL`, `PACELINE_TOKEN`, `PACELINE_TIMEOUT_S` (pydantic-settings).

The token is a `SecretStr`: it is never printed, not even in a settings error."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from paceline_cli.errors import USAGE, CliError

DEFAULT_URL = "http://127.0.0.1:8080"


class CliSettings(BaseSettings):
    """Read from the environment; every other `PACELINE_*` variable is ignored."""

    model_config = SettingsConfigDict(env_prefix="PACELINE_", extra="ignore")

    url: str = Field(default=DEFAULT_URL, description="The admin API's base URL.")
    token: SecretStr | None = Field(default=None, description="A token of the admin API.")
    timeout_s: float = Field(default=30.0, gt=0, le=3600, description="Per HTTP request.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8080")
        return value.strip().rstrip("/")


def shown_url(url: str) -> str:
    """`url` without any user or password it may hold, nor its query (a token may be there):
    what messages show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))


def load(url: str | None = None) -> CliSettings:
    """The settings, `url` (the `--url` option) winning over `PACELINE_URL`; a usage error
    (exit 2) naming each bad variable, never its value."""
    try:
        settings = CliSettings() if url is None else CliSettings(url=url)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_variable(e['loc'], url is not None)}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise CliError(f"bad settings: {problems}", USAGE) from None
    return settings


def _variable(loc: tuple[int | str, ...], from_option: bool) -> str:
    name = ".".join(map(str, loc))
    if name == "url" and from_option:
        return "--url"
    return f"PACELINE_{name.upper()}"
