"""Process definitions (CONTRACT.md, "Process definitions"): parsing, every problem reported with
its path, the references a step may make, durations, inputs, and restartability as dispatched."""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from paceline_contracts.messages import ActivityError
from paceline_engine.definitions import (
    ActivityStep,
    ConditionStep,
    Definition,
    DefinitionError,
    ParallelStep,
    Problem,
    RetryPolicy,
    parse_definition,
    parse_duration,
    resolve_inputs,
)
from paceline_engine.machine import ActivityFailed, Dispatch, Start, apply, new_instance

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

# The example of CONTRACT.md, verbatim.
CONTRACT_EXAMPLE: dict[str, Any] = {
    "name": "add-device",
    "inputs": {"host": {"type": "string"}, "dry_run": {"type": "boolean", "default": False}},
    "steps": [
        {
            "id": "lookup",
            "type": "http.request",
            "with": {"method": "GET", "url": "http://127.0.0.1:9000/devices/${inputs.host}"},
        },
        {
            "id": "known",
            "if": "steps.lookup.output.status == 200",
            "then": [{"id": "note", "type": "noop", "with": {"msg": "already there"}}],
            "else": [
                {
                    "id": "add",
                    "type": "shell.command",
                    "with": {"argv": ["add-device", "${inputs.host}"]},
                    "restartable": False,
                    "timeout": "30s",
                    "retry": {"max_attempts": 3, "backoff": "2s"},
                }
            ],
        },
        {
            "id": "both",
            "parallel": [
                [{"id": "a", "type": "sleep", "with": {"seconds": 1}}],
                [{"id": "b", "type": "noop", "with": {"x": "${inputs.host}"}}],
            ],
        },
    ],
}


