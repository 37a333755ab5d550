"""The expression language: parsing, evaluation, references and templates."""

from __future__ import annotations

import contextlib
import json
import pickle
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paceline_engine.expressions import (
    ROOT_NAMES,
    EvaluationError,
    Expression,
    ExpressionError,
    Template,
    TemplateError,
    compile_template,
    parse,
)

CTX: dict[str, Any] = {
    "inputs": {
        "n": 7,
        "f": 2.5,
        "s": "hello",
        "empty": "",
        "flag": True,
        "nothing": None,
        "hosts": ["a.example", "b.example", "c.example"],
        "nums": [1, 2, 3],
        "obj": {"k": "v", "nested": {"deep": 42}},
        "big": 10**400,
        "i": 1,
    },
    "steps": {
        "lookup": {"output": {"status": 200, "body": {"id": "x-1"}, "items": [10, 20]}},
        "a": {"output": {"i": 2}},
    },
}


def ev(source: str, ctx: dict[str, Any] | None = None) -> Any:
    return parse(source).evaluate(CTX if ctx is None else ctx)


def parse_error(source: str) -> ExpressionError:
    with pytest.raises(ExpressionError) as info:
        parse(source)
    return info.value


def eval_error(source: str) -> str:
    with pytest.raises(EvaluationError) as info:
        ev(source)
    return str(info.value)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON types throughout (Python's 1 == True == 1.0 is too lax)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# --- literals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("3", 3),
        ("0", 0),
        ("2.5", 2.5),
        ("1e3", 1000.0),
        ("1.5E-1", 0.15),
        ("'single'", "single"),
        ('"double"', "double"),
        (r"'it\'s'", "it's"),
        (r'"say \"hi\""', 'say "hi"'),
        (r"'a\\b'", "a\\b"),
        (r"'line\nnext\ttab'", "line\nnext\ttab"),
        ("'has \"other\" quotes'", 'has "other" quotes'),
        ("''", ""),
        ("true", True),
        ("false", False),
        ("null", None),
        ("[]", []),
        ("[1, 'a', null, [true]]", [1, "a", None, [True]]),
        ("[1, 2,]", [1, 2]),
        ("(((4)))", 4),
        ("  \t 5 \n", 5),
    ],
)
def test_literals(source: str, expected: Any) -> None:
    assert same(ev(source), expected)


def test_number_types_are_kept() -> None:
    assert type(ev("3")) is int
    assert type(ev("3.0")) is float
    assert type(ev("-3")) is int


def test_list_literal_is_fresh_each_time() -> None:
    expression = parse("[1, 2]")
    first = expression.evaluate(CTX)
    first.append(3)
    assert expression.evaluate(CTX) == [1, 2]


# --- access --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("inputs.n", 7),
        ("inputs['n']", 7),
        ('inputs["obj"]["nested"].deep', 42),
        ("inputs.obj.nested.deep", 42),
        ("inputs.hosts[0]", "a.example"),
        ("inputs.hosts[2]", "c.example"),
        ("inputs.hosts[-1]", "c.example"),
        ("inputs.hosts[-3]", "a.example"),
        ("inputs.hosts[inputs.i]", "b.example"),
        ("inputs.hosts[steps.a.output.i]", "c.example"),
        ("inputs.hosts[1 + 1]", "c.example"),
        ("steps.lookup.output.status", 200),
        ("steps.lookup.output.items[1]", 20),
        ("[10, 20, 30][1]", 20),
        ("(inputs.obj).k", "v"),
        ("inputs.obj[inputs.obj.k]", None),
    ],
)
def test_access(source: str, expected: Any) -> None:
    assert ev(source) == expected


def test_roots_evaluate_to_the_whole_mapping() -> None:
    assert ev("inputs") is CTX["inputs"]
    assert ev("steps") is CTX["steps"]


@pytest.mark.parametrize(
    "source",
    [
        "inputs.missing",
        "inputs['missing']",
        "inputs.missing.deeper[3].x",
        "inputs.nothing.x",
        "inputs.nothing[0]",
        "inputs.nothing['x']",
        "inputs.hosts[3]",
        "inputs.hosts[-4]",
        "inputs.hosts[100000000000000000000]",
        "steps.not_run.output.status",
        "steps.not_run['output']",
        "null.x",
        "null[0]",
        "null[null]",
    ],
)
def test_access_is_null_safe(source: str) -> None:
    assert ev(source) is None


