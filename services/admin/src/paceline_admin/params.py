"""Constraints shared by request fields, so bad values are a 422 and never reach SQL."""

from __future__ import annotations

from pydantic import StringConstraints

MAX_VERSION = 2**31 - 1
"""Versions are PostgreSQL integers: a larger one in a request is refused, not a 500."""
Text = StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00]+$")
"""Text that PostgreSQL can store: the pattern also refuses lone surrogates."""