def definition(*steps: dict[str, Any], inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {"name": "t", "steps": list(steps)}
    if inputs is not None:
        raw["inputs"] = inputs
    return raw


def noop(step_id: str, **params: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "noop", "with": params}


def problems_of(raw: Any) -> list[Problem]:
    with pytest.raises(DefinitionError) as info:
        parse_definition(raw)
    assert info.value.problems, "a DefinitionError always lists its problems"
    return list(info.value.problems)


def paths_of(raw: Any) -> list[str]:
    return [p.path for p in problems_of(raw)]


def only_problem(raw: Any) -> Problem:
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    return problems[0]


# --- the contract's example ----------------------------------------------------------------


def test_the_contract_example_parses_into_typed_steps() -> None:
    d = parse_definition(copy.deepcopy(CONTRACT_EXAMPLE), version=4)

    assert isinstance(d, Definition)
    assert (d.name, d.version) == ("add-device", 4)
    assert [s.id for s in d.walk()] == ["lookup", "known", "note", "add", "both", "a", "b"]
    assert d.inputs["host"].required
    assert d.inputs["host"].type == "string"
    assert not d.inputs["dry_run"].required
    assert d.inputs["dry_run"].default is False

    lookup, known, both = d.steps
    assert isinstance(lookup, ActivityStep)
    assert lookup.type == "http.request"
    assert isinstance(known, ConditionStep)
    assert known.condition.source == "steps.lookup.output.status == 200"
    assert [s.id for s in known.then] == ["note"]
    assert [s.id for s in known.otherwise] == ["add"]
    assert isinstance(both, ParallelStep)
    assert [[s.id for s in branch] for branch in both.branches] == [["a"], ["b"]]

    add = d.activity("add")
    assert add.type == "shell.command"
    assert add.restartable_override is False
    assert add.timeout_s == 30.0
    assert add.retry == RetryPolicy(max_attempts=3, backoff_s=2.0)
    assert d.activity("note").retry == RetryPolicy(max_attempts=1, backoff_s=0.0)
    assert d.activity("note").timeout_s is None
    assert d.activity("note").restartable_override is None


def test_parsing_does_not_change_what_it_was_given() -> None:
    raw = copy.deepcopy(CONTRACT_EXAMPLE)
    parse_definition(raw)
    assert raw == CONTRACT_EXAMPLE


def test_the_contract_example_renders_its_first_dispatch() -> None:
    d = parse_definition(copy.deepcopy(CONTRACT_EXAMPLE))
    inputs = resolve_inputs(d, {"host": "sw1"})
    t = apply(d, new_instance(inputs), Start(), NOW)
    assert t.decisions == [
        Dispatch(
            step="lookup",
            activity_type="http.request",
            params={"method": "GET", "url": "http://127.0.0.1:9000/devices/sw1"},
            attempt=1,
            restartable=True,
            timeout_s=None,
        )
    ]


# --- each kind of problem, with its path -----------------------------------------------------


def test_a_definition_must_be_an_object() -> None:
    assert paths_of(["not", "an", "object"]) == [""]


@pytest.mark.parametrize("name", [None, "", "Upper", "-lead", "has space", "x" * 101, 7])
def test_a_bad_name_is_reported_at_name(name: Any) -> None:
    raw = definition(noop("a"))
    raw["name"] = name
    assert paths_of(raw) == ["name"]


@pytest.mark.parametrize("steps", [None, [], "steps", {"id": "a"}])
def test_steps_must_be_a_non_empty_list(steps: Any) -> None:
    raw = {"name": "t", "steps": steps}
    assert paths_of(raw) == ["steps"]


def test_a_missing_steps_list_is_reported() -> None:
    assert paths_of({"name": "t"}) == ["steps"]


def test_an_unknown_activity_type_is_reported_at_its_type() -> None:
    p = only_problem(definition(noop("a"), {"id": "b", "type": "telepathy", "with": {}}))
    assert p.path == "steps[1].type"
    assert "telepathy" in p.message
    assert "unknown activity type" in p.message


def test_an_unknown_type_deep_in_a_branch_has_the_full_path() -> None:
    raw = definition(
        {
            "id": "c",
            "if": "true",
            "then": [],
            "else": [{"id": "p", "parallel": [[noop("x")], [{"id": "y", "type": "nope"}]]}],
        }
    )
    assert paths_of(raw) == ["steps[0].else[0].parallel[1][0].type"]


@pytest.mark.parametrize(
    "step",
    [
        {"id": "a"},
        {"id": "a", "type": "noop", "if": "true"},
        {"id": "a", "if": "true", "parallel": [[noop("b")]]},
    ],
)
def test_a_step_has_exactly_one_kind(step: dict[str, Any]) -> None:
    p = only_problem(definition(step))
    assert p.path == "steps[0]"
    assert "exactly one" in p.message


@pytest.mark.parametrize("step", ["noop", 3, None, ["a"]])
def test_a_step_must_be_an_object(step: Any) -> None:
    assert paths_of(definition(step)) == ["steps[0]"]


@pytest.mark.parametrize("step_id", [None, "", "9lives", "has-dash", "a.b", "x" * 65, 3])
def test_a_bad_step_id_is_reported_at_its_id(step_id: Any) -> None:
    assert paths_of(definition({"id": step_id, "type": "noop"})) == ["steps[0].id"]


def test_a_duplicate_id_names_both_places() -> None:
    p = only_problem(definition(noop("a"), noop("b"), noop("a")))
    assert p.path == "steps[2].id"
    assert "'a'" in p.message
    assert "steps[0]" in p.message


def test_a_duplicate_id_across_kinds_and_depths_names_both_places() -> None:
    raw = definition(
        {"id": "p", "parallel": [[noop("x")], [noop("y")]]},
        {"id": "c", "if": "true", "then": [noop("p")], "else": [noop("x")]},
    )
    problems = problems_of(raw)
    assert sorted((p.path, p.message) for p in problems) == sorted(
        [
            ("steps[1].then[0].id", "duplicate step id 'p' (also at steps[0])"),
            ("steps[1].else[0].id", "duplicate step id 'x' (also at steps[0].parallel[0][0])"),
        ]
    )


def assert_reference_refused(raw: dict[str, Any], path: str, *words: str) -> None:
    p = only_problem(raw)
    assert p.path == path
    for word in words:
        assert word in p.message, p


def test_a_reference_to_a_later_step_is_refused() -> None:
    raw = definition(noop("a", x="${steps.b.output}"), noop("b"))
    assert_reference_refused(raw, "steps[0].with.x", "steps.b.output", "'b'")


def test_a_reference_to_a_later_step_from_an_if_is_refused() -> None:
    raw = definition({"id": "c", "if": "steps.b.output == 1", "then": [noop("a")]}, noop("b"))
    assert_reference_refused(raw, "steps[0].if", "'b'")


def test_a_reference_to_a_step_in_a_sibling_parallel_branch_is_refused() -> None:
    raw = definition({"id": "p", "parallel": [[noop("a")], [noop("b", x="${steps.a.output.v}")]]})
    assert_reference_refused(raw, "steps[0].parallel[1][0].with.x", "'a'")


def test_a_reference_to_the_other_branch_of_a_condition_is_refused() -> None:
    raw = definition(
        {"id": "c", "if": "true", "then": [noop("a")], "else": [noop("b", x="${steps.a.output}")]}
    )
    assert_reference_refused(raw, "steps[0].else[0].with.x", "'a'")


def test_an_if_cannot_read_a_step_of_its_own_branches() -> None:
    raw = definition({"id": "c", "if": "steps.a.output == 1", "then": [noop("a")]})
    assert_reference_refused(raw, "steps[0].if", "'a'")


def test_a_step_cannot_read_its_own_output() -> None:
    raw = definition(noop("a", x="${steps.a.output}"))
    assert_reference_refused(raw, "steps[0].with.x", "own output")


def test_a_condition_cannot_read_its_own_output() -> None:
    raw = definition({"id": "c", "if": "steps.c.output", "then": [noop("a")]})
    assert_reference_refused(raw, "steps[0].if", "own output")


def test_a_reference_to_an_unknown_input_is_refused() -> None:
    raw = definition(noop("a", x="${inputs.hots}"), inputs={"host": {"type": "string"}})
    assert_reference_refused(raw, "steps[0].with.x", "inputs.hots", "'hots'")


def test_an_if_reading_an_unknown_input_is_refused() -> None:
    raw = definition({"id": "c", "if": "inputs.n > 1", "then": [noop("a")]})
    assert_reference_refused(raw, "steps[0].if", "'n'")


def test_a_reference_to_a_condition_step_is_refused() -> None:
    raw = definition(
        {"id": "c", "if": "true", "then": [noop("a")]}, noop("b", x="${steps.c.output}")
    )
    assert_reference_refused(raw, "steps[1].with.x", "'c'", "not an activity")


def test_a_reference_to_a_parallel_step_is_refused() -> None:
    raw = definition({"id": "p", "parallel": [[noop("a")]]}, noop("b", x="${steps.p.output}"))
    assert_reference_refused(raw, "steps[1].with.x", "'p'", "not an activity")


def test_a_step_exposes_only_its_output() -> None:
    raw = definition(noop("a"), noop("b", x="${steps.a.status}"))
    assert_reference_refused(raw, "steps[1].with.x", "only 'output'")


def test_steps_alone_must_name_a_step() -> None:
    raw = definition(noop("a"), noop("b", x="${steps}"))
    assert_reference_refused(raw, "steps[1].with.x", "name a step")


@pytest.mark.parametrize(
    "source", ["", "1 +", "inputs.x ==", "a < b < c", "import os", "inputs[", "(1"]
)
def test_a_bad_expression_in_if_is_reported_at_if(source: str) -> None:
    p = only_problem(
        definition(
            {"id": "c", "if": source, "then": [noop("a")]}, inputs={"x": {"type": "integer"}}
        )
    )
    assert p.path == "steps[0].if"


@pytest.mark.parametrize("source", [None, 1, True, ["x"]])
def test_an_if_must_be_a_string(source: Any) -> None:
    p = only_problem(definition({"id": "c", "if": source, "then": [noop("a")]}))
    assert p.path == "steps[0].if"


@pytest.mark.parametrize("text", ["${1 +}", "${", "pre ${inputs.x ==} post", "${eval('1')}"])
def test_a_bad_expression_in_with_is_reported_at_its_field(text: str) -> None:
    raw = definition(noop("a", ok="fine", bad=text), inputs={"x": {"type": "integer"}})
    assert paths_of(raw) == ["steps[0].with.bad"]


def test_a_bad_expression_nested_in_with_has_the_nested_path() -> None:
    raw = definition(noop("a", outer={"list": ["ok", "${)}"]}))
    assert paths_of(raw) == ["steps[0].with.outer.list[1]"]


def test_one_bad_field_of_with_does_not_hide_the_others() -> None:
    raw = definition(noop("a", one="${1 +}", two="${steps.zz.output}", three="${inputs.q}"))
    assert sorted(paths_of(raw)) == [
        "steps[0].with.one",
        "steps[0].with.three",
        "steps[0].with.two",
    ]


@pytest.mark.parametrize("value", [["x"], "params", 3])
def test_with_must_be_an_object(value: Any) -> None:
    assert paths_of(definition({"id": "a", "type": "noop", "with": value})) == ["steps[0].with"]


@pytest.mark.parametrize("timeout", ["abc", "-1s", -1, 0, "0s", True, "10d", "1 h", [1], {}])
def test_a_bad_timeout_is_reported_at_timeout(timeout: Any) -> None:
    raw = definition({"id": "a", "type": "noop", "timeout": timeout})
    assert paths_of(raw) == ["steps[0].timeout"]


@pytest.mark.parametrize(
    ("retry", "path"),
    [
        ("3 times", "steps[0].retry"),
        ([3], "steps[0].retry"),
        ({"max_attempts": 0}, "steps[0].retry.max_attempts"),
        ({"max_attempts": 101}, "steps[0].retry.max_attempts"),
        ({"max_attempts": "3"}, "steps[0].retry.max_attempts"),
        ({"max_attempts": 2.5}, "steps[0].retry.max_attempts"),
        ({"max_attempts": True}, "steps[0].retry.max_attempts"),
        ({"max_attempts": 2, "backoff": "soon"}, "steps[0].retry.backoff"),
        ({"max_attempts": 2, "backoff": -1}, "steps[0].retry.backoff"),
        ({"max_attempts": 2, "tries": 3}, "steps[0].retry.tries"),
    ],
)
def test_a_bad_retry_is_reported_at_its_part(retry: Any, path: str) -> None:
    raw = definition({"id": "a", "type": "noop", "retry": retry})
    assert paths_of(raw) == [path]


@pytest.mark.parametrize(
    ("retry", "expected"),
    [
        ({"max_attempts": 1}, RetryPolicy(1, 0.0)),
        ({"max_attempts": 100, "backoff": "500ms"}, RetryPolicy(100, 0.5)),
        ({"max_attempts": 3, "backoff": 2}, RetryPolicy(3, 2.0)),
        ({"backoff": "1m"}, RetryPolicy(1, 60.0)),
        ({}, RetryPolicy(1, 0.0)),
        (None, RetryPolicy(1, 0.0)),
    ],
)
def test_a_good_retry_is_parsed(retry: Any, expected: RetryPolicy) -> None:
    d = parse_definition(definition({"id": "a", "type": "noop", "retry": retry}))
    assert d.activity("a").retry == expected


@pytest.mark.parametrize("backoff", [0, "0s", "0ms"])
def test_a_zero_backoff_is_allowed(backoff: Any) -> None:
    d = parse_definition(
        definition({"id": "a", "type": "noop", "retry": {"max_attempts": 3, "backoff": backoff}})
    )
    assert d.activity("a").retry == RetryPolicy(3, 0.0)


def test_a_bad_restartable_is_reported() -> None:
    raw = definition({"id": "a", "type": "noop", "restartable": "yes"})
    assert paths_of(raw) == ["steps[0].restartable"]


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({**definition(noop("a")), "owner": "me"}, "owner"),
        (definition({"id": "a", "type": "noop", "retries": 3}), "steps[0].retries"),
        (definition({"id": "c", "if": "true", "then": [], "elif": []}), "steps[0].elif"),
        (definition({"id": "p", "parallel": [[noop("a")]], "join": "all"}), "steps[0].join"),
        (
            definition(noop("a"), inputs={"x": {"type": "string", "required": True}}),
            "inputs.x.required",
        ),
    ],
)
def test_an_unknown_field_is_reported_where_it_is(raw: dict[str, Any], path: str) -> None:
    p = only_problem(raw)
    assert p.path == path
    assert "unknown field" in p.message