def test_missing_roots_are_null() -> None:
    assert ev("steps.lookup.output", {"inputs": {}}) is None
    assert ev("inputs.x", {}) is None


def test_keywords_may_follow_a_dot() -> None:
    ctx = {"inputs": {"in": 1, "not": 2, "and": 3, "or": 4, "true": 5, "null": 6}}
    assert ev("inputs.in + inputs.not + inputs.and + inputs.or + inputs.true + inputs.null", ctx)
    assert ev("inputs.in", ctx) == 1
    assert ev("inputs.null", ctx) == 6


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ("inputs.n.x", ["'x'", "int"]),
        ("inputs.s.length", ["'length'", "string"]),
        ("inputs.flag.x", ["'x'", "bool"]),
        ("inputs.f.x", ["'x'", "float"]),
        ("inputs.hosts.first", ["'first'", "list", "indices are ints"]),
        ("inputs.hosts['0']", ["'0'", "list", "indices are ints"]),
        ("inputs.hosts[1.0]", ["float", "list"]),
        ("inputs.hosts[true]", ["bool", "list"]),
        ("inputs.hosts[null]", ["null", "list"]),
        ("inputs.obj[0]", ["0", "dict", "keys are strings"]),
        ("inputs.obj[null]", ["null", "dict"]),
        ("inputs.s[0]", ["0", "string"]),
        ("3[0]", ["0", "int"]),
    ],
)
def test_access_errors(source: str, fragments: list[str]) -> None:
    message = eval_error(source)
    for fragment in fragments:
        assert fragment in message


# --- arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 + 2", 3),
        ("1 + 2.5", 3.5),
        ("5 - 8", -3),
        ("5.5 - 0.5", 5.0),
        ("6 * 7", 42),
        ("2 * 1.5", 3.0),
        ("7 / 2", 3.5),
        ("6 / 3", 2.0),
        ("7 % 3", 1),
        ("-7 % 3", 2),
        ("7 % -3", -2),
        ("7.5 % 2", 1.5),
        ("-inputs.n", -7),
        ("--3", 3),
        ("- -inputs.n", 7),
        ("-inputs.f", -2.5),
        ("'ab' + 'cd'", "abcd"),
        ("inputs.s + ''", "hello"),
        ("[1] + [2, 3]", [1, 2, 3]),
        ("[] + []", []),
        ("inputs.big - inputs.big", 0),
        ("inputs.big * 0", 0),
    ],
)
def test_arithmetic(source: str, expected: Any) -> None:
    assert same(ev(source), expected)


@pytest.mark.parametrize(
    ("source", "kind"),
    [("1 + 2", int), ("1 - 2", int), ("3 * 2", int), ("7 % 2", int), ("6 / 2", float)],
)
def test_only_true_division_turns_ints_into_floats(source: str, kind: type) -> None:
    assert type(ev(source)) is kind


def test_list_concatenation_makes_a_new_list() -> None:
    result = ev("inputs.nums + [4]")
    assert result == [1, 2, 3, 4]
    assert CTX["inputs"]["nums"] == [1, 2, 3]


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ("'a' + 1", ["'+'", "string", "int"]),
        ("1 + 'a'", ["'+'", "int", "string"]),
        ("[1] + 'a'", ["'+'", "list", "string"]),
        ("inputs.obj + inputs.obj", ["'+'", "dict"]),
        ("true + 1", ["'+'", "bool", "int"]),
        ("null + 1", ["'+'", "null", "int"]),
        ("'a' - 'b'", ["'-'", "string"]),
        ("[1] * 3", ["'*'", "list", "int"]),
        ("'ab' * 2", ["'*'", "string", "int"]),
        ("4 / true", ["'/'", "int", "bool"]),
        ("4 % 'x'", ["'%'", "int", "string"]),
        ("1 / 0", ["'/'", "division by zero"]),
        ("1.5 / 0.0", ["'/'", "division by zero"]),
        ("1 % 0", ["'%'", "division by zero"]),
        ("1.0 % 0", ["'%'", "division by zero"]),
        ("inputs.big / 3", ["'/'", "out of range"]),
        ("inputs.big + 0.5", ["'+'", "out of range"]),
        ("-'a'", ["'-'", "string"]),
        ("-true", ["'-'", "bool"]),
        ("-inputs.nothing", ["'-'", "null"]),
    ],
)
def test_arithmetic_errors(source: str, fragments: list[str]) -> None:
    message = eval_error(source)
    for fragment in fragments:
        assert fragment in message


