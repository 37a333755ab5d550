"""Definitions of any size (README, "Process definitions", Limits): the documented limits, each
reported with the limit and the actual value, every problem listed at once; and validation whose
work grows linearly with the definition (counted, never timed: machines are noisy)."""

from __future__ import annotations

import copy
import pickle
import sys
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paceline_engine import definitions
from paceline_engine.definitions import (
    LIMITS,
    MAX_BRANCHES,
    MAX_EXPRESSION_LENGTH,
    MAX_NESTING_DEPTH,
    MAX_STEPS,
    ActivityStep,
    Definition,
    DefinitionError,
    Limits,
    Problem,
    parse_definition,
)
from paceline_engine.expressions import compile_fields, compile_template

# --- building definitions ------------------------------------------------------------------


def noop(step_id: str, **params: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "noop", "with": params}


def named(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": "big", "inputs": {"x": {"type": "string"}}, "steps": list(steps)}


# Ids of one width, so that a definition of twice the steps is exactly twice the size.


def sequence(n: int, prefix: str = "s") -> list[dict[str, Any]]:
    return [noop(f"{prefix}{i:05}") for i in range(n)]


def chained(n: int) -> list[dict[str, Any]]:
    """n steps, each reading the previous one's output."""
    reads = [f"${{steps.s{i - 1:05}.output}}" for i in range(n)]
    return [noop(f"s{i:05}", x=reads[i] if i else "${inputs.x}") for i in range(n)]


def wide(n: int, step_id: str = "p") -> dict[str, Any]:
    """One parallel step of n one-noop branches."""
    return {"id": step_id, "parallel": [[noop(f"{step_id}_{i:05}")] for i in range(n)]}


def nested(depth: int, leaf: dict[str, Any], prefix: str = "n") -> dict[str, Any]:
    """`leaf` inside `depth` steps, parallel and condition by turns (the outermost parallel)."""
    step = leaf
    for level in reversed(range(depth)):
        if level % 2:
            step = {"id": f"{prefix}{level}", "if": "true", "then": [step]}
        else:
            step = {"id": f"{prefix}{level}", "parallel": [[step]]}
    return step


def condition_of(length: int) -> str:
    """An `if` of exactly `length` characters (at least 14)."""
    return "inputs.x == '" + "a" * (length - 14) + "'"


def template_of(length: int) -> str:
    """A string whose one `${...}` holds exactly `length` characters (at least 13)."""
    return "${inputs.x + '" + "a" * (length - 13) + "'}"


def problems_of(raw: Any, limits: Limits | None = LIMITS) -> list[Problem]:
    with pytest.raises(DefinitionError) as info:
        parse_definition(raw, limits=limits)
    return list(info.value.problems)


def only_problem(raw: Any, limits: Limits | None = LIMITS) -> Problem:
    problems = problems_of(raw, limits)
    assert len(problems) == 1, problems
    return problems[0]


# --- the limits ----------------------------------------------------------------------------


def test_the_limits_are_the_documented_ones() -> None:
    assert (MAX_STEPS, MAX_BRANCHES, MAX_NESTING_DEPTH, MAX_EXPRESSION_LENGTH) == (
        10_000,
        1_000,
        16,
        1_000,
    )
    limits = Limits(
        steps=MAX_STEPS,
        branches=MAX_BRANCHES,
        nesting_depth=MAX_NESTING_DEPTH,
        expression_length=MAX_EXPRESSION_LENGTH,
    )
    assert limits == LIMITS


def test_a_definition_of_exactly_the_step_limit_is_accepted() -> None:
    d = parse_definition(named(*sequence(MAX_STEPS)), limits=LIMITS)
    assert len(d.steps) == MAX_STEPS


def test_one_step_over_the_limit_is_refused_with_the_limit_and_the_count() -> None:
    p = only_problem(named(*sequence(MAX_STEPS + 1)))
    assert p.path == "steps"
    assert "10001 steps" in p.message
    assert "limit is 10000 steps" in p.message


def test_steps_inside_conditions_and_branches_count() -> None:
    limits = Limits(steps=5)
    five = named(
        noop("a"), {"id": "c", "if": "true", "then": [noop("t")], "else": [wide(1, "p")]}
    )  # a, c, t, p, p_0
    parse_definition(five, limits=limits)
    six = copy.deepcopy(five)
    six["steps"][1]["else"][0]["parallel"].append([noop("q")])
    assert "6 steps" in only_problem(six, limits).message


def test_a_parallel_step_of_exactly_the_branch_limit_is_accepted() -> None:
    d = parse_definition(named(wide(MAX_BRANCHES)), limits=LIMITS)
    assert len(list(d.walk())) == MAX_BRANCHES + 1


def test_one_branch_over_the_limit_is_refused_at_the_parallel_step() -> None:
    p = only_problem(named(noop("first"), wide(MAX_BRANCHES + 1)))
    assert p.path == "steps[1].parallel"
    assert "1001 branches" in p.message
    assert "limit is 1000 branches" in p.message


def test_a_step_nested_exactly_the_limit_deep_is_accepted() -> None:
    d = parse_definition(named(nested(MAX_NESTING_DEPTH, noop("leaf"))), limits=LIMITS)
    assert d.activity("leaf").type == "noop"


def test_one_level_deeper_is_refused_at_the_deepest_step() -> None:
    p = only_problem(named(noop("first"), nested(MAX_NESTING_DEPTH + 1, noop("leaf"))))
    assert p.path.startswith("steps[1].parallel[0][0].then[0]")
    assert p.path.endswith("[0]")
    assert "nested 17 deep" in p.message
    assert "nesting depth of 16" in p.message


def test_the_nesting_reported_is_the_deepest() -> None:
    raw = named(nested(20, noop("deep")), nested(18, noop("shallower"), prefix="m"))
    p = only_problem(raw)
    assert "nested 20 deep" in p.message
    assert p.path.startswith("steps[0].")


def test_an_if_of_exactly_the_expression_limit_is_accepted() -> None:
    raw = named({"id": "c", "if": condition_of(MAX_EXPRESSION_LENGTH), "then": [noop("a")]})
    parse_definition(raw, limits=LIMITS)


def test_a_longer_if_is_refused_with_its_length() -> None:
    raw = named({"id": "c", "if": condition_of(MAX_EXPRESSION_LENGTH + 1), "then": [noop("a")]})
    p = only_problem(raw)
    assert p.path == "steps[0].if"
    assert "1001 characters" in p.message
    assert "limit is 1000 characters" in p.message


def test_an_expression_in_with_of_exactly_the_limit_is_accepted() -> None:
    d = parse_definition(
        named(noop("a", x=template_of(MAX_EXPRESSION_LENGTH))), limits=LIMITS, version=1
    )
    assert d.activity("a").params.render({"inputs": {"x": "-"}})["x"].startswith("-aaa")


def test_a_longer_expression_in_with_is_refused_at_its_field() -> None:
    text = "before " + template_of(MAX_EXPRESSION_LENGTH + 1)
    p = only_problem(named(noop("a", fine="${inputs.x}", x={"deep": [text]})))
    assert p.path == "steps[0].with.x.deep[0]"
    assert "1001 characters" in p.message
    assert "limit is 1000 characters" in p.message


def test_only_what_is_inside_the_braces_counts_as_the_expression() -> None:
    text = "x" * 5_000 + "${inputs.x}" + "y" * 5_000
    parse_definition(named(noop("a", x=text)), limits=LIMITS)


def test_every_problem_is_listed_at_once() -> None:
    first = MAX_STEPS - MAX_BRANCHES
    raw = named(
        *sequence(first),
        wide(MAX_BRANCHES + 1),  # 1,002 steps
        nested(MAX_NESTING_DEPTH + 1, noop("leaf")),  # 18
        {"id": "c", "if": condition_of(2_000), "then": [noop("long", x=template_of(1_500))]},
        {"id": "odd", "type": "telepathy"},
    )
    problems = {p.path: p.message for p in problems_of(raw)}
    assert "10023 steps" in problems.pop("steps")
    assert "1001 branches" in problems.pop(f"steps[{first}].parallel")
    assert "2000 characters" in problems.pop(f"steps[{first + 2}].if")
    assert "1500 characters" in problems.pop(f"steps[{first + 2}].then[0].with.x")
    assert "unknown activity type" in problems.pop(f"steps[{first + 3}].type")
    ((deepest, message),) = problems.items()
    assert deepest.startswith(f"steps[{first + 1}].")
    assert "nested 17 deep" in message


def test_without_limits_a_definition_over_them_still_parses() -> None:
    # Definitions already stored are read so: an instance that runs one is never stopped.
    raw = named(
        *sequence(MAX_STEPS),
        wide(MAX_BRANCHES + 1),
        nested(MAX_NESTING_DEPTH + 1, noop("leaf")),
        {"id": "c", "if": condition_of(2_000), "then": [noop("long", x=template_of(1_500))]},
    )
    d = parse_definition(raw)
    assert len(d.step_index()) == MAX_STEPS + (MAX_BRANCHES + 2) + (MAX_NESTING_DEPTH + 2) + 2
    problems = problems_of(raw, LIMITS)
    assert len(problems) == 5  # steps, branches, nesting, the if, the template


def test_a_with_is_compiled_once_into_the_same_template() -> None:
    # Field by field, in one pass (a large definition's `with` is no longer compiled twice).
    raw = {
        "url": "http://h/${inputs.x}",
        "plain": [1, {"a b": "${steps.s.output.v}"}],
        "n": 2,
        "whole": "${inputs}",
    }
    template, fields, problems = compile_fields(raw, "steps[0].with")
    assert problems == []
    assert template == compile_template(raw, "steps[0].with")
    assert template is not None and template.references() == frozenset(
        {("inputs", "x"), ("steps", "s", "output", "v"), ("inputs",)}
    )
    assert fields == {
        "url": frozenset({("inputs", "x")}),
        "plain": frozenset({("steps", "s", "output", "v")}),
        "n": frozenset(),
        "whole": frozenset({("inputs",)}),
    }
    bad = {"ok": "${inputs.x}", "broken": "${1 +}", 3: "x"}
    template, fields, problems = compile_fields(bad, "w")  # type: ignore[arg-type]
    assert template is None
    assert fields == {"ok": frozenset({("inputs", "x")})}
    assert [path for path, _ in problems] == ["w.broken", "w.3"]


# --- the index of steps --------------------------------------------------------------------


def test_the_step_index_survives_copies_and_pickling() -> None:
    d = parse_definition(named(noop("a"), wide(3)), version=2)
    for other in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d)):
        assert other == d
        assert other.activity("p_00002") == d.activity("p_00002")
        assert list(other.step_index()) == ["a", "p", "p_00000", "p_00001", "p_00002"]


