"""Settings shared by every service, from `PACELINE_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PACELINE_", extra="ignore")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """The RabbitMQ broker every service talks through."""
    database_url: str = "postgresql://postgres@127.0.0.1:5432/paceline"
    """The process database: definitions, instances, history, outbox."""
    reporting_database_url: str = "postgresql://postgres@127.0.0.1:5432/paceline_reporting"
    """The reporting database, written only by the reporting service."""
    namespace: str = Field(default="paceline", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Prefix of every exchange and queue, so several stacks share one broker."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP base URL (e.g. http://127.0.0.1:4318); unset: traces are not exported."""
    amqp_heartbeat_s: int = Field(default=5, ge=1, le=600)
    """AMQP heartbeat: a frozen or cut-off peer is detected after about three of these."""
    server_heartbeat_s: float = Field(default=5.0, ge=0.2, le=300)
    """How often every server reports itself to the registry."""
    server_lost_after_s: float = Field(default=20.0, ge=1, le=3600)
    """A server silent this long is shown as LOST."""
    crash_budget: int = Field(default=3, ge=1, le=100)
    """Deliveries that may end in a crash before an activity is quarantined and flagged."""
    log_level: str = "INFO"