# --- comparison ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 == 1", True),
        ("1 == 1.0", True),
        ("1 == 2", False),
        ("1 != 2", True),
        ("1 != 1.0", False),
        ("'a' == 'a'", True),
        ("'1' == 1", False),
        ("true == 1", False),
        ("1 == true", False),
        ("false == 0", False),
        ("true != 1", True),
        ("true == true", True),
        ("false == false", True),
        ("true == false", False),
        ("null == null", True),
        ("null == false", False),
        ("null == 0", False),
        ("inputs.missing == null", True),
        ("[1, 2] == [1, 2.0]", True),
        ("[1, true] == [1, 1]", False),
        ("[1] == [1, 2]", False),
        ("inputs.obj == inputs.obj", True),
        ("inputs.obj.nested == inputs.obj", False),
        ("inputs.obj == 'v'", False),
        ("steps.lookup.output.status == 200", True),
        ("1 < 2", True),
        ("2 < 1", False),
        ("2 <= 2", True),
        ("2.5 <= 2", False),
        ("3 > 2.5", True),
        ("2 >= 3", False),
        ("'a' < 'b'", True),
        ("'b' <= 'a'", False),
        ("'abc' > 'abb'", True),
        ("'a' >= 'a'", True),
    ],
)
def test_comparisons(source: str, expected: bool) -> None:
    assert ev(source) is expected


def test_dict_equality_ignores_bool_int_confusion() -> None:
    ctx = {"inputs": {"a": {"x": True}, "b": {"x": 1}, "c": {"x": True}, "d": {"y": True}}}
    assert ev("inputs.a == inputs.b", ctx) is False
    assert ev("inputs.a == inputs.c", ctx) is True
    assert ev("inputs.a == inputs.d", ctx) is False


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ("1 < 'a'", ["'<'", "int", "string"]),
        ("'a' <= 1", ["'<='", "string", "int"]),
        ("true > false", ["'>'", "bool"]),
        ("1 >= true", ["'>='", "int", "bool"]),
        ("null < 1", ["'<'", "null", "int"]),
        ("[1] < [2]", ["'<'", "list"]),
        ("inputs.obj > inputs.obj", ["'>'", "dict"]),
    ],
)
def test_ordering_errors(source: str, fragments: list[str]) -> None:
    message = eval_error(source)
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 in [1, 2]", True),
        ("3 in [1, 2]", False),
        ("1.0 in [1, 2]", True),
        ("true in [1, 2]", False),
        ("1 in [true]", False),
        ("[1] in [[1], [2]]", True),
        ("null in [null]", True),
        ("'b.example' in inputs.hosts", True),
        ("'ell' in inputs.s", True),
        ("'' in inputs.s", True),
        ("'xyz' in inputs.s", False),
        ("'k' in inputs.obj", True),
        ("'v' in inputs.obj", False),
        ("3 not in [1, 2]", True),
        ("1 not in [1, 2]", False),
        ("'z' not in 'abc'", True),
        ("'k' not in inputs.obj", False),
        ("1 in []", False),
    ],
)
def test_membership(source: str, expected: bool) -> None:
    assert ev(source) is expected


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ("1 in 'abc'", ["'in'", "int", "string"]),
        ("null in 'abc'", ["'in'", "null", "string"]),
        ("1 in inputs.obj", ["'in'", "int", "dict"]),
        ("'a' in 5", ["'in'", "string", "int", "list, string or dict"]),
        ("'a' in inputs.nothing", ["'in'", "null"]),
        ("'a' not in true", ["'not in'", "bool"]),
        ("1 not in 'abc'", ["'not in'", "int", "string"]),
    ],
)
def test_membership_errors(source: str, fragments: list[str]) -> None:
    message = eval_error(source)
    for fragment in fragments:
        assert fragment in message


# --- logic ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("true and true", True),
        ("true and false", False),
        ("false or true", True),
        ("false or false", False),
        ("1 and 'x'", True),
        ("1 and ''", False),
        ("0 or []", False),
        ("[0] or null", True),
        ("inputs.obj and inputs.nums", True),
        ("not true", False),
        ("not null", True),
        ("not 0", True),
        ("not ''", True),
        ("not []", True),
        ("not [0]", False),
        ("not inputs.obj", False),
        ("not not 3", True),
        ("not not not 3", False),
    ],
)
def test_logic_returns_bools_by_truthiness(source: str, expected: bool) -> None:
    assert ev(source) is expected


