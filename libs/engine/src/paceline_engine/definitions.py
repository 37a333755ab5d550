"""Process definitions: the CONTRACT.md format, validated into typed, immutable models.

`parse_definition` reports every problem it finds, each with the path to the offending part, so
an author fixes a definition in one round trip instead of one error at a time. A definition's
`triggers` (issue 11) subscribe it to events: each is checked here like a step, and `Trigger`
evaluates it against an event (`trigger_for_event`). It visits each
step once and does a bounded amount of work per step (per reference, per nesting level), so its
time is linear in the definition's size; `LIMITS` bound that size where definitions are created.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from typing import Any, Literal

from paceline_engine.activity_types import ACTIVITY_TYPES, SCHEDULER_TYPES, param_problems
from paceline_engine.expressions import (
    Expression,
    ExpressionError,
    Template,
    compile_fields,
    expression_too_long,
    parse,
)

InputType = Literal["string", "integer", "number", "boolean", "object", "array"]
INPUT_TYPES: tuple[str, ...] = ("string", "integer", "number", "boolean", "object", "array")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_STEP_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_SIGNAL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.:/-]{1,200}")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
MAX_DURATION_S = 30 * 86_400
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

MAX_STEPS = 10_000
"""Steps in one definition, counting every step inside conditions and parallel branches. The
admin API refuses request bodies over 1 MiB (and documents of more than 100,000 JSON values),
so 10,000 steps leave about 100 bytes and 10 values per step; an instance keeps state for each
step it runs, so this also bounds what one instance holds."""

MAX_BRANCHES = 1_000
"""Branches of one parallel step. Every branch starts at once when the step starts, so this
bounds the burst of dispatches that one step makes; wider fan-outs belong in several steps."""

MAX_NESTING_DEPTH = 16
"""How many condition or parallel steps may enclose a step (a step at the top has depth 0).
Each parallel level takes three levels of JSON (step, branch list, branch) and the admin API
reads at most 64 levels, so 16 parallel levels still leave 12 levels for a step's `with`."""

MAX_TRIGGERS = 100
"""Triggers in one definition. Each event is matched against the triggers of its type in the
transaction that records it, so this bounds what one event can cost a definition."""

MAX_EXPRESSION_LENGTH = 1_000
"""Characters of one expression: a condition's whole `if`, or what one `${...}` in a `with`
holds. Expressions run on the scheduler at each step; longer logic belongs in an activity."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on a definition's size, checked (when given to `parse_definition`) with every
    excess reported as a Problem naming the limit and the actual value."""

    steps: int = MAX_STEPS
    branches: int = MAX_BRANCHES
    nesting_depth: int = MAX_NESTING_DEPTH
    expression_length: int = MAX_EXPRESSION_LENGTH
    triggers: int = MAX_TRIGGERS


