"""`wait` steps: timers, signals, their races, cancels; every event also checked on the
stored, piecemeal form of the instance (the Run driver does it)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit.test_machine_failover import Run, S, noop, parse

from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.definitions import DefinitionError
from paceline_engine.events import (
    Abandon,
    Dispatch,
    Finish,
    HistoryKind,
    RecordSignal,
    SetTimer,
    SignalArrived,
    SignalFate,
    WaitDue,
)
from paceline_engine.machine import Transition
from paceline_engine.state import MAX_BUFFERED_SIGNALS


def wait(step_id: str, **spec: Any) -> dict[str, Any]:
    return {"id": step_id, "wait": spec}


def timers(t: Transition) -> list[SetTimer]:
    return [d for d in t.decisions if isinstance(d, SetTimer)]


def fates(t: Transition) -> list[tuple[SignalFate, str | None]]:
    return [(d.fate, d.step) for d in t.decisions if isinstance(d, RecordSignal)]


def dispatched(t: Transition) -> list[str]:
    return [d.step for d in t.decisions if isinstance(d, Dispatch)]


class Waits(Run):
    signals_sent: int = 0

    def due(self, step: str, due_at: datetime | None = None) -> Transition:
        activity = self.state.activities[step]
        assert activity.waiting is not None
        at = due_at or activity.waiting.due_at
        assert at is not None
        return self.send(WaitDue(step, 1, at))

    def signal(self, name: str, by: str = "ops", **payload: Any) -> Transition:
        self.signals_sent += 1
        return self.send(SignalArrived(f"s{self.signals_sent}", name, payload, by, self.now))


def run_of(*steps: dict[str, Any], inputs: dict[str, Any] | None = None) -> Waits:
    definition = parse_with_inputs(list(steps), inputs)
    run = Waits(definition)
    if inputs:
        run.state = run.state.model_copy(update={"inputs": inputs})
    return run


def parse_with_inputs(steps: list[dict[str, Any]], inputs: dict[str, Any] | None) -> Any:
    from paceline_engine.definitions import parse_definition

    spec = {k: {"type": "string"} for k in (inputs or {})}
    return parse_definition({"name": "w", "inputs": spec, "steps": steps})


# --- timers ------------------------------------------------------------------------------------


def test_a_wait_for_a_duration_sets_a_timer_on_the_database_clock_and_fires_once() -> None:
    run = run_of(wait("settle", **{"for": "10m"}), noop("after"))
    t = run.start()
    [timer] = timers(t)
    assert timer.due_at == run.now + timedelta(minutes=10)
    assert run.status("settle") is ActivityStatus.WAITING
    assert run.instance() is InstanceStatus.WAITING
    waiting = run.state.activities["settle"].waiting
    assert waiting is not None and (waiting.kind, waiting.due_at) == ("timer", timer.due_at)
    run.now = timer.due_at + timedelta(seconds=2) - S  # fired 2 s late
    t = run.due("settle")
    assert dispatched(t) == ["after"]
    output = run.state.activities["settle"].output
    assert output["resolved_by"] == "timer"
    ended = next(h for h in t.history if h.kind is HistoryKind.WAIT_ENDED)
    assert ended.data["lateness_s"] == pytest.approx(2.0)
    assert run.instance() is InstanceStatus.RUNNING
    # The same timer again (a relay that sent it twice): nothing more happens.
    again = run.due("settle", timer.due_at)
    assert again.decisions == []
    assert [h.kind for h in again.history] == [HistoryKind.IGNORED]


def test_a_wait_until_a_time_from_the_inputs() -> None:
    run = run_of(
        wait("window", until="${inputs.at}"), noop("go"), inputs={"at": "2030-06-01T02:00:00+02:00"}
    )
    [timer] = timers(run.start())
    assert timer.due_at == datetime.fromisoformat("2030-06-01T00:00:00+00:00")


@pytest.mark.parametrize("value", ["tomorrow", "2030-06-01T02:00:00"])
def test_an_until_that_is_not_a_time_with_an_offset_fails_the_instance(value: str) -> None:
    run = run_of(wait("window", until="${inputs.at}"), noop("go"), inputs={"at": value})
    t = run.start()
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert run.state.error is not None and run.state.error.kind == "expression"


# --- signals -----------------------------------------------------------------------------------


def ready(**extra: Any) -> dict[str, Any]:
    return wait("ready", signal="device_ready", timeout="2h", **extra)


def test_a_signal_ends_its_wait_and_the_output_carries_it() -> None:
    run = run_of(ready(), noop("after"))
    [timer] = timers(run.start())
    assert timer.due_at == run.now + timedelta(hours=2)
    t = run.signal("device_ready", host="sw1")
    assert fates(t) == [(SignalFate.DELIVERED, "ready")]
    assert dispatched(t) == ["after"]
    output = run.state.activities["ready"].output
    assert output["resolved_by"] == "signal"
    assert output["signal"]["payload"] == {"host": "sw1"}
    # The timeout that comes later finds the wait ended: recorded, nothing else.
    late = run.due("ready", timer.due_at)
    assert late.decisions == [] and [h.kind for h in late.history] == [HistoryKind.IGNORED]


def test_when_filters_signals_by_their_payload() -> None:
    run = run_of(
        ready(when="signal.payload.host == inputs.host"), noop("after"), inputs={"host": "sw1"}
    )
    run.start()
    t = run.signal("device_ready", host="sw2")
    assert fates(t) == [(SignalFate.LATE, None)]
    assert "did not accept" in next(d for d in t.decisions if isinstance(d, RecordSignal)).reason
    assert run.status("ready") is ActivityStatus.WAITING
    assert fates(run.signal("device_ready", host="sw1")) == [(SignalFate.DELIVERED, "ready")]


def test_a_signal_before_its_wait_is_buffered_and_taken_when_the_wait_starts() -> None:
    run = run_of(noop("first"), ready(), noop("after"))
    run.start()
    t = run.signal("device_ready", host="sw1")
    assert fates(t) == [(SignalFate.BUFFERED, None)]
    assert len(run.state.signals) == 1
    t = run.complete("first")
    # The wait started and took the buffered signal at once: no timer, the next step runs.
    assert fates(t) == [(SignalFate.DELIVERED, "ready")]
    assert timers(t) == []
    assert dispatched(t) == ["after"]
    assert run.state.signals == []


def test_a_signal_after_its_wait_ended_is_late() -> None:
    run = run_of(ready(), noop("after"))
    run.start()
    run.signal("device_ready")
    t = run.signal("device_ready")
    assert fates(t) == [(SignalFate.LATE, None)]


def test_a_signal_no_wait_takes_is_late_and_names_why() -> None:
    run = run_of(ready(), noop("after"))
    run.start()
    t = run.signal("something_else")
    [record] = [d for d in t.decisions if isinstance(d, RecordSignal)]
    assert record.fate is SignalFate.LATE
    assert "no wait step" in record.reason


def test_the_buffer_is_bounded() -> None:
    run = run_of(noop("first"), ready())
    run.start()
    for _ in range(MAX_BUFFERED_SIGNALS):
        assert fates(run.signal("device_ready")) == [(SignalFate.BUFFERED, None)]
    assert fates(run.signal("device_ready")) == [(SignalFate.LATE, None)]


@pytest.mark.parametrize(("on_timeout", "final"), [("fail", "FAILED"), ("continue", "COMPLETED")])
def test_a_signal_timeout_fails_or_continues(on_timeout: str, final: str) -> None:
    run = run_of(ready(on_timeout=on_timeout), noop("after"))
    run.start()
    t = run.due("ready")
    if final == "FAILED":
        assert t.decisions == [Finish(InstanceStatus.FAILED)]
        assert run.state.error is not None and run.state.error.kind == "timeout"
    else:
        assert dispatched(t) == ["after"]
        assert run.state.activities["ready"].output["resolved_by"] == "timeout"
    # A signal after the timeout won is late.
    assert fates(run.signal("device_ready"))[0][0] is SignalFate.LATE


def test_a_cancel_ends_a_wait_at_once() -> None:
    run = run_of(ready(), noop("after"))
    run.start()
    t = run.cancel()
    assert run.instance() is InstanceStatus.CANCELLED
    assert run.status("ready") is ActivityStatus.CANCELLED
    assert Finish(InstanceStatus.CANCELLED) in t.decisions
    assert fates(run.signal("device_ready"))[0][0] is SignalFate.LATE


def test_a_parallel_step_with_a_wait_is_running_while_its_other_branch_runs() -> None:
    run = run_of({"id": "p", "parallel": [[ready()], [noop("work")]]}, noop("after"))
    run.start()
    assert run.instance() is InstanceStatus.RUNNING
    run.complete("work")
    assert run.instance() is InstanceStatus.WAITING
    assert dispatched(run.signal("device_ready")) == ["after"]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"signal": "x"}, "required for a signal"),
        ({"for": "1m", "until": "2030-01-01T00:00:00Z"}, "exactly one of"),
        ({"signal": "x", "timeout": "1h", "on_timeout": "retry"}, "'fail' or 'continue'"),
        ({"signal": "x", "timeout": "none", "when": "signall.payload"}, "unknown name"),
        ({"for": "1m", "when": "true"}, "unknown field"),
    ],
)
def test_bad_waits_are_refused_at_definition_time(spec: dict[str, Any], problem: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        parse(wait("w", **spec))
    assert problem in str(caught.value)


# --- any interleaving --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["signal", "other", "due", "complete", "cancel"]), max_size=12))
def test_any_interleaving_ends_each_wait_once_and_records_every_signal(events: list[str]) -> None:
    run = run_of(noop("first"), ready(), noop("after"))
    run.start()
    ended = 0
    for what in events:
        before = run.state.status
        if what == "signal" or what == "other":
            t = run.signal("device_ready" if what == "signal" else "other")
            # Every signal gets exactly one fate, whatever the state.
            assert len(fates(t)) == 1
        elif what == "due" and run.state.activities.get("ready") is not None:
            waiting = run.state.activities["ready"].waiting
            assert waiting is not None and waiting.due_at is not None
            t = run.due("ready", waiting.due_at)
        elif what == "complete" and run.state.activities.get("first") is not None:
            t = run.complete("first")
        elif what == "cancel":
            t = run.cancel()
        else:
            continue
        ended += sum(1 for h in t.history if h.kind is HistoryKind.WAIT_ENDED)
        if before.is_final:
            assert not [d for d in t.decisions if isinstance(d, Dispatch | SetTimer)]
    # A wait ends at most once, whatever raced.
    assert ended <= 1
    if run.state.activities.get("ready") is not None and ended:
        assert run.status("ready") in (ActivityStatus.COMPLETED, ActivityStatus.FAILED)


@pytest.mark.parametrize("end", ["cancel", "untaken branch"])
def test_signals_still_buffered_when_the_instance_ends_become_late(end: str) -> None:
    if end == "cancel":
        run = run_of(noop("first"), ready())
    else:
        run = run_of(noop("first"), {"id": "c", "if": "1 == 2", "then": [ready()], "else": []})
    run.start()
    assert fates(run.signal("device_ready")) == [(SignalFate.BUFFERED, None)]
    t = run.cancel() if end == "cancel" else run.complete("first")
    assert run.instance().is_final
    assert fates(t) == [(SignalFate.LATE, None)]
    assert run.state.signals == []


def test_an_until_out_of_range_fails_the_step_not_the_scheduler() -> None:
    run = run_of(wait("window", until="${inputs.at}"), inputs={"at": "9999-12-31T23:00:00-05:00"})
    t = run.start()
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert run.state.error is not None and "out of range" in run.state.error.message


def test_an_until_is_kept_in_utc() -> None:
    run = run_of(wait("window", until="${inputs.at}"), inputs={"at": "2030-06-01T02:00:00+14:00"})
    [timer] = timers(run.start())
    assert timer.due_at.utcoffset() == timedelta(0)


def test_an_abandoned_instance_fails_with_the_reason_and_cancels_its_wait() -> None:
    run = run_of(ready())
    run.start()
    t = run.send(Abandon("a message could not be applied"))
    assert t.decisions == [Finish(InstanceStatus.FAILED)]
    assert run.state.error is not None and run.state.error.kind == "internal"
    assert run.status("ready") is ActivityStatus.CANCELLED
    assert run.send(Abandon("again")).decisions == []