@pytest.mark.parametrize(
    "source", ["false and 1 / 0", "true or 1 / 0", "0 and 'a' + 1", "'x' or inputs.n.missing"]
)
def test_logic_short_circuits(source: str) -> None:
    ev(source)  # the right side would raise if it were evaluated


def test_logic_evaluates_the_right_side_when_needed() -> None:
    assert "division by zero" in eval_error("true and 1 / 0")
    assert "division by zero" in eval_error("false or 1 / 0")


# --- precedence ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 * 3 + 1", 7),
        ("10 - 2 - 3", 5),
        ("10 - (2 - 3)", 11),
        ("12 / 2 / 3", 2.0),
        ("2 * 3 % 4", 2),
        ("2 * (3 % 4)", 6),
        ("7 - 4 % 3", 6),
        ("-2 * 3", -6),
        ("2 - -3", 5),
        ("-inputs.obj.nested.deep + 2", -40),
        ("-steps.lookup.output.items[1]", -20),
        ("1 + 2 == 3", True),
        ("2 * 3 > 1 + 4", True),
        ("1 + 1 in [2]", True),
        ("not 1 == 2", True),
        ("not true or true", True),
        ("not (true or true)", False),
        ("true or false and false", True),
        ("(true or false) and false", False),
        ("false and true or true", True),
        ("not false and false", False),
        ("1 < 2 and 2 < 3", True),
        ("1 == 1 or 1 / 0", True),
        ("not 'a' in ['a']", False),
        ("inputs.nums[0] + inputs.nums[2] * 2", 7),
    ],
)
def test_precedence(source: str, expected: Any) -> None:
    assert same(ev(source), expected)


# --- parse errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "position", "fragments"),
    [
        ("foo", 0, ["unknown name 'foo'", "inputs", "steps"]),
        ("inputs.a == bar", 12, ["unknown name 'bar'", "inputs and steps"]),
        ("True", 0, ["unknown name 'True'", "'true'"]),
        ("None", 0, ["'null'"]),
        ("", 0, ["expected an expression", "end of the expression"]),
        ("   ", 3, ["expected an expression"]),
        ("1 +", 3, ["expected an expression"]),
        ("1 + * 2", 4, ["expected an expression", "'*'"]),
        ("and", 0, ["expected an expression", "'and'"]),
        ("inputs.a in", 11, ["expected an expression"]),
        ("(1 + 2", 6, ["expected ')'", "'(' at position 0"]),
        ("[1, 2", 5, ["expected ']'", "'[' at position 0"]),
        ("[1 2]", 3, ["expected ']'", "'2'"]),
        ("inputs.hosts[0", 14, ["expected ']'", "'[' at position 12"]),
        ("inputs.", 7, ["expected a name after '.'"]),
        ("inputs.3", 7, ["expected a name after '.'", "'3'"]),
        ("inputs.'a'", 7, ["expected a name after '.'"]),
        ("1 2", 2, ["expected the end of the expression", "'2'"]),
        ("inputs.a inputs.b", 9, ["expected the end"]),
        ("1 = 1", 2, ["unexpected character '='", "'=='"]),
        ("!true", 0, ["unexpected character '!'", "'not'"]),
        ("true && false", 5, ["'&'", "'and'"]),
        ("true || false", 5, ["'|'", "'or'"]),
        ("inputs.a ${x}", 9, ["'$'"]),
        ("{}", 0, ["unexpected character '{'"]),
        ("inputs.é", 7, ["unexpected character"]),
        ("1 ** 2", 3, ["expected an expression", "'*'"]),
        ("'open", 0, ["unterminated string"]),
        ('x + "open', 4, ["unterminated string"]),
        ("'ends with backslash\\", 0, ["unterminated string"]),
        (r"'bad \q escape'", 5, ["unknown escape '\\q'"]),
        ("3abc", 0, ["invalid number '3a'"]),
        ("1e", 0, ["invalid number"]),
        ("1_000", 0, ["invalid number"]),
        ("9" * 5000, 0, ["number is too long"]),
        ("1e999", 0, ["number is out of range"]),
        ("1 < 2 < 3", 6, ["cannot be chained", "'and'"]),
        ("1 == 1 == true", 7, ["cannot be chained"]),
        ("1 in [1] == true", 9, ["cannot be chained"]),
        ("1 not in [] not in []", 12, ["cannot be chained"]),
        ("not in [1]", 4, ["expected an expression", "'in'"]),
        ("inputs.a not 1", 9, ["expected the end"]),
    ],
)
def test_parse_errors(source: str, position: int, fragments: list[str]) -> None:
    error = parse_error(source)
    assert error.position == position
    for fragment in fragments:
        assert fragment in error.message
    assert error.message in str(error)
    assert f"position {position}" in str(error)


