"""The finishing touches of the OpenAPI document that FastAPI generates."""

from __future__ import annotations

from typing import Any

from paceline_admin.problems import PROBLEM_JSON
from paceline_admin.schemas import COMPONENTS, PLACEHOLDER, ref


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """Errors as `application/problem+json`, and the components of `schemas` in place of the
    placeholders that refer to them."""
    _problem_media_types(document)
    document.setdefault("components", {}).setdefault("schemas", {}).update(COMPONENTS)
    completed: dict[str, Any] = _referred(document)
    return completed


def _problem_media_types(document: dict[str, Any]) -> None:
    """FastAPI documents every response as application/json; errors are problem+json."""
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if str(status)[0] in "45" and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")


def _referred(value: Any) -> Any:
    if isinstance(value, dict):
        if PLACEHOLDER in value:
            rest = {k: v for k, v in value.items() if k != PLACEHOLDER}
            return {**ref(value[PLACEHOLDER]), **rest}
        return {k: _referred(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_referred(v) for v in value]
    return value