def test_a_description_is_allowed_everywhere() -> None:
    parse_definition(
        {
            "name": "t",
            "description": "d",
            "inputs": {"x": {"type": "string", "description": "d"}},
            "steps": [
                {"id": "a", "type": "noop", "description": "d"},
                {"id": "c", "if": "true", "then": [], "description": "d"},
                {"id": "p", "parallel": [[noop("b")]], "description": "d"},
            ],
        }
    )


@pytest.mark.parametrize(
    ("inputs", "path"),
    [
        ("x", "inputs"),
        ({"x": {"type": "text"}}, "inputs.x"),
        ({"x": "string"}, "inputs.x"),
        ({"x": {}}, "inputs.x"),
        ({"bad-name": {"type": "string"}}, "inputs.bad-name"),
        ({"n": {"type": "integer", "default": "3"}}, "inputs.n.default"),
        ({"n": {"type": "integer", "default": True}}, "inputs.n.default"),
        ({"b": {"type": "boolean", "default": 0}}, "inputs.b.default"),
    ],
)
def test_a_bad_input_declaration_is_reported(inputs: Any, path: str) -> None:
    assert paths_of(definition(noop("a"), inputs=inputs)) == [path]


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"id": "s", "type": "sleep", "with": {}}, "seconds"),
        ({"id": "s", "type": "sleep"}, "seconds"),
        ({"id": "s", "type": "sleep", "with": {"seconds": -1}}, "seconds"),
        ({"id": "s", "type": "sleep", "with": {"seconds": "long"}}, "seconds"),
        ({"id": "s", "type": "sleep", "with": {"seconds": 1, "minutes": 2}}, "minutes"),
        ({"id": "s", "type": "http.request", "with": {"url": "ftp://x/y"}}, "url"),
        ({"id": "s", "type": "http.request", "with": {"url": "127.0.0.1:80"}}, "url"),
        ({"id": "s", "type": "http.request", "with": {}}, "url"),
        (
            {"id": "s", "type": "http.request", "with": {"url": "http://x", "method": "FETCH"}},
            "method",
        ),
        ({"id": "s", "type": "shell.command", "with": {}}, "argv"),
        ({"id": "s", "type": "shell.command", "with": {"argv": []}}, "argv"),
        ({"id": "s", "type": "shell.command", "with": {"argv": "ls -l"}}, "argv"),
        ({"id": "s", "type": "shell.command", "with": {"argv": ["ls"], "shell": True}}, "shell"),
    ],
)
def test_bad_params_for_a_type_are_reported(step: dict[str, Any], field: str) -> None:
    """The path names the parameter itself; the message is pydantic's, about that value."""
    problems = problems_of(definition(step))
    assert [p.path for p in problems] == [f"steps[0].with.{field}"]
    assert problems[0].message