def test_every_other_name_is_rejected() -> None:
    for name in ("input", "step", "env", "self", "os", "__import__", "output"):
        assert "unknown name" in parse_error(f"{name}.x").message
    assert ROOT_NAMES == ("inputs", "steps")


def test_nesting_is_bounded() -> None:
    assert parse("(" * 20 + "1" + ")" * 20).evaluate(CTX) == 1
    nested: list[Any] = []
    for _ in range(19):
        nested = [nested]
    assert parse("[" * 20 + "]" * 20).evaluate(CTX) == nested
    error = parse_error("(" * 25 + "1" + ")" * 25)
    assert (error.message, error.position) == ("expression is too deeply nested", 20)
    assert "too deeply nested" in parse_error("[" * 25 + "]" * 25).message
    assert "too deeply nested" in parse_error("inputs" + "[inputs" * 25 + "]" * 25).message


def test_long_chains_are_bounded() -> None:
    assert ev(" + ".join(["1"] * 90)) == 90
    assert ev("inputs" + ".x" * 90) is None
    assert ev("not " * 90 + "true") is True
    for source in (" + ".join(["1"] * 2000), "inputs" + ".x" * 2000, "not " * 2000 + "true"):
        assert "too deeply nested" in parse_error(source).message
    assert parse_error("-" * 2000 + "inputs.n").position == 0


def test_a_non_string_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError, match="string"):
        parse(True)  # type: ignore[arg-type]


def test_errors_are_value_errors_and_pickle() -> None:
    error = parse_error("1 +")
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.position, str(copy)) == (error.message, error.position, str(error))
    problems = (("with.a", "bad"), ("with.b", "worse"))
    template_error = pickle.loads(pickle.dumps(TemplateError(problems)))
    assert template_error.problems == problems
    assert issubclass(EvaluationError, ValueError)
    assert issubclass(TemplateError, ValueError)


# --- the `${ ... }` wrapping of a condition ------------------------------------------------


def test_a_condition_may_be_wrapped_whole() -> None:
    expression = parse("${ steps.lookup.output.status == 200 }")
    assert expression.evaluate(CTX) is True
    assert expression.source == "${ steps.lookup.output.status == 200 }"
    assert expression.references() == {("steps", "lookup", "output", "status")}
    assert parse("  ${inputs.n}\n").evaluate(CTX) == 7
    assert parse("${ inputs.obj['}'] }").evaluate(CTX) is None


def test_positions_in_a_wrapped_condition_point_into_the_source() -> None:
    assert parse_error("${ foo }").position == 3
    assert parse_error("${}").position == 2


@pytest.mark.parametrize("source", ["${inputs.n} == ${inputs.n}", "${inputs.n", "x${inputs.n}"])
def test_only_a_whole_wrapping_is_unwrapped(source: str) -> None:
    error = parse_error(source)
    assert source[error.position] in "$x"


def test_expressions_compare_by_source() -> None:
    assert parse("1 + 2") == parse("1 + 2")
    assert parse("1 + 2") != parse("1+2")
    assert hash(parse("1 + 2")) == hash(parse("1 + 2"))
    assert isinstance(parse("1"), Expression)
    assert parse("inputs.n").source == "inputs.n"