def test_a_definition_built_by_hand_has_its_index() -> None:
    a = parse_definition(named(noop("a"))).activity("a")
    d = Definition(name="x", inputs={}, steps=(a,))
    assert d.activity("a") is a
    with pytest.raises(KeyError):
        d.activity("b")


# --- linear work ---------------------------------------------------------------------------
#
# Work is counted in two ways. Lines of Python executed (a trace function) catch any re-walk in
# Python: a definition twice as large must run at most twice as many lines, give or take a
# constant. What runs inside C (a set copied per step, as the parser once did) does not show
# in lines, so the set of visible activities is replaced by one that counts the members each
# operation touches: at most a few per step and per enclosing condition or parallel step.


def lines_run(work: Callable[[], object]) -> int:
    count = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        work()
    finally:
        sys.settrace(previous)
    return count


def deep_wide(n: int) -> list[dict[str, Any]]:
    """n/4 groups: a step nested 3 deep in parallels and conditions, reading an earlier one."""
    steps = []
    for g in range(n // 4):
        reading = f"${{steps.leaf{g - 1:05}.output}}" if g else "${inputs.x}"
        steps.append(nested(3, noop(f"leaf{g:05}", x=reading), prefix=f"g{g:05}_"))
    return steps


SHAPES: dict[str, Callable[[int], list[dict[str, Any]]]] = {
    "sequence": sequence,
    "chained": chained,
    "parallel": lambda n: [wide(n)],
    "nested": deep_wide,
}


@pytest.mark.skipif(sys.gettrace() is not None, reason="a tracer (coverage?) is already active")
@pytest.mark.parametrize("shape", SHAPES)
def test_parsing_twice_the_steps_runs_at_most_twice_the_lines(shape: str) -> None:
    build = SHAPES[shape]
    small, large = named(*build(1_000)), named(*build(2_000))
    limits = Limits(branches=MAX_STEPS)  # the wide shape is one parallel step
    small_lines = lines_run(lambda: parse_definition(small, limits=limits))
    large_lines = lines_run(lambda: parse_definition(large, limits=limits))
    assert large_lines <= 2 * small_lines + 200, (small_lines, large_lines)


@pytest.mark.skipif(sys.gettrace() is not None, reason="a tracer (coverage?) is already active")
def test_looking_up_every_activity_runs_lines_in_proportion() -> None:
    def lookups(n: int) -> int:
        d = parse_definition(named(*sequence(n), wide(n)))
        ids = [s.id for s in d.walk() if isinstance(s, ActivityStep)]
        return lines_run(lambda: [d.activity(i) for i in ids])

    small, large = lookups(500), lookups(1_000)
    assert large <= 2 * small + 50, (small, large)


class CountingSet(set[str]):
    """A set that counts the members each operation touches."""

    touched = 0

    def add(self, item: str) -> None:
        CountingSet.touched += 1
        super().add(item)

    def update(self, *others: Iterable[str]) -> None:
        items = [i for other in others for i in other]
        CountingSet.touched += len(items)
        super().update(items)

    def difference_update(self, *others: Iterable[Any]) -> None:
        items = [i for other in others for i in other]
        CountingSet.touched += len(items)
        super().difference_update(items)

    def __contains__(self, item: object) -> bool:
        CountingSet.touched += 1
        return super().__contains__(item)

    def __or__(self, other: Any) -> Any:
        raise AssertionError("the visible set is updated in place, never copied")

    __ror__ = __sub__ = __and__ = copy = __or__  # type: ignore[assignment]


@pytest.mark.parametrize("shape", SHAPES)
def test_each_activity_is_touched_a_bounded_number_of_times(
    shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Counted(definitions._Parser):
        def __init__(self, limits: Limits | None = None) -> None:
            super().__init__(limits)
            self.visible = CountingSet()

    monkeypatch.setattr(definitions, "_Parser", Counted)
    for n in (1_000, 4_000):
        CountingSet.touched = 0
        d = parse_definition(named(*SHAPES[shape](n)), limits=Limits(branches=MAX_STEPS))
        steps = len(d.step_index())
        # Per activity: its own references and joining; per enclosing step: leaving and
        # coming back. Nested shapes have 3 enclosing steps per activity.
        assert CountingSet.touched <= 4 * steps + 2 * 3 * steps, (n, CountingSet.touched)


# --- the same rules as before, on definitions of every shape -------------------------------


def reference_visibility(
    steps: list[dict[str, Any]], path: str, visible: frozenset[str], out: dict[str, str]
) -> frozenset[str]:
    """The rules as the parser first had them (a new set per step: quadratic but plain).
    Fills `out` with the path of each unreadable reference and why; returns what is visible
    after the sequence."""
    for i, step in enumerate(steps):
        here = f"{path}[{i}]"
        if "type" in step:
            for ref in _reads(step["with"].get("x", "")):
                if ref == step["id"]:
                    out[f"{here}.with.x"] = "own output"
                elif ref not in visible:
                    out[f"{here}.with.x"] = "can have run"
            visible = visible | {step["id"]}
        elif "if" in step:
            for ref in _reads(step["if"]):
                if ref == step["id"]:
                    out[f"{here}.if"] = "own output"
                elif ref not in visible:
                    out[f"{here}.if"] = "can have run"
            after = visible
            for key in ("then", "else"):
                after |= reference_visibility(step[key], f"{here}.{key}", visible, out)
            visible = after
        else:
            after = visible
            for b, branch in enumerate(step["parallel"]):
                after |= reference_visibility(branch, f"{here}.parallel[{b}]", visible, out)
            visible = after
    return visible


def _reads(text: str) -> list[str]:
    return [part.split(".")[0] for part in text.split("steps.")[1:]]


@st.composite
def shaped_definitions(draw: st.DrawFn) -> dict[str, Any]:
    """Random trees of activities, conditions and parallel steps, each activity and condition
    reading a step drawn from all of them (before, after, beside, itself or enclosing)."""
    ids: list[str] = []
    readers: list[dict[str, Any]] = []

    def steps(depth: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(draw(st.integers(1, 4))):
            kinds = ["activity"] * 3 + (["if", "parallel"] if depth < 3 else [])
            kind = draw(st.sampled_from(kinds))
            step_id = f"{kind[0]}{len(ids)}"
            ids.append(step_id)
            if kind == "activity":
                step: dict[str, Any] = {"id": step_id, "type": "noop", "with": {}}
            elif kind == "if":
                step = {"id": step_id, "if": "true"}
                step["then"] = steps(depth + 1) if draw(st.booleans()) else []
                step["else"] = steps(depth + 1) if draw(st.booleans()) else []
            else:
                branches = draw(st.integers(1, 3))
                step = {"id": step_id, "parallel": [steps(depth + 1) for _ in range(branches)]}
            if kind != "parallel":
                readers.append(step)
            out.append(step)
        return out

    raw = {"name": "shaped", "steps": steps(0)}
    for step in readers:
        if draw(st.booleans()):
            read = f"steps.{draw(st.sampled_from(ids))}.output"
            if "if" in step:
                step["if"] = f"{read} == 1"
            else:
                step["with"]["x"] = "${" + read + "}"
    return raw


@settings(max_examples=300, deadline=None)
@given(shaped_definitions())
def test_which_steps_may_be_read_follows_the_rules(raw: dict[str, Any]) -> None:
    expected: dict[str, str] = {}
    reference_visibility(raw["steps"], "steps", frozenset(), expected)
    try:
        parse_definition(raw, limits=LIMITS)
        found: dict[str, str] = {}
    except DefinitionError as exc:
        found = {
            p.path: "own output" if "own output" in p.message else "can have run"
            for p in exc.problems
        }
    assert found == expected
