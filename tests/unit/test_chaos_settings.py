"""make chaos takes its seed, fault count and duration from PACELINE_CHAOS_* settings; an option
given on the command line wins, and a bad value is a clear error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# By its path: `chaos` on sys.path is also the name of the tests/chaos package.
_SPEC = importlib.util.spec_from_file_location(
    "chaos_tool", Path(__file__).resolve().parents[2] / "deploy" / "chaos.py"
)
assert _SPEC is not None and _SPEC.loader is not None
chaos_tool = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(chaos_tool)
parse_args = chaos_tool.parse_args


def test_settings_give_the_defaults_and_options_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACELINE_CHAOS_SEED", "5")
    monkeypatch.setenv("PACELINE_CHAOS_FAULTS", "7")
    monkeypatch.setenv("PACELINE_CHAOS_DURATION_S", "30")
    args = parse_args([])
    assert (args.seed, args.faults, args.duration) == (5, 7, 30.0)
    args = parse_args(["--faults", "3", "--seed", "9"])
    assert (args.seed, args.faults, args.duration) == (9, 3, 30.0)


def test_without_settings_the_documented_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PACELINE_CHAOS_SEED", "PACELINE_CHAOS_FAULTS", "PACELINE_CHAOS_DURATION_S"):
        monkeypatch.delenv(name, raising=False)
    args = parse_args([])
    assert (args.faults, args.duration) == (200, 300.0)
    assert isinstance(args.seed, int)


def test_a_bad_setting_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PACELINE_CHAOS_FAULTS", "many")
    with pytest.raises(SystemExit) as exited:
        parse_args([])
    assert exited.value.code == 2
    assert "PACELINE_CHAOS_FAULTS='many'" in capsys.readouterr().err