# --- references ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("steps.lookup.output.status == 200", {("steps", "lookup", "output", "status")}),
        ("inputs.hosts[steps.a.output.i]", {("inputs", "hosts"), ("steps", "a", "output", "i")}),
        ("inputs.hosts[0]", {("inputs", "hosts", "0")}),
        ("inputs.hosts[-1]", {("inputs", "hosts", "-1")}),
        ("inputs['a-b'].c", {("inputs", "a-b", "c")}),
        ('steps["lookup"]["output"]', {("steps", "lookup", "output")}),
        ("inputs.a[1 + 1].b", {("inputs", "a")}),
        ("inputs.a[true].b", {("inputs", "a")}),
        ("inputs.a[1.5]", {("inputs", "a")}),
        ("inputs.a[null]", {("inputs", "a")}),
        ("inputs.a[inputs.b[inputs.c]]", {("inputs", "a"), ("inputs", "b"), ("inputs", "c")}),
        ("inputs", {("inputs",)}),
        ("steps", {("steps",)}),
        ("1 + 2", set()),
        ("[1, 2][0]", set()),
        ("[inputs.x][0].y", {("inputs", "x")}),
        ("(inputs.a).b", {("inputs", "a", "b")}),
        ("inputs.a and not inputs.b or -inputs.c", {("inputs", c) for c in "abc"}),
        ("[inputs.a, steps.s.output] + []", {("inputs", "a"), ("steps", "s", "output")}),
        ("inputs.a.b == inputs.a.b", {("inputs", "a", "b")}),
        ("inputs.a.b + inputs.a", {("inputs", "a", "b"), ("inputs", "a")}),
    ],
)
def test_references(source: str, expected: set[tuple[str, ...]]) -> None:
    references = parse(source).references()
    assert isinstance(references, frozenset)
    assert references == expected


# --- templates -----------------------------------------------------------------------------


def test_a_static_template_renders_an_equal_fresh_value() -> None:
    value = {"a": [1, 2.5, {"b": None}], "c": "plain $ text {}", "d": True, "e": "$x $ {y}"}
    template = compile_template(value)
    assert template.is_static
    assert template.references() == frozenset()
    first = template.render(CTX)
    assert same(first, value)
    first["a"].append("mutated")
    first["a"][2]["b"] = "mutated"
    assert same(template.render(CTX), value)
    assert same(value["a"], [1, 2.5, {"b": None}])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${inputs.n}", 7),
        ("${inputs.f}", 2.5),
        ("${inputs.flag}", True),
        ("${inputs.nothing}", None),
        ("${inputs.missing}", None),
        ("${inputs.obj}", {"k": "v", "nested": {"deep": 42}}),
        ("${inputs.nums}", [1, 2, 3]),
        ("${ inputs.n * 2 }", 14),
        ("${'}'}", "}"),
        ("${inputs.s}", "hello"),
    ],
)
def test_a_lone_expression_keeps_its_type(text: str, expected: Any) -> None:
    template = compile_template({"x": text})
    assert not template.is_static
    assert same(template.render(CTX), {"x": expected})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n=${inputs.n}", "n=7"),
        ("${inputs.n} ", "7 "),
        (" ${inputs.n}", " 7"),
        ("${inputs.n}${inputs.n}", "77"),
        ("${inputs.s}/${inputs.n}/${inputs.f}", "hello/7/2.5"),
        ("${6 / 3}!", "2.0!"),
        ("[${inputs.flag}|${false}|${inputs.nothing}|${inputs.missing}]", "[true|false|null|null]"),
        ("${inputs.nums}.", "[1,2,3]."),
        ("${inputs.obj}.", '{"k":"v","nested":{"deep":42}}.'),
        ("${['é', 'a b']}.", '["é","a b"].'),
        ("${inputs.empty}${inputs.empty}", ""),
        ("http://${inputs.hosts[0]}:${8000 + inputs.n}/x", "http://a.example:8007/x"),
    ],
)
def test_interpolation_renders_text(text: str, expected: str) -> None:
    assert compile_template(text).render(CTX) == expected


@pytest.mark.parametrize(
    ("text", "expected", "static"),
    [
        ("$${inputs.n}", "${inputs.n}", True),
        ("cost: $${x} and ${inputs.n}", "cost: ${x} and 7", False),
        ("$$${inputs.n}", "$${inputs.n}", True),
        ("$${", "${", True),
        ("a $${ b $${ c", "a ${ b ${ c", True),
        ("${inputs.n}$${}", "7${}", False),
        ("$$", "$$", True),
        ("$ {inputs.n}", "$ {inputs.n}", True),
        ("{inputs.n}", "{inputs.n}", True),
    ],
)
def test_dollar_escapes(text: str, expected: str, static: bool) -> None:
    template = compile_template(text)
    assert template.render(CTX) == expected
    assert template.is_static is static