@pytest.mark.parametrize(
    "step",
    [
        {"id": "s", "type": "sleep", "with": {"seconds": "${inputs.n}"}},
        {"id": "s", "type": "http.request", "with": {"url": "${inputs.url}"}},
        {"id": "s", "type": "http.request", "with": {"url": "http://x", "method": "${inputs.m}"}},
        {"id": "s", "type": "shell.command", "with": {"argv": ["echo", "${inputs.url}"]}},
        {"id": "s", "type": "shell.command", "with": {"argv": "${inputs.argv}"}},
    ],
)
def test_params_given_by_an_expression_are_checked_only_when_rendered(
    step: dict[str, Any],
) -> None:
    parse_definition(
        definition(
            step,
            inputs={
                "n": {"type": "integer"},
                "url": {"type": "string"},
                "m": {"type": "string"},
                "argv": {"type": "array"},
            },
        )
    )


def test_several_problems_are_all_reported_at_once() -> None:
    raw = {
        "name": "Bad Name",
        "colour": "red",
        "inputs": {"host": {"type": "string"}, "n": {"type": "float"}},
        "steps": [
            {"id": "a", "type": "noop", "with": {"x": "${steps.later.output}"}},
            {"id": "a", "type": "teleport"},
            {"id": "s", "type": "sleep", "with": {}, "timeout": "forever"},
            {"id": "r", "type": "noop", "retry": {"max_attempts": 0}, "colour": 1},
            {
                "id": "c",
                "if": "inputs.host ==",
                "then": [noop("t", x="${inputs.nope}")],
                "else": [noop("e", y="${1 +}")],
            },
            {"id": "p", "parallel": [[noop("p1")], [noop("p2", z="${steps.p1.output}")]]},
            {"id": "p3", "parallel": []},
            noop("later", self="${steps.later.output}"),
        ],
    }
    paths = paths_of(raw)
    expected = [
        "name",
        "colour",
        "inputs.n",
        "steps[0].with.x",
        "steps[1].id",
        "steps[1].type",
        "steps[2].timeout",
        "steps[3].colour",
        "steps[3].retry.max_attempts",
        "steps[4].if",
        "steps[4].then[0].with.x",
        "steps[4].else[0].with.y",
        "steps[5].parallel[1][0].with.z",
        "steps[6].parallel",
        "steps[7].with.self",
    ]
    for path in expected:
        assert path in paths, (path, paths)
    assert "steps[2].with.seconds" in paths
    assert len(paths) == len(expected) + 1, paths