LIMITS = Limits()
"""The documented limits (README, "Process definitions"), which the admin API applies to every
definition it creates."""


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    """Where in the definition, e.g. `steps[1].else[0].type`."""
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class DefinitionError(ValueError):
    """A definition that cannot be used, with every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class InputSpec:
    type: InputType
    default: Any = None
    required: bool = True
    """An input with no `default` must be given at start."""
    description: str = ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 1
    """Attempts in all, the first included, when the activity fails."""
    backoff_s: float = 0.0
    """Wait before each new attempt."""


@dataclass(frozen=True, slots=True)
class ActivityStep:
    id: str
    type: str
    params: Template
    restartable_override: bool | None = None
    timeout_s: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True, slots=True)
class ConditionStep:
    id: str
    condition: Expression
    then: tuple[Step, ...]
    otherwise: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class ParallelStep:
    id: str
    branches: tuple[tuple[Step, ...], ...]


@dataclass(frozen=True, slots=True)
class WaitStep:
    """A durable wait, handled by the scheduler (waits.py): exactly one of `for_s`, `until`
    and `signal` is set."""

    id: str
    for_s: float | None = None
    """Wait this long."""
    until: Template | None = None
    """Wait until this time: a template giving an ISO-8601 time with an offset, evaluated
    when the wait starts."""
    signal: str | None = None
    """Wait for a signal of this name (`POST /v1/instances/{id}/signals/{name}`)."""
    timeout_s: float | None = None
    """For a signal: give up after this long (None: `"timeout": "none"`, wait for ever)."""
    on_timeout: str = "fail"
    """For a signal, at its timeout: `fail` the step, or `continue` (output
    `resolved_by: timeout`)."""
    when: Expression | None = None
    """For a signal: only one for which this is true ends the wait (it sees `signal`)."""


INSTANCE_ROOTS = ("inputs", "steps", "trigger")
"""What the expressions of steps see: the inputs, the outputs of steps, and how the instance
was started (`trigger`: null when started through the API; see `trigger_for_event` and
`trigger_for_schedule`)."""

WAIT_ROOTS = ("inputs", "steps", "trigger", "signal")
"""What a wait's `when` sees: the signal (`signal.payload`, `signal.by`, ...) besides the
usual names."""

TRIGGER_ROOTS = ("trigger",)
"""What a trigger's `when`, `inputs` and `dedupe` see: the event (`trigger.event`), nothing of
an instance (there is none yet)."""

EVENT_FIELDS = ("type", "id", "source", "data")
"""What `trigger.event` holds."""

EVENT_TRIGGER_FIELDS = ("kind", "id", "event")
"""What `trigger` holds for an instance started by an event (and in a trigger's expressions):
`kind` is `event`, `id` the trigger's id, `event` the event."""

INSTANCE_TRIGGER_FIELDS = ("kind", "id", "event", "schedule", "nominal_at")
"""What a step may read of `trigger`: an event's fields, or a schedule's (`kind` is
`schedule`, `schedule` its id, `nominal_at` its nominal fire time, ISO-8601 UTC)."""

DEFAULT_DEDUPE_WINDOW_S = 86_400.0
"""How long a trigger's dedupe key is remembered when it gives no `dedupe_window`."""

Step = ActivityStep | ConditionStep | ParallelStep | WaitStep


@dataclass(frozen=True, slots=True)
class Trigger:
    """A subscription of the definition to events of one type: each event of type `event` for
    which `when` is true starts an instance with `inputs` rendered from the event."""

    id: str
    event: str
    """The event type it listens to (exact match)."""
    inputs: Template
    """The instance's inputs: an object whose values may hold `${...}` reading `trigger`."""
    when: Expression | None = None
    """Only events for which this is true start an instance (None: every event)."""
    dedupe: Expression | None = None
    """A key: a second event with the same key within `dedupe_window_s` starts nothing."""
    dedupe_window_s: float | None = None
    """With `dedupe`: how long a key is remembered (`DEFAULT_DEDUPE_WINDOW_S` by default)."""

    def matches(self, trigger: Mapping[str, Any]) -> bool:
        """Whether the event in `trigger` (as `trigger_for_event` makes it) starts an instance:
        its type is `event` and `when`, if any, is true. Raises EvaluationError when `when`
        fails on the event."""
        event = trigger.get("event")
        if not isinstance(event, Mapping) or event.get("type") != self.event:
            return False
        return self.when is None or bool(self.when.evaluate({"trigger": trigger}))

    def start_inputs(self, trigger: Mapping[str, Any]) -> dict[str, Any]:
        """The inputs rendered for the event in `trigger` (check them with `resolve_inputs`).
        Raises EvaluationError when an expression fails on the event."""
        rendered = self.inputs.render({"trigger": trigger})
        assert isinstance(rendered, dict)
        return rendered

    def dedupe_key(self, trigger: Mapping[str, Any]) -> str | None:
        """The dedupe key of the event in `trigger`: `dedupe`'s value, a string as it is and
        anything else as compact JSON; None when there is no `dedupe` or it gives null (the
        event is not deduplicated: nothing is dropped for a key it does not have). Raises
        EvaluationError when `dedupe` fails on the event."""
        if self.dedupe is None:
            return None
        value = self.dedupe.evaluate({"trigger": trigger})
        if value is None or isinstance(value, str):
            return value
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def trigger_for_event(
    trigger_id: str, event_type: str, event_id: str, source: str | None, data: Any
) -> dict[str, Any]:
    """The `trigger` that expressions see for an event (`POST /v1/events` `{type, id, source,
    data}`), in a trigger's `when`, `inputs` and `dedupe` and in the steps of the instance it
    started."""
    return {
        "kind": "event",
        "id": trigger_id,
        "event": {"type": event_type, "id": event_id, "source": source, "data": data},
    }


def trigger_for_schedule(schedule_id: str, nominal_at: datetime) -> dict[str, Any]:
    """The `trigger` that the steps of an instance started by a schedule see."""
    return {
        "kind": "schedule",
        "schedule": schedule_id,
        "nominal_at": nominal_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }


@dataclass(frozen=True, slots=True)
class Definition:
    name: str
    inputs: Mapping[str, InputSpec]
    steps: tuple[Step, ...]
    version: int = 0
    """Given by the store when the definition is saved; 0 before that."""
    triggers: tuple[Trigger, ...] = ()
    """The events it subscribes to (the latest version's are the ones that count)."""
    _index: Mapping[str, Step] = field(init=False, repr=False, compare=False)
    """Every step by id, built once: `activity()` is called for each event of a run."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {s.id: s for s in self.walk()})

    def walk(self) -> Iterator[Step]:
        """Every step, depth first, in definition order."""
        yield from _walk(self.steps)

    def activity(self, step_id: str) -> ActivityStep:
        step = self._index[step_id]
        assert isinstance(step, ActivityStep)
        return step

    def step_index(self) -> Mapping[str, Step]:
        """Every step by id (shared: do not change it)."""
        return self._index


def _walk(steps: tuple[Step, ...]) -> Iterator[Step]:
    # A stack of iterators rather than nested generators, so each step costs the same at any
    # depth.
    stack: list[Iterator[Step]] = [iter(steps)]
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
            continue
        yield step
        if isinstance(step, ConditionStep):
            stack.append(chain(step.then, step.otherwise))
        elif isinstance(step, ParallelStep):
            stack.append(chain.from_iterable(step.branches))


def until_problem(value: str) -> str | None:
    """Why `value` is not a wait's `until` (an ISO-8601 time with an offset), or None."""
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return f"{value!r} is not an ISO-8601 time (such as 2030-06-01T02:00:00+02:00)"
    if at.tzinfo is None:
        return f"{value!r} has no offset (write Z or +02:00)"
    try:
        at.astimezone(UTC)
    except OverflowError:
        return f"{value!r} is out of range"
    return None


def parse_duration(value: Any) -> float:
    """`30s`, `500ms`, `5m`, `1h` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value.strip())):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration (like '30s', '500ms', '5m', '1h')")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("a duration is a finite number of seconds, not negative")
    if seconds > MAX_DURATION_S:
        raise ValueError("a duration is at most 30 days")
    return seconds


def parse_definition(raw: Any, *, version: int = 0, limits: Limits | None = None) -> Definition:
    """Validate a definition as a user sent it; raises DefinitionError with every problem.

    `limits` (`LIMITS` where definitions are created) adds a problem for each limit exceeded.
    Definitions already stored are read without them: they were checked when created, and a
    limit lowered later must not stop an instance that runs one."""
    return _Parser(limits).definition(raw, version)


class _Parser:
    """One pass over the raw definition. Which activities a step may read (those that can have
    run before it) is one set, updated in place: an activity joins it once parsed; the
    activities of a condition's or parallel step's branch leave it while the next branch is
    parsed (a branch cannot see its siblings) and all come back after the step. So an activity
    moves at most twice per enclosing condition or parallel step, never once per later step."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits
        self.problems: list[Problem] = []
        self.seen_ids: dict[str, str] = {}
        self.input_names: frozenset[str] = frozenset()
        self.visible: set[str] = set()
        """The activity ids a step parsed now may read."""
        self.joined: list[str] = []
        """The ids of `visible` in the order they joined it, so a branch's are its tail."""
        self.step_count = 0
        self.deepest: tuple[int, str] = (0, "")
        """The deepest nesting seen, and the path of its first step."""

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def definition(self, raw: Any, version: int) -> Definition:
        if not isinstance(raw, Mapping):
            raise DefinitionError([Problem("", "a definition is a JSON object")])
        for key in raw.keys() - {"name", "inputs", "steps", "description", "triggers"}:
            self.problem(str(key), "unknown field")
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            self.problem(
                "name", "required: lower-case letters, digits, '.', '_' or '-', at most 100"
            )
        inputs = self.inputs(raw.get("inputs", {}))
        self.input_names = frozenset(inputs)
        steps_raw = raw.get("steps")
        if not isinstance(steps_raw, list) or not steps_raw:
            self.problem("steps", "required: a non-empty list of steps")
            steps: tuple[Step, ...] = ()
        else:
            steps = self.steps(steps_raw, "steps", 0)
        triggers = self.triggers(raw["triggers"], inputs) if "triggers" in raw else ()
        self.check_size()
        if self.problems:
            raise DefinitionError(self.problems)
        assert isinstance(name, str)
        return Definition(name=name, inputs=inputs, steps=steps, version=version, triggers=triggers)

    def check_size(self) -> None:
        if self.limits is None:
            return
        if self.step_count > self.limits.steps:
            self.problem(
                "steps",
                f"{self.step_count} steps: the limit is {self.limits.steps} steps in a "
                "definition (counting those inside conditions and parallel branches)",
            )
        depth, path = self.deepest
        if depth > self.limits.nesting_depth:
            self.problem(
                path,
                f"nested {depth} deep (inside {depth} condition or parallel steps): the limit "
                f"is a nesting depth of {self.limits.nesting_depth}",
            )

    def inputs(self, raw: Any) -> dict[str, InputSpec]:
        if not isinstance(raw, Mapping):
            self.problem("inputs", "an object of input name to {type, default?}")
            return {}
        specs: dict[str, InputSpec] = {}
        for key, spec in raw.items():
            path = f"inputs.{key}"
            if not _STEP_ID.match(str(key)):
                self.problem(path, "an input name is letters, digits and '_'")
            if not isinstance(spec, Mapping) or spec.get("type") not in INPUT_TYPES:
                self.problem(path, f"needs a type, one of {', '.join(INPUT_TYPES)}")
                continue
            for extra in spec.keys() - {"type", "default", "description"}:
                self.problem(f"{path}.{extra}", "unknown field")
            has_default = "default" in spec
            if has_default and (err := check_input_value(spec["type"], spec["default"])):
                self.problem(f"{path}.default", err)
            specs[str(key)] = InputSpec(
                type=spec["type"],
                default=spec.get("default"),
                required=not has_default,
                description=str(spec.get("description", "")),
            )
        return specs

    def steps(self, raw: list[Any], path: str, depth: int) -> tuple[Step, ...]:
        """Parse a sequence whose steps are inside `depth` condition or parallel steps. Each
        activity parsed joins `visible`, for the steps after it."""
        if depth > self.deepest[0]:
            self.deepest = (depth, f"{path}[0]")
        self.step_count += len(raw)
        parsed: list[Step] = []
        for i, item in enumerate(raw):
            step = self.step(item, f"{path}[{i}]", depth)
            if step is not None:
                parsed.append(step)
        return tuple(parsed)

    def branches(self, raws: list[tuple[list[Any], str]], depth: int) -> list[tuple[Step, ...]]:
        """Parse each (steps, path) as a branch that sees what was visible before the first,
        not its siblings; afterwards every branch's activities are visible (any may have run:
        a condition's untaken branch reads as null)."""
        start = len(self.joined)
        ran: list[str] = []
        parsed: list[tuple[Step, ...]] = []
        for raw, path in raws:
            parsed.append(self.steps(raw, path, depth + 1))
            ran.extend(self.joined[start:])
            self.visible.difference_update(self.joined[start:])
            del self.joined[start:]
        self.visible.update(ran)
        self.joined.extend(ran)
        return parsed

    def join(self, step_id: str) -> None:
        if step_id not in self.visible:  # a duplicate id stays where it first joined
            self.visible.add(step_id)
            self.joined.append(step_id)

    def step(self, raw: Any, path: str, depth: int) -> Step | None:
        if not isinstance(raw, Mapping):
            self.problem(path, "a step is an object")
            return None
        step_id = raw.get("id")
        if not isinstance(step_id, str) or not _STEP_ID.match(step_id):
            self.problem(f"{path}.id", "required: letters, digits and '_', starting with a letter")
            step_id = f"?{path}"
        elif step_id in self.seen_ids:
            self.problem(
                f"{path}.id", f"duplicate step id {step_id!r} (also at {self.seen_ids[step_id]})"
            )
        else:
            self.seen_ids[step_id] = path
        kinds = [k for k in ("type", "if", "parallel", "wait") if k in raw]
        if len(kinds) != 1:
            self.problem(
                path, "a step has exactly one of 'type' (an activity), 'if', 'parallel' or 'wait'"
            )
            return None
        if kinds[0] == "type":
            activity = self.activity(raw, path, step_id)
            self.join(step_id)
            return activity
        if kinds[0] == "wait":
            wait = self.wait(raw, path, step_id)
            self.join(step_id)
            return wait
        if kinds[0] == "if":
            return self.condition(raw, path, step_id, depth)
        return self.parallel(raw, path, step_id, depth)

    def activity(self, raw: Mapping[str, Any], path: str, step_id: str) -> ActivityStep | None:
        allowed = {"id", "type", "with", "restartable", "timeout", "retry", "description"}
        for extra in raw.keys() - allowed:
            self.problem(f"{path}.{extra}", "unknown field for an activity step")
        type_name = raw["type"]
        activity_type = ACTIVITY_TYPES.get(type_name) if isinstance(type_name, str) else None
        if activity_type is None:
            known = ", ".join(sorted(ACTIVITY_TYPES))
            self.problem(f"{path}.type", f"unknown activity type {type_name!r} (known: {known})")
        params_raw = raw.get("with", {})
        template: Template | None = None
        if not isinstance(params_raw, Mapping):
            self.problem(f"{path}.with", "an object of parameters")
        else:
            template = self.template(params_raw, f"{path}.with", step_id)
            if activity_type is not None:
                for where, message in param_problems(activity_type, params_raw):
                    self.problem(f"{path}.with.{where}" if where else f"{path}.with", message)
        restartable = raw.get("restartable")
        if restartable is not None and not isinstance(restartable, bool):
            self.problem(f"{path}.restartable", "true or false")
            restartable = None
        if restartable is not None and activity_type and not activity_type.override_allowed:
            self.problem(f"{path}.restartable", f"{type_name} does not allow an override")
        timeout = self.duration(raw, "timeout", path)
        retry = self.retry(raw.get("retry"), f"{path}.retry")
        if type_name in SCHEDULER_TYPES:
            for key in ("timeout", "retry"):
                if key in raw:
                    self.problem(
                        f"{path}.{key}",
                        f"a step of type {type_name} takes no step-level {key} (see its `with`)",
                    )
        if activity_type is None or template is None:
            return None
        return ActivityStep(step_id, type_name, template, restartable, timeout, retry)

    def condition(
        self, raw: Mapping[str, Any], path: str, step_id: str, depth: int
    ) -> ConditionStep | None:
        for extra in raw.keys() - {"id", "if", "then", "else", "description"}:
            self.problem(f"{path}.{extra}", "unknown field for a condition step")
        expression = self.expression(raw["if"], f"{path}.if", step_id)
        raws: list[tuple[list[Any], str]] = []
        for key in ("then", "else"):
            branch_raw = raw.get(key, [])
            if not isinstance(branch_raw, list):
                self.problem(f"{path}.{key}", "a list of steps")
                branch_raw = []
            raws.append((branch_raw, f"{path}.{key}"))
        then, otherwise = self.branches(raws, depth)
        if expression is None:
            return None
        return ConditionStep(step_id, expression, then, otherwise)

    def parallel(
        self, raw: Mapping[str, Any], path: str, step_id: str, depth: int
    ) -> ParallelStep | None:
        for extra in raw.keys() - {"id", "parallel", "description"}:
            self.problem(f"{path}.{extra}", "unknown field for a parallel step")
        branches_raw = raw["parallel"]
        if not isinstance(branches_raw, list) or not branches_raw:
            self.problem(f"{path}.parallel", "a non-empty list of branches (each a list of steps)")
            return None
        if self.limits is not None and len(branches_raw) > self.limits.branches:
            self.problem(
                f"{path}.parallel",
                f"{len(branches_raw)} branches: the limit is {self.limits.branches} branches "
                "in a parallel step",
            )
        raws: list[tuple[list[Any], str]] = []
        for i, branch_raw in enumerate(branches_raw):
            bpath = f"{path}.parallel[{i}]"
            if not isinstance(branch_raw, list) or not branch_raw:
                self.problem(bpath, "a branch is a non-empty list of steps")
                continue
            raws.append((branch_raw, bpath))
        # A branch sees only what ran before the parallel step and earlier in itself.
        return ParallelStep(step_id, tuple(self.branches(raws, depth)))

    def wait(self, raw: Mapping[str, Any], path: str, step_id: str) -> WaitStep | None:
        for extra in raw.keys() - {"id", "wait", "description"}:
            self.problem(f"{path}.{extra}", "unknown field for a wait step")
        spec = raw["wait"]
        wpath = f"{path}.wait"
        if not isinstance(spec, Mapping):
            self.problem(wpath, "an object: {for}, {until} or {signal, timeout, on_timeout, when}")
            return None
        kinds = [k for k in ("for", "until", "signal") if k in spec]
        if len(kinds) != 1:
            self.problem(wpath, "a wait has exactly one of 'for', 'until' or 'signal'")
            return None
        kind = kinds[0]
        allowed = {"signal", "timeout", "on_timeout", "when"} if kind == "signal" else {kind}
        for extra in spec.keys() - allowed:
            self.problem(f"{wpath}.{extra}", f"unknown field for a wait on '{kind}'")
        if kind == "for":
            if spec["for"] is None:
                self.problem(f"{wpath}.for", "a duration, such as 30s or 10m")
                return None
            seconds = self.duration(spec, "for", wpath)
            return None if seconds is None else WaitStep(step_id, for_s=seconds)
        if kind == "until":
            raw_until = spec["until"]
            if not isinstance(raw_until, str):
                self.problem(f"{wpath}.until", "a time: an ISO-8601 string or a ${...} giving one")
                return None
            if "${" not in raw_until and (problem := until_problem(raw_until)):
                self.problem(f"{wpath}.until", problem)
                return None
            until = self.template({"until": raw_until}, wpath, step_id)
            return None if until is None else WaitStep(step_id, until=until)
        return self.signal_wait(spec, wpath, step_id)

    def signal_wait(self, spec: Mapping[str, Any], path: str, step_id: str) -> WaitStep | None:
        name = spec["signal"]
        ok = True
        if not isinstance(name, str) or not _SIGNAL_NAME.match(name):
            self.problem(f"{path}.signal", "a name: 1-200 letters, digits, '_', '.', ':', '-'")
            ok = False
        if spec.get("timeout") is None:
            self.problem(
                f"{path}.timeout",
                'required for a signal: a duration, or "none" to wait for ever',
            )
            ok = False
        timeout: float | None = None
        if spec.get("timeout") != "none" and "timeout" in spec:
            timeout = self.duration(spec, "timeout", path)
            ok = ok and timeout is not None
        on_timeout = spec.get("on_timeout", "fail")
        if on_timeout not in ("fail", "continue"):
            self.problem(f"{path}.on_timeout", "'fail' or 'continue'")
            ok = False
        when: Expression | None = None
        if "when" in spec:
            when = self.expression(spec["when"], f"{path}.when", step_id, WAIT_ROOTS)
            ok = ok and when is not None
        if not ok:
            return None
        return WaitStep(step_id, signal=name, timeout_s=timeout, on_timeout=on_timeout, when=when)

    def too_long(self, text: str, path: str) -> bool:
        if self.limits is None or len(text) <= self.limits.expression_length:
            return False
        self.problem(path, expression_too_long(len(text), self.limits.expression_length))
        return True

    def expression(
        self,
        raw: Any,
        path: str,
        step_id: str,
        roots: tuple[str, ...] = INSTANCE_ROOTS,
        trigger_fields: tuple[str, ...] = INSTANCE_TRIGGER_FIELDS,
    ) -> Expression | None:
        if not isinstance(raw, str):
            self.problem(path, "an expression string")
            return None
        if self.too_long(raw, path):
            return None
        try:
            expression = parse(raw, roots)
        except ExpressionError as exc:
            self.problem(path, str(exc))
            return None
        self.references(expression.references(), path, step_id, trigger_fields)
        return expression

    def template(
        self,
        raw: Mapping[str, Any],
        path: str,
        step_id: str,
        roots: tuple[str, ...] = INSTANCE_ROOTS,
        trigger_fields: tuple[str, ...] = INSTANCE_TRIGGER_FIELDS,
    ) -> Template | None:
        # One compile for the whole `with`, which reports every field's problems, and keeps
        # each field's references apart so a wrong one is reported at its field.
        max_length = self.limits.expression_length if self.limits is not None else None
        template, fields, problems = compile_fields(
            raw, path, max_expression_length=max_length, roots=roots
        )
        for where, message in problems:
            self.problem(where, message)
        for key, refs in fields.items():
            if refs:
                self.references(refs, f"{path}.{key}", step_id, trigger_fields)
        return template

    def references(
        self,
        refs: frozenset[tuple[str, ...]],
        path: str,
        step_id: str,
        trigger_fields: tuple[str, ...] = INSTANCE_TRIGGER_FIELDS,
    ) -> None:
        for ref in sorted(refs):
            text = ".".join(ref)
            if ref[0] == "trigger":
                self.trigger_reference(ref, path, trigger_fields)
            elif ref[0] == "inputs":
                if len(ref) < 2:
                    continue  # the whole inputs object
                if ref[1] not in self.input_names:
                    self.problem(path, f"{text}: no input named {ref[1]!r}")
            elif ref[0] == "steps":
                if len(ref) < 2:
                    self.problem(path, "steps: name a step, as in steps.<id>.output")
                elif ref[1] == step_id:
                    self.problem(path, f"{text}: a step cannot read its own output")
                elif ref[1] not in self.visible:
                    self.problem(
                        path,
                        f"{text}: step {ref[1]!r} is not an activity that can have run before this",
                    )
                elif len(ref) >= 3 and ref[2] != "output":
                    self.problem(path, f"{text}: a step exposes only 'output'")

    def trigger_reference(self, ref: tuple[str, ...], path: str, fields: tuple[str, ...]) -> None:
        text = ".".join(ref)
        if len(ref) >= 2 and ref[1] not in fields:
            where = "a trigger's expressions see" if "schedule" not in fields else "steps see"
            self.problem(path, f"{text}: {where} only trigger.{', trigger.'.join(fields)}")
        elif len(ref) >= 3 and ref[1] == "event" and ref[2] not in EVENT_FIELDS:
            self.problem(path, f"{text}: an event has only {', '.join(EVENT_FIELDS)}")

    # --- triggers ------------------------------------------------------------------------------

    def triggers(self, raw: Any, inputs: Mapping[str, InputSpec]) -> tuple[Trigger, ...]:
        if not isinstance(raw, list):
            self.problem("triggers", "a list of triggers, each {id, event, when?, inputs?, ...}")
            return ()
        if self.limits is not None and len(raw) > self.limits.triggers:
            self.problem(
                "triggers",
                f"{len(raw)} triggers: the limit is {self.limits.triggers} triggers in a "
                "definition",
            )
        seen: dict[str, str] = {}
        parsed = (self.trigger(item, f"triggers[{i}]", seen, inputs) for i, item in enumerate(raw))
        return tuple(t for t in parsed if t is not None)

    def trigger(
        self, raw: Any, path: str, seen: dict[str, str], inputs: Mapping[str, InputSpec]
    ) -> Trigger | None:
        if not isinstance(raw, Mapping):
            self.problem(path, "a trigger is an object {id, event, when?, inputs?, dedupe?, ...}")
            return None
        allowed = {"id", "event", "when", "inputs", "dedupe", "dedupe_window", "description"}
        for extra in raw.keys() - allowed:
            self.problem(f"{path}.{extra}", "unknown field for a trigger")
        ok = True
        trigger_id = raw.get("id")
        if not isinstance(trigger_id, str) or not _STEP_ID.fullmatch(trigger_id):
            self.problem(f"{path}.id", "required: letters, digits and '_', starting with a letter")
            ok = False
        elif trigger_id in seen:
            self.problem(
                f"{path}.id", f"duplicate trigger id {trigger_id!r} (also at {seen[trigger_id]})"
            )
            ok = False
        else:
            seen[trigger_id] = path
        event = raw.get("event")
        if not isinstance(event, str) or not _EVENT_TYPE.fullmatch(event):
            self.problem(
                f"{path}.event",
                "required: an event type, 1 to 200 letters, digits, '.', '_', ':', '/' or '-'",
            )
            ok = False
        when = dedupe = None
        roots, fields = TRIGGER_ROOTS, EVENT_TRIGGER_FIELDS
        if "when" in raw:
            when = self.expression(raw["when"], f"{path}.when", "", roots, fields)
            ok = ok and when is not None
        template = self.trigger_inputs(raw.get("inputs", {}), f"{path}.inputs", inputs)
        if "dedupe" in raw:
            dedupe = self.expression(raw["dedupe"], f"{path}.dedupe", "", roots, fields)
            ok = ok and dedupe is not None
        window: float | None = None
        if "dedupe_window" in raw:
            window = self.duration(raw, "dedupe_window", path)
            ok = ok and window is not None
            if "dedupe" not in raw:
                self.problem(
                    f"{path}.dedupe_window",
                    "only with a dedupe: the window is how long a dedupe key is remembered",
                )
                ok = False
        elif dedupe is not None:
            window = DEFAULT_DEDUPE_WINDOW_S
        if not ok or template is None:
            return None
        assert isinstance(trigger_id, str) and isinstance(event, str)
        return Trigger(trigger_id, event, template, when, dedupe, window)

    def trigger_inputs(
        self, raw: Any, path: str, inputs: Mapping[str, InputSpec]
    ) -> Template | None:
        if not isinstance(raw, Mapping):
            self.problem(path, "an object of input name to value (values may hold ${...})")
            return None
        for key, value in raw.items():
            spec = inputs.get(str(key))
            if spec is None:
                self.problem(f"{path}.{key}", "not an input of this definition")
                continue
            static = not isinstance(value, str) or "${" not in value  # else typed when rendered
            if static and (err := check_input_value(spec.type, value)):
                self.problem(f"{path}.{key}", err)
        for name, spec in inputs.items():
            if spec.required and name not in raw:
                self.problem(path, f"input {name!r} is required (it has no default): give it here")
        return self.template(raw, path, "", TRIGGER_ROOTS, EVENT_TRIGGER_FIELDS)

    def duration(
        self, raw: Mapping[str, Any], key: str, path: str, *, zero_ok: bool = False
    ) -> float | None:
        if raw.get(key) is None:
            return None
        try:
            seconds = parse_duration(raw[key])
        except ValueError as exc:
            self.problem(f"{path}.{key}", str(exc))
            return None
        if seconds == 0 and not zero_ok:
            self.problem(f"{path}.{key}", "must be more than zero")
        return seconds

    def retry(self, raw: Any, path: str) -> RetryPolicy:
        if raw is None:
            return RetryPolicy()
        if not isinstance(raw, Mapping):
            self.problem(path, "an object {max_attempts, backoff}")
            return RetryPolicy()
        for extra in raw.keys() - {"max_attempts", "backoff"}:
            self.problem(f"{path}.{extra}", "unknown field")
        attempts = raw.get("max_attempts", 1)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
            self.problem(f"{path}.max_attempts", "a whole number from 1 to 100")
            attempts = 1
        backoff = self.duration(raw, "backoff", path, zero_ok=True) or 0.0
        return RetryPolicy(max_attempts=attempts, backoff_s=backoff)


_JSON_TYPES: Mapping[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def check_input_value(input_type: str, value: Any) -> str | None:
    """Why `value` is not of `input_type`, or None when it is."""
    if isinstance(value, bool) and input_type != "boolean":
        return f"expected {input_type}, got a boolean"
    if not isinstance(value, _JSON_TYPES[input_type]):
        return f"expected {input_type}, got {type(value).__name__}"
    return None


def resolve_inputs(definition: Definition, given: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs an instance starts with: `given` checked against the definition, with
    defaults filled in. Raises DefinitionError listing every problem."""
    problems = [
        Problem(f"inputs.{k}", "not an input of this definition")
        for k in given.keys() - definition.inputs.keys()
    ]
    resolved: dict[str, Any] = {}
    for name, spec in definition.inputs.items():
        if name in given:
            if err := check_input_value(spec.type, given[name]):
                problems.append(Problem(f"inputs.{name}", err))
            resolved[name] = given[name]
        elif spec.required:
            problems.append(Problem(f"inputs.{name}", "required"))
        else:
            resolved[name] = spec.default
    if problems:
        raise DefinitionError(problems)
    return resolved
