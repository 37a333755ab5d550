"""Process definitions: the CONTRACT.md format, validated into typed, immutable models.

`parse_definition` reports every problem it finds, each with the path to the offending part, so
an author fixes a definition in one round trip instead of one error at a time. It visits each
step once and does a bounded amount of work per step (per reference, per nesting level), so its
time is linear in the definition's size; `LIMITS` bound that size where definitions are created.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from typing import Any, Literal

from paceline_engine.activity_types import ACTIVITY_TYPES, SCHEDULER_TYPES, param_problems
from paceline_engine.expressions import (
    ROOT_NAMES,
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


WAIT_ROOTS = ("inputs", "steps", "signal")
"""What a wait's `when` sees: the signal (`signal.payload`, `signal.by`, ...) besides the
usual names."""

Step = ActivityStep | ConditionStep | ParallelStep | WaitStep


@dataclass(frozen=True, slots=True)
class Definition:
    name: str
    inputs: Mapping[str, InputSpec]
    steps: tuple[Step, ...]
    version: int = 0
    """Given by the store when the definition is saved; 0 before that."""
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
        for key in raw.keys() - {"name", "inputs", "steps", "description"}:
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
        self.check_size()
        if self.problems:
            raise DefinitionError(self.problems)
        assert isinstance(name, str)
        return Definition(name=name, inputs=inputs, steps=steps, version=version)

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
        self, raw: Any, path: str, step_id: str, roots: tuple[str, ...] = ROOT_NAMES
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
        self.references(expression.references(), path, step_id)
        return expression

    def template(self, raw: Mapping[str, Any], path: str, step_id: str) -> Template | None:
        # One compile for the whole `with`, which reports every field's problems, and keeps
        # each field's references apart so a wrong one is reported at its field.
        max_length = self.limits.expression_length if self.limits is not None else None
        template, fields, problems = compile_fields(raw, path, max_expression_length=max_length)
        for where, message in problems:
            self.problem(where, message)
        for key, refs in fields.items():
            if refs:
                self.references(refs, f"{path}.{key}", step_id)
        return template

    def references(self, refs: frozenset[tuple[str, ...]], path: str, step_id: str) -> None:
        for ref in sorted(refs):
            text = ".".join(ref)
            if ref[0] == "inputs":
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
