"""A definition's `triggers` (issue 11): validated with every problem listed, evaluated against
events; and the `trigger` that the expressions of an instance started by an event or a
schedule see."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from paceline_engine.definitions import (
    DEFAULT_DEDUPE_WINDOW_S,
    LIMITS,
    MAX_TRIGGERS,
    DefinitionError,
    Limits,
    Trigger,
    parse_definition,
    resolve_inputs,
    trigger_for_event,
    trigger_for_schedule,
)
from paceline_engine.expressions import EvaluationError
from paceline_engine.machine import ActivityCompleted, Dispatch, Start, apply, new_instance

NOW = datetime(2030, 1, 1, 12, tzinfo=UTC)

ISSUE_TRIGGER: dict[str, Any] = {
    "id": "on_discovered",
    "event": "device.discovered",
    "when": "trigger.event.data.site == 'par1'",
    "inputs": {"host": "${trigger.event.data.host}"},
    "dedupe": "${trigger.event.id}",
    "dedupe_window": "24h",
}


def definition(*triggers: Any, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "audit-device",
        "inputs": {
            "host": {"type": "string"},
            "site": {"type": "string", "default": "par1"},
            "tags": {"type": "array", "default": []},
        },
        "steps": [{"id": "look", "type": "noop", "with": {"host": "${inputs.host}"}}],
        "triggers": list(triggers),
    }
    raw.update(extra)
    return raw


def problems(raw: dict[str, Any], limits: Limits | None = LIMITS) -> list[tuple[str, str]]:
    with pytest.raises(DefinitionError) as raised:
        parse_definition(raw, limits=limits)
    return [(p.path, p.message) for p in raised.value.problems]


def event(data: Any, *, type: str = "device.discovered", id: str = "ev-1") -> dict[str, Any]:
    return trigger_for_event("on_discovered", type, id, "inventory", data)


# --- parsing -------------------------------------------------------------------------------------


def test_the_issue_example_parses() -> None:
    d = parse_definition(definition(ISSUE_TRIGGER), limits=LIMITS)
    (trigger,) = d.triggers
    assert isinstance(trigger, Trigger)
    assert (trigger.id, trigger.event, trigger.dedupe_window_s) == (
        "on_discovered",
        "device.discovered",
        86_400.0,
    )
    assert trigger.when is not None and trigger.dedupe is not None


def test_a_definition_without_triggers_has_none() -> None:
    raw = definition()
    del raw["triggers"]
    assert parse_definition(raw).triggers == ()
    assert parse_definition(definition()).triggers == ()


def test_the_smallest_trigger() -> None:
    raw = definition({"id": "t", "event": "x", "inputs": {"host": "h"}})
    (trigger,) = parse_definition(raw).triggers
    assert trigger.when is None and trigger.dedupe is None and trigger.dedupe_window_s is None
    assert trigger.start_inputs(event({})) == {"host": "h"}


def test_a_dedupe_without_a_window_remembers_keys_a_day() -> None:
    raw = definition({"id": "t", "event": "x", "inputs": {"host": "h"}, "dedupe": "trigger.id"})
    assert parse_definition(raw).triggers[0].dedupe_window_s == DEFAULT_DEDUPE_WINDOW_S


def test_every_problem_of_every_trigger_is_listed() -> None:
    raw = definition(
        {
            "id": "first",
            "event": "",
            "when": "trigger.event.data.site = 'par1'",
            "inputs": {"hots": "${trigger.event.data.host}", "site": 3},
            "dedupe_window": "1 day",
            "priority": 3,
        },
        {
            "id": "first",
            "event": "device discovered",
            "when": "inputs.host == 'x'",
            "inputs": {"host": "${trigger.schedule}", "tags": "${trigger.event.dat}"},
            "dedupe": "trigger.event.id +",
        },
        "on_anything",
        {"id": "9th", "inputs": ["host"]},
    )
    assert problems(raw) == [
        ("triggers[0].priority", "unknown field for a trigger"),
        (
            "triggers[0].event",
            "required: an event type, 1 to 200 letters, digits, '.', '_', ':', '/' or '-'",
        ),
        (
            "triggers[0].when",
            "unexpected character '=' (did you mean '=='?) (at position 24)",
        ),
        ("triggers[0].inputs.hots", "not an input of this definition"),
        ("triggers[0].inputs.site", "expected string, got int"),
        ("triggers[0].inputs", "input 'host' is required (it has no default): give it here"),
        (
            "triggers[0].dedupe_window",
            "'1 day' is not a duration (like '30s', '500ms', '5m', '1h')",
        ),
        (
            "triggers[0].dedupe_window",
            "only with a dedupe: the window is how long a dedupe key is remembered",
        ),
        ("triggers[1].id", "duplicate trigger id 'first' (also at triggers[0])"),
        (
            "triggers[1].event",
            "required: an event type, 1 to 200 letters, digits, '.', '_', ':', '/' or '-'",
        ),
        (
            "triggers[1].when",
            "unknown name 'inputs'; the only name is trigger (at position 0)",
        ),
        (
            "triggers[1].inputs.host",
            "trigger.schedule: a trigger's expressions see only trigger.kind, trigger.id, "
            "trigger.event",
        ),
        (
            "triggers[1].inputs.tags",
            "trigger.event.dat: an event has only type, id, source, data",
        ),
        (
            "triggers[1].dedupe",
            "expected an expression, found the end of the expression (at position 18)",
        ),
        ("triggers[2]", "a trigger is an object {id, event, when?, inputs?, dedupe?, ...}"),
        ("triggers[3].id", "required: letters, digits and '_', starting with a letter"),
        (
            "triggers[3].event",
            "required: an event type, 1 to 200 letters, digits, '.', '_', ':', '/' or '-'",
        ),
        ("triggers[3].inputs", "an object of input name to value (values may hold ${...})"),
    ]


def test_trigger_problems_come_with_the_steps_problems() -> None:
    raw = definition({"id": "t", "event": "x"}, steps=[{"id": "a", "type": "nope"}])
    paths = [path for path, _ in problems(raw)]
    assert paths == ["steps[0].type", "triggers[0].inputs"]


@pytest.mark.parametrize(
    ("triggers", "message"),
    [
        ({"id": "t"}, "a list of triggers"),
        (None, "a list of triggers"),
    ],
)
def test_triggers_is_a_list(triggers: Any, message: str) -> None:
    raw = definition()
    raw["triggers"] = triggers
    ((path, text),) = problems(raw)
    assert path == "triggers"
    assert message in text


@pytest.mark.parametrize(
    "event_type",
    ["device.discovered", "com.example.object.deleted.v2", "a", "urn:x/y_z-1", "x" * 200],
)
def test_event_types(event_type: str) -> None:
    raw = definition({"id": "t", "event": event_type, "inputs": {"host": "h"}})
    assert parse_definition(raw).triggers[0].event == event_type


@pytest.mark.parametrize("event_type", ["", " ", "x" * 201, "a b", "a\n", 3, None, ["a"]])
def test_bad_event_types(event_type: Any) -> None:
    raw = definition({"id": "t", "event": event_type, "inputs": {"host": "h"}})
    assert [path for path, _ in problems(raw)] == ["triggers[0].event"]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0s", "must be more than zero"),
        ("31d", "is not a duration"),
        ("800h", "at most 30 days"),
        (-1, "not negative"),
    ],
)
def test_bad_dedupe_windows(value: Any, problem: str) -> None:
    raw = definition(dict(ISSUE_TRIGGER, dedupe_window=value))
    ((path, message),) = problems(raw)
    assert path == "triggers[0].dedupe_window"
    assert problem in message


def test_the_number_of_triggers_is_limited() -> None:
    many = [{"id": f"t{i}", "event": "x", "inputs": {"host": "h"}} for i in range(101)]
    assert problems(definition(*many)) == [
        ("triggers", "101 triggers: the limit is 100 triggers in a definition")
    ]
    assert MAX_TRIGGERS == LIMITS.triggers == 100
    assert len(parse_definition(definition(*many)).triggers) == 101  # stored ones: no limit


def test_trigger_expressions_are_limited_in_length() -> None:
    long = "trigger.id == '" + "x" * 1000 + "'"
    raw = definition({"id": "t", "event": "x", "inputs": {"host": "h"}, "when": long})
    ((path, message),) = problems(raw)
    assert path == "triggers[0].when"
    assert "the limit is 1000 characters" in message


def test_static_inputs_are_type_checked_dynamic_ones_when_rendered() -> None:
    raw = definition(
        {"id": "t", "event": "x", "inputs": {"host": "${trigger.event.data}", "tags": "a"}}
    )
    assert problems(raw) == [("triggers[0].inputs.tags", "expected array, got str")]
    raw = definition(
        {"id": "t", "event": "x", "inputs": {"host": "h-${trigger.id}", "tags": ["${trigger.id}"]}}
    )
    (trigger,) = parse_definition(raw).triggers
    assert trigger.start_inputs(event({})) == {"host": "h-on_discovered", "tags": ["on_discovered"]}


def test_parsing_does_not_change_the_raw_definition() -> None:
    raw = definition(ISSUE_TRIGGER)
    before = copy.deepcopy(raw)
    parse_definition(raw)
    assert raw == before


# --- evaluation ----------------------------------------------------------------------------------


@pytest.fixture
def issue_trigger() -> Trigger:
    return parse_definition(definition(ISSUE_TRIGGER)).triggers[0]


def test_matching_an_event(issue_trigger: Trigger) -> None:
    assert issue_trigger.matches(event({"site": "par1", "host": "sw1"}))
    assert not issue_trigger.matches(event({"site": "lon1", "host": "sw1"}))
    assert not issue_trigger.matches(event({}))  # null-safe: no site
    assert not issue_trigger.matches(event({"site": "par1"}, type="device.removed"))
    assert not issue_trigger.matches({})


def test_inputs_and_dedupe_key(issue_trigger: Trigger) -> None:
    ctx = event({"site": "par1", "host": "sw1"}, id="ev-42")
    d = parse_definition(definition(ISSUE_TRIGGER))
    assert resolve_inputs(d, issue_trigger.start_inputs(ctx)) == {
        "host": "sw1",
        "site": "par1",
        "tags": [],
    }
    assert issue_trigger.dedupe_key(ctx) == "ev-42"


def test_dedupe_keys_of_other_types() -> None:
    def key(expression: str, data: Any) -> str | None:
        raw = definition({"id": "t", "event": "x", "inputs": {"host": "h"}, "dedupe": expression})
        return parse_definition(raw).triggers[0].dedupe_key(event(data))

    assert key("trigger.event.data", {"b": 1, "a": [1, "x"]}) == '{"a":[1,"x"],"b":1}'
    assert key("trigger.event.data.n", {"n": 3}) == "3"
    assert key("trigger.event.data.missing", {}) is None  # not deduplicated
    assert key("trigger.event.source + '/' + trigger.event.id", {}) == "inventory/ev-1"


def test_an_expression_that_fails_on_an_event_raises() -> None:
    raw = definition(
        {
            "id": "t",
            "event": "device.discovered",
            "when": "trigger.event.data.n > 1",
            "inputs": {"host": "${trigger.event.data.n + 1}"},
        }
    )
    (trigger,) = parse_definition(raw).triggers
    with pytest.raises(EvaluationError, match="ordering needs two numbers"):
        trigger.matches(event({"n": "x"}))
    with pytest.raises(EvaluationError, match=r"triggers\[0\]\.inputs\.host"):
        trigger.start_inputs(event({"n": "x"}))


def test_what_a_trigger_looks_like() -> None:
    assert event({"k": 1}) == {
        "kind": "event",
        "id": "on_discovered",
        "event": {
            "type": "device.discovered",
            "id": "ev-1",
            "source": "inventory",
            "data": {"k": 1},
        },
    }
    nominal = datetime(2030, 3, 31, 3, tzinfo=ZoneInfo("Europe/Paris"))
    assert trigger_for_schedule("nightly", datetime(2030, 1, 1, 2, tzinfo=UTC)) == {
        "kind": "schedule",
        "schedule": "nightly",
        "nominal_at": "2030-01-01T02:00:00Z",
    }
    assert trigger_for_schedule("n", nominal)["nominal_at"] == "2030-03-31T01:00:00Z"


# --- `trigger` in the steps of an instance -------------------------------------------------------


def stepping(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": "stepping", "inputs": {}, "steps": list(steps)}


def test_steps_read_the_trigger_of_a_schedule() -> None:
    d = parse_definition(
        stepping(
            {
                "id": "a",
                "type": "noop",
                "with": {"by": "${trigger.schedule}", "at": "${trigger.nominal_at}"},
            }
        ),
        limits=LIMITS,
    )
    trigger = trigger_for_schedule("nightly", datetime(2030, 1, 1, 2, tzinfo=UTC))
    t = apply(d, new_instance({}), Start(), NOW, trigger=trigger)
    (dispatch,) = t.decisions
    assert isinstance(dispatch, Dispatch)
    assert dispatch.params == {"by": "nightly", "at": "2030-01-01T02:00:00Z"}


def test_steps_read_the_trigger_of_an_event_in_later_transitions() -> None:
    d = parse_definition(
        stepping(
            {"id": "a", "type": "noop", "with": {}},
            {
                "id": "which",
                "if": "trigger.event.data.site == 'par1'",
                "then": [
                    {"id": "b", "type": "noop", "with": {"host": "${trigger.event.data.host}"}}
                ],
            },
        )
    )
    trigger = event({"site": "par1", "host": "sw1"})
    started = apply(d, new_instance({}), Start(), NOW, trigger=trigger)
    t = apply(d, started.state, ActivityCompleted("a", 1, {}, "w", NOW, NOW), NOW, trigger=trigger)
    (dispatch,) = [x for x in t.decisions if isinstance(x, Dispatch)]
    assert (dispatch.step, dispatch.params) == ("b", {"host": "sw1"})


def test_an_instance_started_through_the_api_reads_trigger_as_null() -> None:
    d = parse_definition(
        stepping({"id": "a", "type": "noop", "with": {"how": "${trigger.kind}", "x": "${trigger}"}})
    )
    (dispatch,) = apply(d, new_instance({}), Start(), NOW).decisions
    assert isinstance(dispatch, Dispatch)
    assert dispatch.params == {"how": None, "x": None}


@pytest.mark.parametrize(
    ("step", "path", "message"),
    [
        (
            {"id": "a", "type": "noop", "with": {"x": "${trigger.nominal}"}},
            "steps[0].with.x",
            "trigger.nominal: steps see only trigger.kind, trigger.id, trigger.event, "
            "trigger.schedule, trigger.nominal_at",
        ),
        (
            {"id": "a", "if": "trigger.event.payload.x == 1", "then": []},
            "steps[0].if",
            "trigger.event.payload.x: an event has only type, id, source, data",
        ),
        (
            {"id": "a", "wait": {"until": "${trigger.scheduled_at}"}},
            "steps[0].wait.until",
            "trigger.scheduled_at: steps see only trigger.kind, trigger.id, trigger.event, "
            "trigger.schedule, trigger.nominal_at",
        ),
        (
            {"id": "a", "if": "triger.kind == 'event'", "then": []},
            "steps[0].if",
            "unknown name 'triger'; the only names are inputs, steps and trigger (at position 0)",
        ),
        (
            {"id": "a", "wait": {"signal": "go", "timeout": "none", "when": "sgnal.by == 'x'"}},
            "steps[0].wait.when",
            "unknown name 'sgnal'; the only names are inputs, steps, trigger and signal "
            "(at position 0)",
        ),
    ],
)
def test_steps_reading_the_trigger_are_checked(
    step: dict[str, Any], path: str, message: str
) -> None:
    assert problems(stepping(step)) == [(path, message)]


def test_a_wait_when_sees_the_trigger_and_the_signal() -> None:
    when = "signal.by == trigger.event.data.owner"
    raw = stepping({"id": "a", "wait": {"signal": "go", "timeout": "none", "when": when}})
    assert parse_definition(raw).steps
