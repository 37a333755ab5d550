"""Exit codes, and the error every command ends with when it cannot do its job."""

from __future__ import annotations

from typing import Any

OK = 0
REFUSED = 1
"""The API answered with a problem (4xx or 5xx)."""
USAGE = 2
"""A usage error: a bad option or argument, a missing token, an unreadable file."""
UNREACHABLE = 3
"""The API could not be reached: connection refused, DNS, time-out, connection cut."""
NOT_COMPLETED = 4
"""`start --wait`: the instance ended FAILED or CANCELLED."""
FLAGGED = 5
"""`start --wait`: the instance is FLAGGED: an activity waits for an operator."""
WAIT_TIMEOUT = 6
"""`start --wait --timeout`: the time ran out before the instance ended."""
INTERRUPTED = 130
"""Ctrl-C."""


class CliError(Exception):
    """What went wrong, for a person (`message`, and `lines` under it), and the exit code."""

    def __init__(self, message: str, code: int, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.lines = lines or []


class ApiProblem(CliError):
    """The API refused: an RFC 9457 problem (or an answer that is not one)."""

    def __init__(self, status: int, body: Any, message: str, lines: list[str]) -> None:
        super().__init__(message, REFUSED, lines)
        self.status = status
        self.body = body

    @property
    def kind(self) -> str | None:
        """The problem's kind (`not-found`, `holder-alive`, ...), when it has one."""
        kind = self.body.get("type") if isinstance(self.body, dict) else None
        prefix = "urn:paceline:problem:"
        if isinstance(kind, str) and kind.startswith(prefix):
            return kind[len(prefix) :]
        return None