def test_the_error_message_lists_every_problem() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_definition(definition({"id": "a", "type": "x"}, {"id": "a", "type": "noop"}))
    text = str(info.value)
    assert "steps[0].type" in text
    assert "steps[1].id" in text


@pytest.mark.parametrize(
    "parallel", [[], "a", [[]], [[noop("a")], []], [[noop("a")], "b"]], ids=str
)
def test_a_parallel_needs_non_empty_branches(parallel: Any) -> None:
    problems = problems_of(definition({"id": "p", "parallel": parallel}))
    assert len(problems) == 1
    assert problems[0].path.startswith("steps[0].parallel")


def test_condition_branches_must_be_lists() -> None:
    raw = definition({"id": "c", "if": "true", "then": noop("a"), "else": "b"})
    assert sorted(paths_of(raw)) == ["steps[0].else", "steps[0].then"]


# --- references that are allowed --------------------------------------------------------------


def test_a_step_may_read_earlier_steps_and_inputs() -> None:
    parse_definition(
        definition(
            noop("a"),
            noop("b", x="${steps.a.output}", y="${inputs.host}", whole="${inputs}"),
            noop("c", x="${steps.a.output.v + steps.b.output.x}", y="${steps.b}"),
            {"id": "k", "if": "steps.c.output.y != null and inputs.host == 'h'", "then": []},
            inputs={"host": {"type": "string"}},
        )
    )


