"""Every setting is documented in docs/settings.md, so that a new one cannot go undocumented.

A setting is a field of a settings class (a pydantic-settings `BaseSettings` subclass defined in
a `settings.py` of a library or a service, or in a script under `deploy/`), read from the
environment variable of its class's `env_prefix` and its name; or a `PACELINE_*` name that the
code under `libs/`, `services/`, `clients/` and `deploy/` (Python, shell, the Makefile) reads
some other way.
Each must appear as a code span in a table row of docs/settings.md.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
DOCUMENTED = {
    name
    for line in DOC.splitlines()
    if line.lstrip().startswith("|")
    for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", line)
}
NAME = re.compile(r"\bPACELINE_[A-Z0-9_]*[A-Z0-9]\b")


def settings_modules() -> list[str]:
    """The modules that define settings classes: every library's and service's `settings`,
    and each deploy script that subclasses BaseSettings (deploy/ is on the test path)."""
    found = [
        f"{path.parent.name}.settings"
        for pattern in (
            "libs/*/src/*/settings.py",
            "services/*/src/*/settings.py",
            "clients/*/src/*/settings.py",
        )
        for path in sorted(ROOT.glob(pattern))
    ]
    found += [
        path.stem
        for path in sorted((ROOT / "deploy").glob("*.py"))
        if "BaseSettings" in path.read_text(encoding="utf-8")
    ]
    return found


def subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


def settings_variables() -> dict[str, str]:
    """Environment variable -> the class and field it sets, for every settings class."""
    modules = settings_modules()
    for module in modules:
        importlib.import_module(module)
    variables: dict[str, str] = {}
    for cls in subclasses(BaseSettings):
        if cls.__module__ not in modules:
            continue  # a class of a dependency, or of a test
        prefix = str(cls.model_config.get("env_prefix") or "")
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias if isinstance(field.validation_alias, str) else None
            variables[f"{prefix}{alias or field_name}".upper()] = f"{cls.__name__}.{field_name}"
    return variables


def names_in_code() -> dict[str, str]:
    """Every PACELINE_* name in the code, with a file that holds it."""
    files = [
        path
        for pattern in (
            "libs/**/*.py",
            "services/**/*.py",
            "clients/**/*.py",
            "deploy/*.py",
            "deploy/*.sh",
            "deploy/compose/*.sh",
            "deploy/compose/*.yaml",
        )
        for path in ROOT.glob(pattern)
        if "__pycache__" not in path.parts
    ]
    files.append(ROOT / "Makefile")
    names: dict[str, str] = {}
    for path in sorted(files):
        for name in NAME.findall(path.read_text(encoding="utf-8")):
            names.setdefault(name, str(path.relative_to(ROOT)))
    return names


VARIABLES = settings_variables()
IN_CODE = names_in_code()


def test_the_settings_classes_are_found() -> None:
    # The shared settings, the scheduler's, the worker's, the admin's and make run's layout.
    assert {
        "PACELINE_AMQP_URL",
        "PACELINE_SCHEDULER_BATCH_SIZE",
        "PACELINE_WORKER_CONCURRENCY",
        "PACELINE_ADMIN_TOKEN",
        "PACELINE_WORKERS",
    } <= VARIABLES.keys()


@pytest.mark.parametrize("variable", sorted(VARIABLES))
def test_every_settings_field_is_documented(variable: str) -> None:
    assert variable in DOCUMENTED, (
        f"{variable} ({VARIABLES[variable]}) is not in a table of docs/settings.md"
    )


@pytest.mark.parametrize("name", sorted(IN_CODE))
def test_every_paceline_name_in_the_code_is_documented(name: str) -> None:
    assert name in DOCUMENTED, f"{name} (read in {IN_CODE[name]}) is not in docs/settings.md"
