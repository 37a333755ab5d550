"""Process definitions: the CONTRACT.md format, validated into typed, immutable models.

`parse_definition` reports every problem it finds, each with the path to the offending part, so
an author fixes a definition in one round trip instead of one error at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from paceline_engine.activity_types import ACTIVITY_TYPES, param_problems
from paceline_engine.expressions import (
    Expression,
    ExpressionError,
    Template,
    TemplateError,
    compile_template,
    parse,
)

InputType = Literal["string", "integer", "number", "boolean", "object", "array"]
INPUT_TYPES: tuple[str, ...] = ("string", "integer", "number", "boolean", "object", "array")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_STEP_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
MAX_DURATION_S = 30 * 86_400
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


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


Step = ActivityStep | ConditionStep | ParallelStep


@dataclass(frozen=True, slots=True)
class Definition:
    name: str
    inputs: Mapping[str, InputSpec]
    steps: tuple[Step, ...]
    version: int = 0
    """Given by the store when the definition is saved; 0 before that."""

    def walk(self) -> Iterator[Step]:
        """Every step, depth first, in definition order."""
        yield from _walk(self.steps)

    def activity(self, step_id: str) -> ActivityStep:
        step = self.step_index()[step_id]
        assert isinstance(step, ActivityStep)
        return step

    def step_index(self) -> Mapping[str, Step]:
        return {s.id: s for s in self.walk()}


def _walk(steps: tuple[Step, ...]) -> Iterator[Step]:
    for step in steps:
        yield step
        if isinstance(step, ConditionStep):
            yield from _walk(step.then)
            yield from _walk(step.otherwise)
        elif isinstance(step, ParallelStep):
            for branch in step.branches:
                yield from _walk(branch)


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


def parse_definition(raw: Any, *, version: int = 0) -> Definition:
    """Validate a definition as a user sent it; raises DefinitionError with every problem."""
    return _Parser().definition(raw, version)


class _Parser:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.seen_ids: dict[str, str] = {}
        self.input_names: frozenset[str] = frozenset()

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
            steps = self.steps(steps_raw, "steps", frozenset())[0]
        if self.problems:
            raise DefinitionError(self.problems)
        assert isinstance(name, str)
        return Definition(name=name, inputs=inputs, steps=steps, version=version)

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

    def steps(
        self, raw: list[Any], path: str, visible: frozenset[str]
    ) -> tuple[tuple[Step, ...], frozenset[str]]:
        """Parse a sequence. `visible` are the activity ids that may have run before it; the
        second result adds every activity of this sequence, for the steps that follow it."""
        parsed: list[Step] = []
        for i, item in enumerate(raw):
            step, visible = self.step(item, f"{path}[{i}]", visible)
            if step is not None:
                parsed.append(step)
        return tuple(parsed), visible

    def step(
        self, raw: Any, path: str, visible: frozenset[str]
    ) -> tuple[Step | None, frozenset[str]]:
        if not isinstance(raw, Mapping):
            self.problem(path, "a step is an object")
            return None, visible
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
        kinds = [k for k in ("type", "if", "parallel") if k in raw]
        if len(kinds) != 1:
            self.problem(path, "a step has exactly one of 'type' (an activity), 'if' or 'parallel'")
            return None, visible
        if kinds[0] == "type":
            return self.activity(raw, path, step_id, visible), visible | {step_id}
        if kinds[0] == "if":
            return self.condition(raw, path, step_id, visible)
        return self.parallel(raw, path, step_id, visible)

    def activity(
        self, raw: Mapping[str, Any], path: str, step_id: str, visible: frozenset[str]
    ) -> ActivityStep | None:
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
            template = self.template(params_raw, f"{path}.with", step_id, visible)
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
        if activity_type is None or template is None:
            return None
        return ActivityStep(step_id, type_name, template, restartable, timeout, retry)

    def condition(
        self, raw: Mapping[str, Any], path: str, step_id: str, visible: frozenset[str]
    ) -> tuple[Step | None, frozenset[str]]:
        for extra in raw.keys() - {"id", "if", "then", "else", "description"}:
            self.problem(f"{path}.{extra}", "unknown field for a condition step")
        expression = self.expression(raw["if"], f"{path}.if", step_id, visible)
        branches: list[tuple[Step, ...]] = []
        after = visible
        for key in ("then", "else"):
            branch_raw = raw.get(key, [])
            if not isinstance(branch_raw, list):
                self.problem(f"{path}.{key}", "a list of steps")
                branch_raw = []
            branch, branch_visible = self.steps(branch_raw, f"{path}.{key}", visible)
            branches.append(branch)
            # Either branch may have run: later steps may read both (an untaken one reads null).
            after = after | branch_visible
        if expression is None:
            return None, after
        return ConditionStep(step_id, expression, branches[0], branches[1]), after

    def parallel(
        self, raw: Mapping[str, Any], path: str, step_id: str, visible: frozenset[str]
    ) -> tuple[Step | None, frozenset[str]]:
        for extra in raw.keys() - {"id", "parallel", "description"}:
            self.problem(f"{path}.{extra}", "unknown field for a parallel step")
        branches_raw = raw["parallel"]
        if not isinstance(branches_raw, list) or not branches_raw:
            self.problem(f"{path}.parallel", "a non-empty list of branches (each a list of steps)")
            return None, visible
        branches: list[tuple[Step, ...]] = []
        after = visible
        for i, branch_raw in enumerate(branches_raw):
            bpath = f"{path}.parallel[{i}]"
            if not isinstance(branch_raw, list) or not branch_raw:
                self.problem(bpath, "a branch is a non-empty list of steps")
                continue
            # A branch sees only what ran before the parallel step and earlier in itself.
            branch, branch_visible = self.steps(branch_raw, bpath, visible)
            branches.append(branch)
            after = after | branch_visible
        return ParallelStep(step_id, tuple(branches)), after

    def expression(
        self, raw: Any, path: str, step_id: str, visible: frozenset[str]
    ) -> Expression | None:
        if not isinstance(raw, str):
            self.problem(path, "an expression string")
            return None
        try:
            expression = parse(raw)
        except ExpressionError as exc:
            self.problem(path, str(exc))
            return None
        self.references(expression.references(), path, step_id, visible)
        return expression

    def template(
        self, raw: Mapping[str, Any], path: str, step_id: str, visible: frozenset[str]
    ) -> Template | None:
        # Field by field, so one bad expression does not hide the other fields' problems.
        ok = True
        for key, value in raw.items():
            try:
                field_template = compile_template(value, f"{path}.{key}")
            except TemplateError as exc:
                ok = False
                for where, message in exc.problems:
                    self.problem(where, message)
                continue
            self.references(field_template.references(), f"{path}.{key}", step_id, visible)
        return compile_template(dict(raw), path) if ok else None

    def references(
        self, refs: frozenset[tuple[str, ...]], path: str, step_id: str, visible: frozenset[str]
    ) -> None:
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
                elif ref[1] not in visible:
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
