"""`approval` activities: checkpointed creation, quorum, timeouts, escalation, cancels; each
event also checked on the stored, piecemeal form (the Run driver does it)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit.test_machine_failover import Run, noop, parse

from paceline_contracts.states import ActivityStatus, InstanceStatus
from paceline_engine.events import (
    ApprovalDecided,
    CloseApproval,
    CreateApproval,
    Dispatch,
    EscalateApproval,
    Finish,
    HistoryKind,
    SetTimer,
    WaitDue,
)
from paceline_engine.machine import Transition


def approval(**params: Any) -> dict[str, Any]:
    spec = {"title": "Add ${inputs.host}?", "approvers": ["group:netops"], **params}
    return {"id": "ok", "type": "approval", "with": spec}


def gate(**params: Any) -> list[dict[str, Any]]:
    """An approval, then a condition on its decision."""
    return [
        approval(**params),
        {
            "id": "chosen",
            "if": "steps.ok.output.decision == 'approve'",
            "then": [noop("add")],
            "else": [noop("skip")],
        },
    ]


class Approvals(Run):
    def decide(self, by: str, decision: str, comment: str | None = None) -> Transition:
        return self.send(ApprovalDecided("ok", 1, by, decision, comment, self.now))

    def timer(self, purpose: str) -> Transition:
        return self.send(WaitDue("ok", 1, self.now, purpose))


def run_of(*steps: dict[str, Any]) -> Approvals:
    from paceline_engine.definitions import parse_definition

    definition = parse_definition(
        {"name": "a", "inputs": {"host": {"type": "string"}}, "steps": list(steps)}
    )
    run = Approvals(definition)
    run.state = run.state.model_copy(update={"inputs": {"host": "sw1"}})
    return run


def of(t: Transition, kind: type) -> list[Any]:
    return [d for d in t.decisions if isinstance(d, kind)]


def dispatched(t: Transition) -> list[str]:
    return [d.step for d in of(t, Dispatch)]


def test_entering_creates_one_approval_and_waits_without_a_worker() -> None:
    run = run_of(*gate(timeout="24h", escalate=[{"after": "4h", "to": ["ops-lead"]}]))
    t = run.start()
    [create] = of(t, CreateApproval)
    assert (create.step, create.attempt, create.title) == ("ok", 1, "Add sw1?")
    assert create.approvers == ["group:netops"]
    assert create.due_at == run.now + timedelta(hours=24)
    assert of(t, Dispatch) == []
    timers = {d.purpose: d.due_at for d in of(t, SetTimer)}
    assert timers == {
        "timeout": run.now + timedelta(hours=24),
        "escalate:1": run.now + timedelta(hours=4),
    }
    assert run.status("ok") is ActivityStatus.WAITING
    assert run.instance() is InstanceStatus.WAITING


def test_a_quorum_of_distinct_deciders_approves_and_a_condition_branches_on_it() -> None:
    run = run_of(*gate(required=2))
    run.start()
    t = run.decide("alice", "approve", "fine")
    assert of(t, CloseApproval) == [] and dispatched(t) == []
    assert [h.kind for h in t.history] == [HistoryKind.APPROVAL_VOTE]
    t = run.decide("bob", "approve")
    assert of(t, CloseApproval) == [CloseApproval("ok", 1, "DECIDED", "approve", ["alice", "bob"])]
    assert dispatched(t) == ["add"]
    output = run.state.activities["ok"].output
    assert output["decision"] == "approve"
    assert output["decided_by"] == ["alice", "bob"]
    assert (output["via"], output["escalation_level"]) == ("api", 0)


def test_one_rejection_decides_at_once() -> None:
    run = run_of(*gate(required=3))
    run.start()
    run.decide("alice", "approve")
    t = run.decide("bob", "reject", "not today")
    assert of(t, CloseApproval) == [CloseApproval("ok", 1, "DECIDED", "reject", ["bob"])]
    assert dispatched(t) == ["skip"]
    assert run.state.activities["ok"].output["comment"] == "not today"


def test_a_decision_after_the_approval_ended_changes_nothing() -> None:
    run = run_of(*gate())
    run.start()
    run.decide("alice", "reject")
    t = run.decide("bob", "approve")
    assert t.decisions == []
    assert [h.kind for h in t.history] == [HistoryKind.IGNORED]


@pytest.mark.parametrize(
    ("on_timeout", "decision"), [("reject", "reject"), ("approve", "approve"), ("fail", None)]
)
def test_the_timeout_decides_by_on_timeout(on_timeout: str, decision: str | None) -> None:
    run = run_of(*gate(timeout="1h", on_timeout=on_timeout))
    run.start()
    t = run.timer("timeout")
    if decision is None:
        assert of(t, CloseApproval) == [CloseApproval("ok", 1, "EXPIRED", None, [])]
        assert Finish(InstanceStatus.FAILED) in t.decisions
        return
    assert of(t, CloseApproval) == [CloseApproval("ok", 1, "EXPIRED", decision, [])]
    assert run.state.activities["ok"].output["via"] == "timeout"
    assert dispatched(t) == ["add" if decision == "approve" else "skip"]


def test_escalation_adds_approvers_once_per_level() -> None:
    run = run_of(
        *gate(escalate=[{"after": "1h", "to": ["ops-lead"]}, {"after": "2h", "to": ["cto"]}])
    )
    run.start()
    t = run.timer("escalate:1")
    assert of(t, EscalateApproval) == [EscalateApproval("ok", 1, 1, ["group:netops", "ops-lead"])]
    assert run.timer("escalate:1").decisions == []  # the same timer again
    t = run.timer("escalate:2")
    assert of(t, EscalateApproval)[0].approvers == ["group:netops", "ops-lead", "cto"]
    run.decide("cto", "approve")
    assert run.state.activities["ok"].output["escalation_level"] == 2


def test_a_cancel_closes_the_approval() -> None:
    run = run_of(*gate())
    run.start()
    t = run.cancel()
    assert run.instance() is InstanceStatus.CANCELLED
    assert of(t, CloseApproval) == [CloseApproval("ok", 1, "CANCELLED", None, [])]
    assert run.decide("alice", "approve").decisions == []


def test_parameters_that_do_not_render_to_an_approval_fail_the_step() -> None:
    run = run_of(approval(approvers="${inputs.host}"))
    t = run.start()
    assert Finish(InstanceStatus.FAILED) in t.decisions
    assert of(t, CreateApproval) == []
    assert run.state.error is not None and run.state.error.kind == "bad_params"


def test_a_definition_with_a_bad_approval_is_refused() -> None:
    from paceline_engine.definitions import DefinitionError

    with pytest.raises(DefinitionError) as caught:
        parse(approval(approvers=[], choices=["yes"], on_timeout="maybe"))
    text = str(caught.value)
    assert "approvers" in text and "choices" in text and "on_timeout" in text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from(
            ["alice:approve", "bob:approve", "carol:reject", "timeout", "escalate", "cancel"]
        ),
        max_size=10,
    )
)
def test_any_interleaving_decides_once_and_closes_once(events: list[str]) -> None:
    run = run_of(*gate(required=2, timeout="1h", escalate=[{"after": "1m", "to": ["x"]}]))
    created = len(of(run.start(), CreateApproval))
    closes: list[CloseApproval] = []
    for what in events:
        if what == "timeout":
            t = run.timer("timeout")
        elif what == "escalate":
            t = run.timer("escalate:1")
        elif what == "cancel":
            t = run.cancel()
        else:
            by, decision = what.split(":")
            t = run.decide(by, decision)
        created += len(of(t, CreateApproval))
        closes += of(t, CloseApproval)
    assert created == 1, "one approval for the attempt, whatever happened"
    assert len(closes) <= 1, closes
    ended = run.status("ok") is not ActivityStatus.WAITING
    assert ended == bool(closes)


def test_the_same_deciders_choice_delivered_twice_is_one_vote() -> None:
    run = run_of(*gate(required=2))
    run.start()
    run.decide("alice", "approve")
    t = run.decide("alice", "approve")
    assert t.decisions == []
    assert [h.kind for h in t.history] == [HistoryKind.IGNORED]
    assert run.status("ok") is ActivityStatus.WAITING
    run.decide("bob", "approve")
    assert run.state.activities["ok"].output["decided_by"] == ["alice", "bob"]


def test_the_output_says_when_the_decision_was_recorded_not_applied() -> None:
    run = run_of(*gate())
    run.start()
    recorded = run.now - timedelta(hours=1)  # decided while no scheduler ran
    run.send(ApprovalDecided("ok", 1, "alice", "approve", None, recorded))
    assert run.state.activities["ok"].output["decided_at"] == recorded.isoformat()


def test_an_approval_step_takes_no_step_level_timeout_or_retry() -> None:
    from paceline_engine.definitions import DefinitionError

    step = approval()
    with pytest.raises(DefinitionError) as caught:
        parse({**step, "timeout": "1s", "retry": {"max_attempts": 2}})
    assert "steps[0].timeout" in str(caught.value) and "steps[0].retry" in str(caught.value)


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"forbid_requester": "no"}, "forbid_requester"),
        ({"required": "2"}, "required"),
        ({"required": True}, "required"),
        ({"approvers": ["", "bob"]}, "approvers.0"),
        ({"approvers": ["group:"]}, "approvers.0"),
        ({"timeout": "0s"}, "timeout"),
        # (A check across fields runs at definition time only when no field is a template.)
        (
            {"title": "t", "timeout": "1h", "escalate": [{"after": "2h", "to": ["x"]}]},
            "could never happen",
        ),
    ],
)
def test_approval_parameters_are_strict(params: dict[str, Any], where: str) -> None:
    from paceline_engine.definitions import DefinitionError

    with pytest.raises(DefinitionError) as caught:
        parse(approval(**params))
    assert where in str(caught.value)
