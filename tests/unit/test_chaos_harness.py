"""The pieces of make chaos that decide what a run injects and judges, without a stack: the
plan's rare faults (rolls among them), the sink's `hold_first`, the operator's rules, and the
judgement of POSTs that arrive after a cancel."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import Counter
from typing import Any

import httpx
from chaos_api import Api
from chaos_cancels import CancelRecord, late_posts
from chaos_check import (
    Observed,
    all_ended,
    kept_processing,
    no_healthy_quarantined,
    poison_failed,
)
from chaos_faults import ALL_KINDS, plan
from chaos_load import Load
from chaos_operator import Operator
from chaos_roll import Roll
from effect_sink import Sink


def test_every_short_run_plans_one_roll_among_its_rare_faults() -> None:
    for seed in range(20):
        faults = plan(random.Random(f"{seed}/plan"), 20, 60, list(ALL_KINDS))
        kinds = [f.kind for f in faults]
        assert kinds.count("roll") == 1
        assert kinds.count("rabbitmq") == kinds.count("postgres") == 1
        rare = [i for i, k in enumerate(kinds) if k in ("roll", "rabbitmq", "postgres")]
        assert all(b - a > 1 for a, b in itertools.pairwise(rare))
        # The roll comes first, so that it ends while the load still runs.
        assert kinds[rare[0]] == "roll"


def test_a_long_run_plans_a_few_rolls_and_kinds_select_them() -> None:
    faults = plan(random.Random("3/plan"), 200, 300, list(ALL_KINDS))
    rare = [f.kind for f in faults if f.kind in ("roll", "rabbitmq", "postgres")]
    assert rare.count("roll") == 3 and rare[0] == "roll" and rare[-1] != "roll"
    only = plan(random.Random(1), 4, 60, ["roll"])
    assert [f.kind for f in only] == ["roll"] * 4
    without = plan(random.Random(1), 20, 60, ["kill", "term"])
    assert {f.kind for f in without} <= {"kill", "term"}


def test_the_sink_holds_only_the_first_post_of_a_path() -> None:
    sink = Sink()
    sink.start()
    try:
        url = f"{sink.url}/effect/k/deliver?hold_first=2"
        began = time.monotonic()
        try:
            httpx.post(url, json={}, timeout=0.5)
            raise AssertionError("the first POST was answered")
        except httpx.ReadTimeout:
            pass
        began = time.monotonic()
        assert httpx.post(url, json={}, timeout=5).json()["count"] == 2
        assert time.monotonic() - began < 1.0
        assert sink.count("/effect/k/deliver") == 2
        assert len(sink.arrivals("/effect/k/deliver")) == 2
    finally:
        sink.stop()


def test_the_operator_fails_a_quarantined_poison_and_retries_everything_else() -> None:
    def flag(definition: str, step: str, kind: str) -> dict[str, object]:
        return {"definition": definition, "step": step, "flag": {"kind": kind}}

    assert Operator.decide(flag("chaos-poison", "poison", "crash_budget")) == "fail"
    assert Operator.decide(flag("chaos-poison", "poison", "redelivered")) == "retry"
    assert Operator.decide(flag("chaos-shell", "notify", "crash_budget")) == "retry"
    assert Operator.decide(flag("chaos-shell", "deliver", "outcome_unknown")) == "retry"


def _history(*entries: tuple[str, str | None]) -> list[dict[str, object]]:
    return [
        {"id": i, "kind": kind, "step": step, "at": "2024-01-01T00:00:00+00:00"}
        for i, (kind, step) in enumerate(entries, 1)
    ]


def test_after_a_cancel_only_an_attempt_granted_before_it_may_post() -> None:
    record = CancelRecord("i1", "chaos-shell", "k", asked_at=100.0, answered_at=101.0)
    record.code, record.status, record.waiting_for = 202, "CANCELLING", ["notify"]
    history = _history(
        ("started", None), ("claimed", "notify"), ("instance_cancelling", None), ("claimed", "x")
    )
    paths = {"notify": "/n", "deliver": "/d"}
    late = late_posts(record, history, paths, {"/n": [100.5, 101.2]})
    assert late is not None and late.allowed and not late.violations
    # A second POST of the step after the answer, or one of a step granted later: violations.
    late = late_posts(record, history, paths, {"/n": [101.1, 101.2], "/d": [101.3]})
    assert late is not None and len(late.violations) == 2


def test_a_cancel_not_recorded_at_its_answer_counts_from_the_history() -> None:
    record = CancelRecord("i1", "chaos-shell", "k", asked_at=100.0, answered_at=104.0)
    record.code, record.status = 202, "RUNNING"
    history = _history(("claimed", "notify"), ("instance_cancelled", None))
    recorded_at = 1704067200.0  # the history's `at`
    late = late_posts(record, history, {"deliver": "/d"}, {"/d": [recorded_at + 0.5]})
    assert late is not None and late.violations
    late = late_posts(record, history, {"deliver": "/d"}, {"/d": [recorded_at - 0.5]})
    assert late is not None and not late.violations
    # Ended before the scheduler took the cancel: nothing to judge.
    assert late_posts(record, _history(("claimed", "notify")), {}, {}) is None


def test_sink_answers_concurrent_posts_with_a_count_each() -> None:
    sink = Sink()
    sink.start()
    try:
        counts: list[int] = []

        def post() -> None:
            counts.append(httpx.post(f"{sink.url}/effect/a/b", json={}).json()["count"])

        threads = [threading.Thread(target=post) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(counts) == [1, 2, 3, 4, 5]
    finally:
        sink.stop()


def _observed(details: dict[str, dict[str, Any]], histories: dict[str, Any]) -> Observed:
    return Observed(details, {}, Counter(), {}, histories)


def _load(**started: str) -> Load:
    """A load that started one instance per id, of the definition given."""
    load = Load(Api("http://127.0.0.1:9", "token"), random.Random(1), 1.0)
    for instance_id, definition in started.items():
        load.started[instance_id] = f"key-{instance_id}"
        load.definition_of[f"key-{instance_id}"] = definition
    return load


def test_only_the_poison_step_may_be_quarantined() -> None:
    flagged = {"kind": "flagged", "step": "poison", "data": {"flag": "crash_budget"}}
    healthy = {"kind": "flagged", "step": "nap", "data": {"flag": "crash_budget"}}
    seen = _observed(
        {"p": {"definition": "chaos-poison"}, "h": {"definition": "chaos-mixed"}},
        {"p": [flagged], "h": [{**healthy, "data": {"flag": "redelivered"}}]},
    )
    assert no_healthy_quarantined(seen).ok
    seen.histories["h"].append(healthy)
    check = no_healthy_quarantined(seen)
    assert not check.ok and check.instances == ["h"]


def test_a_poison_must_end_failed_by_the_operator() -> None:
    load = _load(p="chaos-poison")
    history = [{"kind": "flagged", "step": "poison", "data": {"flag": "crash_budget"}}]
    failed = {
        "status": "FAILED",
        "activities": [
            {"step": "poison", "status": "FAILED", "attempts": 5, "error": {"kind": "operator"}}
        ],
    }
    assert poison_failed(load, _observed({"p": failed}, {"p": history}), {("p", "poison")}, True).ok
    # Failed by something else than the operator, or still flagged after a settled run: no.
    assert not poison_failed(load, _observed({"p": failed}, {"p": history}), set(), True).ok
    flagged = {
        "status": "FLAGGED",
        "activities": [
            {
                "step": "poison",
                "status": "INTERRUPTED",
                "attempts": 5,
                "flag": {"kind": "crash_budget"},
            }
        ],
    }
    assert not poison_failed(load, _observed({"p": flagged}, {"p": history}), set(), True).ok
    cut_short = poison_failed(load, _observed({"p": flagged}, {"p": history}), set(), False)
    assert cut_short.ok and "cut short" in cut_short.detail


def test_a_roll_must_see_instances_complete_while_it_runs() -> None:
    done = {"status": "COMPLETED", "finished_at": "2024-01-01T00:00:10+00:00"}
    seen = _observed({"a": done}, {})
    start = 1704067200.0
    assert kept_processing([Roll(1, start, start + 20)], seen).ok
    assert not kept_processing([Roll(1, start + 11, start + 20)], seen).ok
    troubled = Roll(1, start, start + 20, problems=["worker-1 exited -15 after SIGTERM, not 0"])
    assert not kept_processing([troubled], seen).ok
    assert "no rolling restart" in kept_processing([], seen).detail


def test_cancelled_is_an_end_only_for_an_instance_the_run_cancelled() -> None:
    load = _load(a="chaos-light", b="chaos-light", c="chaos-light")
    assert load.cancels is not None
    recorded = CancelRecord("a", "chaos-light", "key-a", 1.0, 2.0, 202, "CANCELLING")
    ended_first = CancelRecord("b", "chaos-light", "key-b", 1.0, 2.0, 409, problem="ended")
    load.cancels.records.update(a=recorded, b=ended_first)
    cancelled = {"status": "CANCELLED", "activities": [], "definition": "chaos-light"}
    completed = {"status": "COMPLETED", "activities": [], "definition": "chaos-light"}
    assert all_ended(load, _observed({"a": {**cancelled, "id": "a"}}, {})).ok
    # Answered CANCELLING, it must end CANCELLED; a 409 or no cancel: CANCELLED is wrong.
    assert not all_ended(load, _observed({"a": {**completed, "id": "a"}}, {})).ok
    assert not all_ended(load, _observed({"b": {**cancelled, "id": "b"}}, {})).ok
    assert not all_ended(load, _observed({"c": {**cancelled, "id": "c"}}, {})).ok
    assert all_ended(load, _observed({"b": {**completed, "id": "b"}}, {})).ok


class _Answer:
    def __init__(self, status_code: int, body: dict[str, Any]) -> None:
        self.status_code = status_code
        self._body = body

    def json(self) -> dict[str, Any]:
        return self._body


class _FlagsApi:
    """/v1/flags, and resolve answers by step: what the operator is told."""

    def __init__(self, flags: list[dict[str, Any]], answers: dict[str, _Answer]) -> None:
        self.flags = flags
        self.answers = answers
        self.asked: list[tuple[str, Any]] = []

    async def items(self, path: str, params: Any = None) -> list[dict[str, Any]]:
        assert path == "/v1/flags"
        return self.flags

    async def call(self, method: str, path: str, **kwargs: Any) -> _Answer:
        step = path.split("/")[-2]
        self.asked.append((step, kwargs["json"]["action"]))
        return self.answers[step]


async def test_the_operator_counts_what_was_decided_and_leaves_a_live_holder_for_later() -> None:
    def flag(definition: str, step: str, kind: str) -> dict[str, Any]:
        return {
            "instance_id": "i",
            "definition": definition,
            "step": step,
            "attempt": 1,
            "flag": {"kind": kind},
        }

    def problem(kind: str, detail: str = "") -> _Answer:
        return _Answer(409, {"type": f"urn:paceline:problem:{kind}", "detail": detail})

    api = _FlagsApi(
        [
            flag("chaos-poison", "poison", "crash_budget"),
            flag("chaos-shell", "deliver", "outcome_unknown"),
            flag("chaos-mixed", "push", "redelivered"),
            flag("chaos-mixed", "fan_post", "redelivered"),
        ],
        {
            "poison": _Answer(202, {}),
            # An earlier try of the same request was recorded, its answer lost: it counts.
            "deliver": problem("already-resolved", "attempt 1 ...: chaos chose retry at ..."),
            "push": problem("holder-alive"),
            "fan_post": problem("not-flagged"),
        },
    )
    operator = Operator(api)  # type: ignore[arg-type]
    assert await operator.resolve_flags() == 4
    assert ("poison", "fail") in api.asked
    assert operator.failed == {("i", "poison")}
    assert operator.retried == Counter({("i", "deliver"): 1})
    assert operator.flag_kinds == Counter({"outcome_unknown": 1})
    assert operator.holder_alive == {("i", "push", 1)} and operator.already_resolved == 1
    # Asked again: only the flag left for later is decided again.
    api.asked.clear()
    await operator.resolve_flags()
    assert [s for s, _ in api.asked] == ["push", "fan_post"]