def test_dict_keys_are_not_templated() -> None:
    template = compile_template({"${inputs.s}": "${inputs.s}"})
    assert template.render(CTX) == {"${inputs.s}": "hello"}
    assert template.references() == {("inputs", "s")}


def test_template_references_cover_every_string() -> None:
    template = compile_template(
        {
            "url": "http://${inputs.hosts[0]}/${steps.lookup.output.body.id}",
            "argv": ["run", "${inputs.hosts[steps.a.output.i]}"],
            "headers": {"X-Id": "${steps.lookup.output.status}"},
            "plain": "$${inputs.ignored}",
        }
    )
    assert template.references() == {
        ("inputs", "hosts", "0"),
        ("steps", "lookup", "output", "body", "id"),
        ("inputs", "hosts"),
        ("steps", "a", "output", "i"),
        ("steps", "lookup", "output", "status"),
    }


def test_templates_accept_any_json_top_level() -> None:
    assert compile_template("${inputs.n}").render(CTX) == 7
    assert compile_template(["${inputs.n}", 1]).render(CTX) == [7, 1]
    assert compile_template(3).render(CTX) == 3
    assert compile_template(None).render(CTX) is None
    assert compile_template(("${inputs.n}",)).render(CTX) == [7]


def test_rendering_does_not_share_the_template_containers() -> None:
    template = compile_template({"list": [1, "${inputs.n}"], "dict": {"a": 1}})
    first = template.render(CTX)
    second = template.render(CTX)
    assert first == second
    assert first["list"] is not second["list"]
    assert first["dict"] is not second["dict"]


def test_every_template_problem_is_collected_with_its_path() -> None:
    with pytest.raises(TemplateError) as info:
        compile_template(
            {
                "url": "http://${foo}/x",
                "argv": ["ok ${inputs.n}", "${1 +}", "fine"],
                "headers": {"X-Id": "${inputs.id", "X-Ok": "${inputs.n}"},
                "two": "${(} and ${)}",
                "deep": [{"a.b": ["${'unterminated}"]}],
                "odd": {1: "x", "": "${x}"},
                "set": {1, 2},
            }
        )
    problems = info.value.problems
    assert [path for path, _ in problems] == [
        "with.url",
        "with.argv[1]",
        "with.headers.X-Id",
        "with.two",
        "with.two",
        'with.deep[0]["a.b"][0]',
        "with.odd.1",
        'with.odd[""]',
        "with.set",
    ]
    messages = dict(problems)
    assert "unknown name 'foo'" in messages["with.url"]
    assert "position 9" in messages["with.url"]
    assert "expected an expression" in messages["with.argv[1]"]
    assert "position 5" in messages["with.argv[1]"]
    assert "unterminated '${'" in messages["with.headers.X-Id"]
    assert "position 0" in messages["with.headers.X-Id"]
    assert "unterminated" in messages['with.deep[0]["a.b"][0]']
    assert "key must be a string" in messages["with.odd.1"]
    assert "not a JSON value: set" in messages["with.set"]
    assert "with.url" in str(info.value)
    assert "with.set" in str(info.value)


def test_problem_paths_start_from_the_given_path() -> None:
    with pytest.raises(TemplateError) as info:
        compile_template({"a": ["${x}"]}, path="steps[2].with")
    assert info.value.problems[0][0] == "steps[2].with.a[0]"


def test_render_errors_name_the_path_and_expression() -> None:
    template = compile_template({"url": "http://${inputs.s + 1}", "n": "${inputs.n.x}"})
    with pytest.raises(EvaluationError) as info:
        template.render(CTX)
    message = str(info.value)
    assert message.startswith("with.url: ")
    assert "'+'" in message
    assert "string" in message
    assert "int" in message
    assert "inputs.s + 1" in message
    with pytest.raises(EvaluationError, match=r"^with\.n: "):
        compile_template({"n": "${inputs.n.x}"}).render(CTX)


@pytest.mark.parametrize(
    "value",
    [{"x": object()}, {"x": b"bytes"}, {"x": {"y": object()}}, [1, object()]],
)
def test_unrenderable_values_are_evaluation_errors(value: Any) -> None:
    template = compile_template("text ${inputs.v}")
    with pytest.raises(EvaluationError, match="cannot render"):
        template.render({"inputs": {"v": value}})


