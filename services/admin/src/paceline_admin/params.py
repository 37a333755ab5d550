"""Constraints shared by request fields, so bad values are a 422 and never reach SQL."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StringConstraints

MAX_VERSION = 2**31 - 1
"""Versions are PostgreSQL integers: a larger one in a request is refused, not a 500."""
Text = StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00]+$")
"""Text that PostgreSQL can store: the pattern also refuses lone surrogates."""


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def whole_number() -> BeforeValidator:
    """For `Annotated[int, Field(...), whole_number()]` in a strict request model: a JSON number
    that is whole, however written (`3` or `3.0`: one number in JSON, and in the JSON Schema
    of the OpenAPI document); never a boolean, a string or a fraction. After the constraints,
    so that their schema is the integer's."""
    return BeforeValidator(_whole)


Version = Annotated[int, Field(ge=1, le=MAX_VERSION), whole_number()]
"""A definition's version in a request body."""
