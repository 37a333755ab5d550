"""Request and response shapes of the event routes (they are the OpenAPI schemas)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from paceline_admin.params import Text
from paceline_admin.schemas import refer
from paceline_contracts.states import InstanceStatus
from paceline_starts.intake import MAX_DATA_BYTES, Outcome, ReceivedVia

EventType = StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:/-]+$")
"""An event type, as a trigger's `event` spells it (the engine's rule)."""


class EventRequest(BaseModel):
    """An event. Unknown fields are refused, and so is a value of another JSON type."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Annotated[str, EventType] = Field(
        description="The event type: 1 to 200 letters, digits, `.`, `_`, `:`, `/` or `-`; the "
        "triggers whose `event` is this type receive it."
    )
    id: Annotated[str, Text] | None = Field(
        default=None,
        description="The sender's id of the event. Without an `Idempotency-Key`, `source` and "
        "`id` deduplicate it: the same event sent again starts nothing.",
    )
    source: Annotated[str, Text] | None = Field(
        default=None, description="Who sent it (a system's name, a URL)."
    )
    data: Annotated[
        Any,
        refer(
            "JsonValue",
            "What the triggers' expressions see as `trigger.event.data`; at most "
            f"{MAX_DATA_BYTES // 1024} KiB as JSON.",
        ),
    ] = None


class EventStart(BaseModel):
    """What one trigger subscribed to the event's type did with it."""

    definition: str
    version: int = Field(description="The definition's version whose trigger it is (the latest).")
    trigger: str = Field(description="The trigger's id.")
    outcome: Outcome = Field(
        description="`started`; `not_started` (its `when` is false for the event); "
        "`deduplicated` (its `dedupe` key was seen within the window: `instance_id` is the "
        "instance that key started); `start_failed` (an expression failed on the event, or the "
        "definition refused the inputs: see `reason`)."
    )
    instance_id: UUID | None = Field(
        description="The instance it started, or for `deduplicated` the one started before."
    )
    reason: str | None = Field(description="Why, when it did not start an instance.")


class EventAccepted(BaseModel):
    """An event that was recorded with everything it started."""

    event_id: UUID = Field(description="Paceline's id of the event (`GET /v1/events/{id}`).")
    duplicate: bool = Field(
        description="True when the event was recorded before (the same key): this is the "
        "first answer, and nothing was started again."
    )
    no_subscriber: bool = Field(description="No trigger subscribes to the event's type.")
    instances: list[EventStart] = Field(
        description="One entry per trigger of the event's type, by definition name."
    )


class EventStartView(EventStart):
    status: InstanceStatus | None = Field(
        description="The current status of `instance_id`'s instance; null without one."
    )


class EventView(BaseModel):
    """An event as recorded, and what it started."""

    event_id: UUID
    type: str
    id: str | None = Field(description="The sender's id of the event.")
    source: str | None
    data: Annotated[Any, refer("JsonValue")]
    received_by: str = Field(
        description="The principal whose token posted it, or `amqp:events.in` for the queue."
    )
    received_via: ReceivedVia = Field(description="`api` or `amqp`.")
    received_at: datetime = Field(description="When it was recorded (the database's time).")
    no_subscriber: bool
    instances: list[EventStartView] = Field(description="As first answered, with statuses now.")