def test_a_branch_may_read_steps_before_the_parallel_and_earlier_in_itself() -> None:
    parse_definition(
        definition(
            noop("a"),
            {
                "id": "p",
                "parallel": [
                    [noop("b1", x="${steps.a.output}"), noop("b2", x="${steps.b1.output}")],
                    [noop("c1", x="${steps.a.output}")],
                ],
            },
        )
    )


def test_steps_after_a_parallel_may_read_any_branch() -> None:
    parse_definition(
        definition(
            {"id": "p", "parallel": [[noop("b1"), noop("b2")], [noop("c1")]]},
            noop("after", x="${steps.b1.output}", y="${steps.b2.output}", z="${steps.c1.output}"),
            {"id": "k", "if": "steps.c1.output == steps.b2.output", "then": []},
        )
    )


def test_steps_after_a_condition_may_read_both_of_its_branches() -> None:
    parse_definition(
        definition(
            {"id": "c", "if": "true", "then": [noop("t1"), noop("t2")], "else": [noop("e1")]},
            noop("after", x="${steps.t2.output}", y="${steps.e1.output}"),
            {"id": "k", "if": "steps.t1.output == null", "then": []},
        )
    )


def test_nested_steps_may_read_what_ran_before_each_enclosing_step() -> None:
    parse_definition(
        definition(
            noop("a"),
            {
                "id": "p",
                "parallel": [
                    [
                        noop("b"),
                        {
                            "id": "c",
                            "if": "steps.b.output == steps.a.output",
                            "then": [noop("t", x="${steps.a.output}", y="${steps.b.output}")],
                            "else": [
                                {
                                    "id": "q",
                                    "parallel": [[noop("q1", x="${steps.b.output}")], [noop("q2")]],
                                },
                                noop("e", x="${steps.q1.output}", y="${steps.q2.output}"),
                            ],
                        },
                        noop("d", x="${steps.t.output}", y="${steps.e.output}"),
                    ],
                    [noop("z", x="${steps.a.output}")],
                ],
            },
            noop("end", x="${steps.d.output}", y="${steps.z.output}", w="${steps.q2.output}"),
        )
    )


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("2.5s", 2.5),
        ("45", 45.0),
        (" 30s ", 30.0),
        ("0s", 0.0),
        (10, 10.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["", "abc", "-1s", "1d", "1 h", "s", "1.s", ".5s", "30S", -1, -0.5, True, None, [30]]
)
def test_parse_duration_refuses(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_duration_refuses_nan() -> None:
    with pytest.raises(ValueError):
        parse_duration(math.nan)


@pytest.mark.parametrize(
    ("timeout", "seconds"), [("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), (7, 7.0)]
)
def test_a_step_timeout_is_parsed_into_seconds(timeout: Any, seconds: float) -> None:
    d = parse_definition(definition({"id": "a", "type": "noop", "timeout": timeout}))
    assert d.activity("a").timeout_s == seconds
    t = apply(d, new_instance({}), Start(), NOW)
    assert isinstance(dispatch := t.decisions[0], Dispatch)
    assert dispatch.timeout_s == seconds


@pytest.mark.parametrize("backoff", ["1000000000h", math.inf, math.nan])
def test_an_accepted_backoff_never_breaks_apply(backoff: Any) -> None:
    raw = definition({"id": "a", "type": "noop", "retry": {"max_attempts": 2, "backoff": backoff}})
    try:
        d = parse_definition(raw)
    except DefinitionError as exc:
        refused_at = [p.path for p in exc.problems]
    else:
        refused_at = []
    if refused_at:  # refusing it is a fix, if it is refused where it is wrong
        assert refused_at == ["steps[0].retry.backoff"]
        return
    started = apply(d, new_instance({}), Start(), NOW)
    error = ActivityError(kind="boom", message="x")
    t = apply(d, started.state, ActivityFailed("a", 1, error, "w1", NOW, NOW), NOW)
    assert [(x.step, x.attempt) for x in t.decisions if isinstance(x, Dispatch)] == [("a", 2)]


# --- inputs -------------------------------------------------------------------------------------

INPUTS: dict[str, dict[str, Any]] = {
    "host": {"type": "string"},
    "count": {"type": "integer"},
    "ratio": {"type": "number", "default": 0.5},
    "dry_run": {"type": "boolean", "default": False},
    "tags": {"type": "array", "default": ["a"]},
    "meta": {"type": "object", "default": {}},
}


@pytest.fixture
def with_inputs() -> Definition:
    return parse_definition(definition(noop("a"), inputs=INPUTS))


def problems_resolving(d: Definition, given: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(DefinitionError) as info:
        resolve_inputs(d, given)
    found = {p.path: p.message for p in info.value.problems}
    assert len(found) == len(info.value.problems), "one problem per input"
    return found


def test_resolve_inputs_fills_defaults(with_inputs: Definition) -> None:
    assert resolve_inputs(with_inputs, {"host": "h", "count": 3}) == {
        "host": "h",
        "count": 3,
        "ratio": 0.5,
        "dry_run": False,
        "tags": ["a"],
        "meta": {},
    }


def test_resolve_inputs_keeps_given_values_over_defaults(with_inputs: Definition) -> None:
    given = {"host": "h", "count": 3, "ratio": 2, "dry_run": True, "tags": [], "meta": {"k": 1}}
    assert resolve_inputs(with_inputs, given) == given


def test_resolve_inputs_refuses_missing_required_inputs(with_inputs: Definition) -> None:
    assert problems_resolving(with_inputs, {}) == {
        "inputs.host": "required",
        "inputs.count": "required",
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("count", True),
        ("count", False),
        ("count", 1.5),
        ("count", "3"),
        ("count", None),
        ("host", 3),
        ("host", None),
        ("ratio", "0.5"),
        ("ratio", True),
        ("dry_run", 1),
        ("dry_run", "true"),
        ("tags", "a"),
        ("tags", {"a": 1}),
        ("meta", [1]),
    ],
)
def test_resolve_inputs_refuses_a_wrong_type(
    with_inputs: Definition, name: str, value: Any
) -> None:
    given = {"host": "h", "count": 3, name: value}
    problems = problems_resolving(with_inputs, given)
    assert list(problems) == [f"inputs.{name}"]
    assert INPUTS[name]["type"] in problems[f"inputs.{name}"]


def test_a_boolean_is_not_an_integer(with_inputs: Definition) -> None:
    problems = problems_resolving(with_inputs, {"host": "h", "count": True})
    assert problems == {"inputs.count": "expected integer, got a boolean"}


def test_resolve_inputs_refuses_unknown_inputs(with_inputs: Definition) -> None:
    problems = problems_resolving(with_inputs, {"host": "h", "count": 1, "hots": "x"})
    assert list(problems) == ["inputs.hots"]


def test_resolve_inputs_lists_every_problem(with_inputs: Definition) -> None:
    problems = problems_resolving(with_inputs, {"ratio": True, "extra": 1, "other": 2})
    assert set(problems) == {
        "inputs.host",
        "inputs.count",
        "inputs.ratio",
        "inputs.extra",
        "inputs.other",
    }


def test_resolve_inputs_does_not_share_or_change_what_it_was_given(
    with_inputs: Definition,
) -> None:
    given = {"host": "h", "count": 3}
    resolved = resolve_inputs(with_inputs, given)
    assert given == {"host": "h", "count": 3}
    assert resolved is not given


# --- restartability, as dispatched ------------------------------------------------------------


def dispatched(step: dict[str, Any], inputs: dict[str, Any] | None = None) -> Dispatch:
    declared = {k: {"type": "string"} for k in inputs or {}}
    d = parse_definition(definition(step, inputs=declared))
    t = apply(d, new_instance(inputs or {}), Start(), NOW)
    (decision,) = t.decisions
    assert isinstance(decision, Dispatch)
    assert t.state.activities[decision.step].restartable is decision.restartable
    return decision


def http(method: str | None, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"url": "http://127.0.0.1:9/x"}
    if method is not None:
        params["method"] = method
    return {"id": "h", "type": "http.request", "with": params, **extra}


@pytest.mark.parametrize(
    ("step", "restartable"),
    [
        ({"id": "n", "type": "noop"}, True),
        ({"id": "s", "type": "sleep", "with": {"seconds": 1}}, True),
        ({"id": "x", "type": "shell.command", "with": {"argv": ["true"]}}, False),
        (http(None), True),
        (http("GET"), True),
        (http("HEAD"), True),
        (http("OPTIONS"), True),
        (http("POST"), False),
        (http("PUT"), False),
        (http("PATCH"), False),
        (http("DELETE"), False),
    ],
    ids=lambda v: v if isinstance(v, bool) else f"{v['type']}-{v.get('with', {}).get('method')}",
)
def test_restartable_by_default_per_type(step: dict[str, Any], restartable: bool) -> None:
    assert dispatched(step).restartable is restartable


@pytest.mark.parametrize(
    ("step", "restartable"),
    [
        ({"id": "x", "type": "shell.command", "with": {"argv": ["t"]}, "restartable": True}, True),
        ({"id": "n", "type": "noop", "restartable": False}, False),
        ({"id": "s", "type": "sleep", "with": {"seconds": 1}, "restartable": False}, False),
        (http("POST", restartable=True), True),
        (http("DELETE", restartable=True), True),
        (http("GET", restartable=False), False),
        (http("POST", restartable=False), False),
    ],
    ids=str,
)
def test_an_authors_restartable_overrides_the_default(
    step: dict[str, Any], restartable: bool
) -> None:
    assert dispatched(step).restartable is restartable


@pytest.mark.parametrize(("method", "restartable"), [("GET", True), ("POST", False)])
def test_a_rendered_http_method_decides(method: str, restartable: bool) -> None:
    assert dispatched(http("${inputs.m}"), {"m": method}).restartable is restartable


def test_restartability_is_kept_on_every_attempt() -> None:
    d = parse_definition(
        definition(
            {
                "id": "x",
                "type": "shell.command",
                "with": {"argv": ["t"]},
                "retry": {"max_attempts": 2},
            }
        )
    )
    first = apply(d, new_instance({}), Start(), NOW)
    error = ActivityError(kind="exit_code", message="1")
    retry = apply(d, first.state, ActivityFailed("x", 1, error, "w", NOW, NOW), NOW)
    (decision,) = retry.decisions
    assert isinstance(decision, Dispatch)
    assert (decision.attempt, decision.restartable) == (2, False)
    assert retry.state.activities["x"].restartable is False
