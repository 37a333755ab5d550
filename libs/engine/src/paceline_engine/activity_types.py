"""What the engine knows of each built-in activity type: its parameters and whether it may run
twice. The code that runs them lives in the activity-worker; this is the shared declaration."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)


class Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NoopParams(BaseModel):
    """`noop` takes anything and returns it."""

    model_config = ConfigDict(frozen=True, extra="allow")


class SleepParams(Params):
    seconds: float = Field(ge=0, le=86_400 * 7)
    """How long to wait; cancellable."""


def _duration(value: object) -> object:
    # Imported here: definitions.py imports this module.
    from paceline_engine.definitions import parse_duration

    return value if value is None else parse_duration(value)


Approver = Annotated[str, StringConstraints(pattern=r"^(group:)?[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")]
"""A principal's name, or `group:<name>` (the forms PACELINE_ADMIN_TOKENS and PACELINE_GROUPS
allow)."""


class Escalation(Params):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    after: float = Field(gt=0)
    """Seconds (or a duration string) after the approval was asked for."""
    to: list[Approver] = Field(min_length=1)
    """More approvers: principals, or `group:<name>`."""

    _after = field_validator("after", mode="before")(_duration)


class ApprovalParams(Params):
    """`approval`: a person decides; the scheduler runs it (no worker). The approval is
    checkpointed: created once per attempt, whatever fails over (approvals.py). Strict: a
    string is not a number nor a boolean here (`"forbid_requester": "no"` would otherwise
    quietly turn a safeguard off)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    title: str = Field(min_length=1, max_length=500)
    details: Any = None
    """Shown to the approvers as given (rendered)."""
    approvers: list[Approver] = Field(min_length=1)
    """Who may decide: principals, or `group:<name>` (PACELINE_GROUPS)."""
    required: int = Field(default=1, ge=1, le=100)
    """Distinct deciders who must choose the first choice for it to be chosen."""
    forbid_requester: bool = True
    """The principal who started the instance may not decide."""
    choices: list[str] = Field(default_factory=lambda: ["approve", "reject"], min_length=2)
    """The first one approves and needs `required` deciders; any other decides at once."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds (or a duration string); None: it waits for ever."""
    on_timeout: Literal["reject", "approve", "fail"] = "reject"
    """At the timeout: decide `reject` (the last choice), `approve` (the first), or fail."""
    escalate: list[Escalation] = Field(default_factory=list, max_length=10)

    _timeout = field_validator("timeout", mode="before")(_duration)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[str]) -> list[str]:
        if len(set(choices)) != len(choices):
            raise ValueError("choices must be distinct")
        return choices

    @model_validator(mode="after")
    def _escalations_before_the_timeout(self) -> ApprovalParams:
        for level, escalation in enumerate(self.escalate, start=1):
            if self.timeout is not None and escalation.after >= self.timeout:
                raise ValueError(
                    f"escalation {level} comes at or after the timeout: it could never happen"
                )
        return self


IDEMPOTENT_HTTP_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class HttpRequestParams(Params):
    method: Literal["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url: str = Field(pattern=r"^(?i:https?)://")
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")
    """A JSON body; sent with `Content-Type: application/json`."""
    expected_status: int | list[int] | None = None
    """When set, any other status fails the activity (kind `http_status`)."""
    timeout_s: float = Field(default=30.0, gt=0, alias="timeout")
    """The request's own time-out, apart from the step's."""

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class ShellCommandParams(Params):
    argv: list[str] = Field(min_length=1)
    """The program and its arguments; run without a shell."""
    timeout_s: float = Field(default=300.0, gt=0, alias="timeout")
    """The command's own time-out, apart from the step's."""
    kill_grace_s: float = Field(default=5.0, ge=0, le=600, alias="kill_grace")
    """When the command is stopped (its `timeout`, or the attempt cancelled), how long its
    process group has between SIGTERM and SIGKILL to clean up."""
    env: dict[str, str] = Field(default_factory=dict)
    """Added to the worker's environment."""
    cwd: str | None = None
    max_output_bytes: int = Field(default=65_536, ge=0, le=16 * 1024 * 1024)
    """stdout and stderr are each cut to this many bytes."""
    expected_exit_codes: list[int] = Field(default_factory=lambda: [0])
    """Any other exit code fails the activity (kind `exit_code`)."""


@dataclass(frozen=True, slots=True)
class ActivityType:
    name: str
    params: type[BaseModel]
    restartable_by_default: Callable[[Mapping[str, Any]], bool]
    """Given the step's `with` (possibly unrendered), whether it may run twice."""
    override_allowed: bool = True
    """Whether an author may set `restartable` on a step of this type."""

    def parse_params(self, raw: Mapping[str, Any]) -> BaseModel:
        """Parse rendered parameters; raises pydantic.ValidationError."""
        return self.params.model_validate(raw)

    def restartable(self, raw: Mapping[str, Any], override: bool | None) -> bool:
        if override is not None and self.override_allowed:
            return override
        return self.restartable_by_default(raw)


def _http_default(raw: Mapping[str, Any]) -> bool:
    method = raw.get("method", "GET")
    # An unrendered `${...}` method cannot be known to be safe: treat it as not restartable.
    return isinstance(method, str) and method.upper() in IDEMPOTENT_HTTP_METHODS


ACTIVITY_TYPES: Mapping[str, ActivityType] = {
    t.name: t
    for t in (
        ActivityType("noop", NoopParams, lambda _: True),
        ActivityType("sleep", SleepParams, lambda _: True),
        ActivityType("http.request", HttpRequestParams, _http_default),
        ActivityType("shell.command", ShellCommandParams, lambda _: False),
        # Checkpointed, not re-run: the approval record is created once per attempt.
        ActivityType("approval", ApprovalParams, lambda _: True, override_allowed=False),
    )
}

SCHEDULER_TYPES = frozenset({"approval"})
"""Activity types the scheduler runs itself: never sent to a worker."""


def param_problems(activity_type: ActivityType, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems with a step's `with` that are visible before expressions are rendered.

    A field whose value holds a `${...}` is only checked for being a known field name.
    Each problem is (field, message); field is "" for the parameters as a whole.
    """
    static = {k: v for k, v in raw.items() if not _has_expression(v)}
    problems: list[tuple[str, str]] = []
    try:
        activity_type.params.model_validate(static)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing" and field in raw:
                continue  # present, but as an expression
            problems.append((field, err["msg"]))
    return problems


def _has_expression(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, Mapping):
        return any(_has_expression(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_expression(v) for v in value)
    return False
