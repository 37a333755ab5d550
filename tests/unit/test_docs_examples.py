"""The reference in docs/ checked against the code, so that it cannot drift.

- docs/definitions.md: every JSON block marked `<!-- definition -->` validates within the
  limits the admin API applies; every block marked `<!-- invalid-definition -->` is refused by
  the admin API exactly with the problem in the `<!-- problem -->` block after it; every limit
  of `Limits` is documented with its value; every parameter of every activity type is named in
  that type's section.
- docs/expressions.md: every row of the tables marked `<!-- expression-examples -->` and
  `<!-- template-examples -->` gives the value (or the error) shown, in the context of the block
  marked `<!-- expression-context -->`.
- docs/api.md: every route of the admin API's OpenAPI document is listed.

A marker is an HTML comment on its own line, right before the fenced block or table it marks.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from paceline_admin.app import create_app
from paceline_admin.resources import get_pool
from paceline_admin.settings import AdminSettings
from paceline_engine.activity_types import ACTIVITY_TYPES
from paceline_engine.definitions import LIMITS, Limits, parse_definition
from paceline_engine.expressions import (
    EvaluationError,
    ExpressionError,
    compile_template,
    parse,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"
TOKEN = "docs-example-token-0123456789"


def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def json_blocks(text: str, marker: str) -> list[tuple[int, str]]:
    """(line number, body) of each ```json block right after `<!-- marker -->`."""
    pattern = re.compile(
        rf"^<!-- {re.escape(marker)} -->[ \t]*\n```json[ \t]*\n(.*?)^```[ \t]*$",
        re.MULTILINE | re.DOTALL,
    )
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in pattern.finditer(text)]


def table_rows(text: str, marker: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of each body row of every table right after `<!-- marker -->`."""
    rows: list[tuple[int, list[str]]] = []
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if line.strip() != f"<!-- {marker} -->":
            continue
        # The header and the separator come first; the table ends at the first other line.
        for number in range(start + 3, len(lines)):
            row = lines[number].strip()
            if not row.startswith("|"):
                break
            cells = [cell.strip() for cell in row.strip("|").split(" | ")]
            rows.append((number + 1, cells))
    return rows


def code(cell: str) -> str:
    """The text of a cell that is one `code span`."""
    assert cell.startswith("`") and cell.endswith("`"), f"not a code span: {cell}"
    return cell[1:-1]


def same(a: Any, b: Any) -> bool:
    """Equal as JSON, types included (true is not 1, 1.0 is not 1)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# --- docs/definitions.md ----------------------------------------------------------------------

DEFINITIONS = read("definitions.md")
VALID = json_blocks(DEFINITIONS, "definition")
INVALID = json_blocks(DEFINITIONS, "invalid-definition")
PROBLEMS = json_blocks(DEFINITIONS, "problem")


def test_the_markers_find_the_examples() -> None:
    assert len(VALID) >= 3
    assert len(INVALID) >= 1
    assert len(PROBLEMS) == len(INVALID), "each invalid definition is followed by its problem"


@pytest.mark.parametrize(("line", "body"), VALID, ids=[f"line {n}" for n, _ in VALID])
def test_definition_example_validates(line: int, body: str) -> None:
    definition = parse_definition(json.loads(body), limits=LIMITS)
    assert definition.name


@pytest.fixture(scope="module")
def admin() -> Any:
    """The admin app, without its database or broker: a definition that does not validate is
    refused before either is used."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test client says how it may change
        from fastapi.testclient import TestClient

    app = create_app(AdminSettings(admin_token=SecretStr(TOKEN)))
    app.dependency_overrides[get_pool] = lambda: None
    return TestClient(app)


@pytest.mark.parametrize(
    ("invalid", "problem"),
    list(zip(INVALID, PROBLEMS, strict=True)),
    ids=[f"line {n}" for n, _ in INVALID],
)
def test_invalid_definition_example_is_refused_as_shown(
    admin: Any, invalid: tuple[int, str], problem: tuple[int, str]
) -> None:
    assert invalid[0] < problem[0]
    answer = admin.post(
        "/v1/definitions",
        content=invalid[1],
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert answer.status_code == 422
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json() == json.loads(problem[1])


def section(text: str, heading: str) -> str:
    """The text under `heading` (a whole heading line), up to the next heading of its level."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n")
    end = text.find(f"\n{level} ", start + 1)
    return text[start : end if end >= 0 else len(text)]


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Limits)])
def test_every_limit_is_documented_with_its_value(field: str) -> None:
    limits = section(DEFINITIONS, "## Limits")
    rows = [line for line in limits.splitlines() if f"`Limits.{field}`" in line]
    assert len(rows) == 1, f"docs/definitions.md, Limits: one row for `Limits.{field}`"
    assert f"| {getattr(LIMITS, field):,} |" in rows[0], rows[0]


@pytest.mark.parametrize("name", sorted(ACTIVITY_TYPES))
def test_every_activity_parameter_is_documented(name: str) -> None:
    documented = section(DEFINITIONS, f"### `{name}`")
    for field_name, field in ACTIVITY_TYPES[name].params.model_fields.items():
        shown = field.alias or field_name
        assert f"| `{shown}` |" in documented, f"{name}: parameter `{shown}` is not documented"


# --- docs/expressions.md ----------------------------------------------------------------------

EXPRESSIONS = read("expressions.md")
CONTEXT = json.loads(json_blocks(EXPRESSIONS, "expression-context")[0][1])
EXPRESSION_ROWS = table_rows(EXPRESSIONS, "expression-examples")
TEMPLATE_ROWS = table_rows(EXPRESSIONS, "template-examples")


def test_the_markers_find_the_tables() -> None:
    assert len(EXPRESSION_ROWS) >= 20
    assert len(TEMPLATE_ROWS) >= 5


@pytest.mark.parametrize(
    ("line", "cells"), EXPRESSION_ROWS, ids=[f"line {n}" for n, _ in EXPRESSION_ROWS]
)
def test_expression_example(line: int, cells: list[str]) -> None:
    source, shown = code(cells[0]), cells[1]
    if shown.startswith("error:"):
        message = code(shown.removeprefix("error:").strip())
        with pytest.raises((ExpressionError, EvaluationError)) as raised:
            parse(source).evaluate(CONTEXT)
        assert message in str(raised.value)
    else:
        value = parse(source).evaluate(CONTEXT)
        assert same(value, json.loads(code(shown))), f"{source} gives {value!r}"


@pytest.mark.parametrize(
    ("line", "cells"), TEMPLATE_ROWS, ids=[f"line {n}" for n, _ in TEMPLATE_ROWS]
)
def test_template_example(line: int, cells: list[str]) -> None:
    template = json.loads(code(cells[0]))
    rendered = compile_template({"field": template}).render(CONTEXT)["field"]
    assert same(rendered, json.loads(code(cells[1]))), f"{template} renders {rendered!r}"


# --- docs/api.md ------------------------------------------------------------------------------


def test_every_route_is_listed(admin: Any) -> None:
    routes = section(read("api.md"), "## Routes")
    paths = admin.app.openapi()["paths"]
    missing = [
        f"{method.upper()} {path}"
        for path, operations in paths.items()
        for method in operations
        if f"| `{method.upper()} {path}` |" not in routes
    ]
    assert not missing, f"docs/api.md does not list: {missing}"
