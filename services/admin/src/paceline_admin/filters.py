"""Query parameters whose values come from a closed set: statuses, server kinds.

A filter takes a value as its set spells it (the `enum` of its schema) or in any case; one that
takes several also takes the parameter repeated (`?status=A&status=B`) or values separated by
commas (`?status=A,B`). Its schema says exactly that: each value is one of the `enum`, or fits
the pattern that spells every value in any case (comma-separated where several are taken). A
value that is neither is a 422 naming every unknown one.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

from pydantic import WithJsonSchema

from paceline_admin.problems import ApiError, ProblemItem


def _any_case(value: str) -> str:
    assert re.fullmatch(r"[A-Za-z_-]+", value), value  # nothing a pattern must escape
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in value)


def _item_schema(kind: type[StrEnum], *, several: bool) -> dict[str, Any]:
    one = "(?:" + "|".join(_any_case(k.value) for k in kind) + ")"
    pattern = f"^{one}(?:,{one})*$" if several else f"^{one}$"
    spelt = "values separated by commas, each " if several else ""
    return {
        "anyOf": [
            {"type": "string", "enum": [k.value for k in kind]},
            {"type": "string", "pattern": pattern, "description": f"{spelt}in any case"},
        ]
    }


def several_of(kind: type[StrEnum]) -> WithJsonSchema:
    """For `list[Annotated[str, several_of(kind)]]`: the schema of each of a filter's values,
    when it takes several values of `kind`."""
    return WithJsonSchema(_item_schema(kind, several=True))


def one_of(kind: type[StrEnum]) -> WithJsonSchema:
    """For `Annotated[str, one_of(kind)]`: the schema of a filter that takes one value."""
    return WithJsonSchema(_item_schema(kind, several=False))


def chosen(given: list[str] | str | None, kind: type[StrEnum], name: str) -> list[str]:
    """The values of `kind` a filter `name` names (as the set spells them; none: no filter);
    422 naming every value that is not one of them."""
    raw = [given] if isinstance(given, str) else given or []
    several = not isinstance(given, str)
    by_lower = {k.value.lower(): k.value for k in kind}
    values = [v for item in raw for v in (item.split(",") if several else [item])]
    names = ", ".join(k.value for k in kind)
    bad = [
        ProblemItem(path=f"query.{name}", message=f"{v!r} is not one of {names}")
        for v in values
        if not (v.isascii() and v.lower() in by_lower)
    ]
    if bad:
        raise ApiError(
            422,
            f"unknown {name} in the filter: use {names}",
            kind="invalid-request",
            title="Invalid request",
            errors=bad,
        )
    return sorted({by_lower[v.lower()] for v in values})