def test_ints_beyond_pythons_text_limit_are_evaluation_errors() -> None:
    ctx = {"inputs": {"huge": 10**5000}}
    assert compile_template("${inputs.big}!").render(CTX) == f"{10**400}!"
    with pytest.raises(EvaluationError, match="cannot render int"):
        compile_template("${inputs.huge}!").render(ctx)
    with pytest.raises(EvaluationError, match="cannot render list"):
        compile_template("${[inputs.huge]}!").render(ctx)
    assert compile_template("${inputs.huge}").render(ctx) == 10**5000


def test_templates_compare_by_content() -> None:
    assert compile_template({"a": "${inputs.n}"}) == compile_template({"a": "${inputs.n}"})
    assert compile_template({"a": "${inputs.n}"}) != compile_template({"a": "${inputs.f}"})


# --- properties ----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text().filter(lambda s: "${" not in s)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_values_without_expressions_render_unchanged(value: Any) -> None:
    template = compile_template(value)
    assert template.is_static
    assert same(template.render({}), value)


OPS = {"+": 1, "-": 1, "*": 2, "%": 2}


def arithmetic_trees(depth: int = 4) -> st.SearchStrategy[Any]:
    leaves = st.integers(min_value=-1000, max_value=1000)
    return st.recursive(
        leaves,
        lambda sub: st.tuples(st.sampled_from(sorted(OPS)), sub, sub),
        max_leaves=12,
    )


def python_value(tree: Any) -> int:
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a, b = python_value(left), python_value(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a % b


def minimal_source(tree: Any) -> str:
    """Parenthesised only where precedence and left-associativity demand it."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    left_src, right_src = minimal_source(left), minimal_source(right)
    if isinstance(left, tuple) and OPS[left[0]] < OPS[op]:
        left_src = f"({left_src})"
    if isinstance(right, tuple) and OPS[right[0]] <= OPS[op]:
        right_src = f"({right_src})"
    return f"{left_src} {op} {right_src}"


@given(arithmetic_trees())
def test_integer_arithmetic_agrees_with_python(tree: Any) -> None:
    source = minimal_source(tree)
    try:
        expected = python_value(tree)
    except ZeroDivisionError:
        with pytest.raises(EvaluationError, match="division by zero"):
            parse(source).evaluate({})
        return
    result = parse(source).evaluate({})
    assert type(result) is int
    assert result == expected


@given(st.integers(), st.integers(), st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
def test_integer_comparisons_agree_with_python(a: int, b: int, op: str) -> None:
    expected = {
        "<": a < b,
        "<=": a <= b,
        ">": a > b,
        ">=": a >= b,
        "==": a == b,
        "!=": a != b,
    }[op]
    ctx = {"inputs": {"a": a, "b": b}}
    assert parse(f"inputs.a {op} inputs.b").evaluate(ctx) is expected


@given(st.text())
def test_string_literals_round_trip(text: str) -> None:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    assert parse(f"'{escaped}'").evaluate({}) == text
    assert compile_template(f"${{'{escaped}'}}").render({}) == text


GRAMMAR_PIECES = [*"0123456789.,[]()'\"\\+-*/%<>=! \n$}{", "inputs", "steps", "and", "or"]
GRAMMAR_PIECES += ["not", "in", "true", "false", "null", "x", "e", "${", "1.5", "'a'", " not in "]
GRAMMAR_ALPHABET = st.sampled_from(GRAMMAR_PIECES)
random_sources = st.text() | st.lists(GRAMMAR_ALPHABET, max_size=30).map("".join)


def parsed_or_error(source: str) -> Expression | ExpressionError:
    try:
        return parse(source)
    except ExpressionError as error:
        return error


def compiled_or_error(text: str) -> Template | TemplateError:
    try:
        return compile_template({"x": text})
    except TemplateError as error:
        return error


@given(random_sources)
def test_parsing_random_text_fails_only_with_expression_errors(source: str) -> None:
    result = parsed_or_error(source)
    if isinstance(result, ExpressionError):
        assert 0 <= result.position <= len(source)
    else:
        with contextlib.suppress(EvaluationError):
            result.evaluate(CTX)


@given(random_sources)
def test_compiling_random_text_fails_only_with_template_errors(text: str) -> None:
    result = compiled_or_error(text)
    if isinstance(result, TemplateError):
        assert result.problems
        assert all(path == "with.x" for path, _ in result.problems)
    else:
        with contextlib.suppress(EvaluationError):
            result.render(CTX)
