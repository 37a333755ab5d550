"""The invariants a chaos run checks once the stack has settled (DESIGN.md: nothing is lost,
non-restartable work never runs twice without a person, every instance ends, nothing of a
cancelled instance starts after the cancel's answer, a crash is charged to its cause, the stack
keeps processing through a rolling restart)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from chaos_api import Api
from chaos_cancels import late_posts, moment
from chaos_load import POISON, POISON_STEP, POST_STEPS, TIMEOUT_STEP, Load, effect_path
from chaos_roll import Roll
from chaos_triggers import Triggers
from chaos_triggers import checks as trigger_checks
from stack_env import StackEnv, broker_of, queue_depths, queue_details, unsettled_holders

EXAMPLES = 5
QUEUE_WAIT_S = 30.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    examples: list[str] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)
    """Instance ids whose history shows what went wrong."""


@dataclass
class Observed:
    """What the API shows of every instance of the run, with the sink's counts."""

    details: dict[str, dict[str, Any]]
    posts: dict[str, int]
    retried: Counter[tuple[str, str]]
    arrivals: dict[str, list[float]] = field(default_factory=dict)
    """sink path -> when each POST to it arrived (time.time())"""
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """instance id -> its history, oldest first"""

    def instance_of_key(self) -> dict[str, list[str]]:
        """The instances started through `POST /v1/instances`, by their `key` input (those a
        schedule or an event started are checked against the ledger and the events:
        chaos_triggers.py)."""
        found: dict[str, list[str]] = defaultdict(list)
        for instance_id, body in self.details.items():
            if body["started_how"] == "api":
                found[str(body["inputs"].get("key"))].append(instance_id)
        return found


async def observe(
    api: Api,
    posts: dict[str, int],
    retried: Counter[tuple[str, str]],
    arrivals: dict[str, list[float]] | None = None,
) -> Observed:
    """Every instance with its activities and its history."""
    summaries = await api.items("/v1/instances")
    gate = asyncio.Semaphore(16)

    async def detail(instance_id: str) -> dict[str, Any]:
        async with gate:
            response = await api.call("GET", f"/v1/instances/{instance_id}")
            response.raise_for_status()
            return dict(response.json())

    async def history(instance_id: str) -> list[dict[str, Any]]:
        async with gate:
            response = await api.call("GET", f"/v1/instances/{instance_id}/history")
            response.raise_for_status()
            return list(response.json()["items"])

    ids = [str(s["id"]) for s in summaries]
    bodies = await asyncio.gather(*(detail(i) for i in ids))
    histories = await asyncio.gather(*(history(i) for i in ids))
    return Observed(
        dict(zip(ids, bodies, strict=True)),
        posts,
        retried,
        arrivals or {},
        dict(zip(ids, histories, strict=True)),
    )


def every_start_accepted(load: Load) -> Check:
    problems = [f"key {k}: {why}" for k, why in {**load.refused, **load.unconfirmed}.items()]
    return Check(
        "every start accepted (202)",
        not problems,
        f"{len(load.started)} accepted, {len(load.refused)} refused, "
        f"{len(load.unconfirmed)} unanswered",
        problems[:EXAMPLES],
    )


def no_server_errors(api: Api) -> Check:
    return Check(
        "the admin API answered no 5xx but 503",
        not api.server_errors,
        f"{len(api.server_errors)} answers with another 5xx",
        api.server_errors[:EXAMPLES],
    )


def none_lost(load: Load, seen: Observed) -> Check:
    missing = [i for i in load.started if i not in seen.details]
    return Check(
        "every started instance exists (none lost)",
        not missing,
        f"{len(load.started) - len(missing)} of {len(load.started)} found",
        [f"{i}: 202 for key {load.started[i]}, not in /v1/instances" for i in missing[:EXAMPLES]],
    )


def none_doubled(load: Load, seen: Observed) -> Check:
    problems: list[str] = []
    for key, ids in seen.instance_of_key().items():
        if key not in load.definition_of:
            problems.extend(f"{i}: key {key} was never started by this run" for i in ids)
        elif len(ids) > 1:
            problems.append(f"key {key} started {len(ids)} times: {', '.join(ids)}")
    return Check(
        "no instance started twice",
        not problems,
        f"{sum(map(len, seen.instance_of_key().values()))} instances for "
        f"{len(load.definition_of)} start keys",
        problems[:EXAMPLES],
    )


def _ended(body: dict[str, Any], load: Load) -> bool:
    """COMPLETED, or FAILED with an error; CANCELLED only if the run cancelled it, and then it
    must be CANCELLED when the cancel's answer said the scheduler had recorded it."""
    status = body["status"]
    assert load.cancels is not None
    cancel = load.cancels.records.get(str(body["id"]))
    if cancel is not None and cancel.recorded_at_answer:
        return bool(status == "CANCELLED")
    if status == "CANCELLED":
        return cancel is not None and cancel.may_be_cancelled
    return status == "COMPLETED" or (status == "FAILED" and bool(body.get("error")))


def all_ended(load: Load, seen: Observed) -> Check:
    statuses = Counter(b["status"] for b in seen.details.values())
    stuck = [i for i in load.started if i in seen.details and not _ended(seen.details[i], load)]
    examples = []
    for i in stuck[:EXAMPLES]:
        body = seen.details[i]
        steps = ", ".join(
            f"{a['step']} {a['status']} (attempt {a['attempts']})"
            for a in body["activities"]
            if a["status"] not in ("COMPLETED", "SKIPPED")
        )
        assert load.cancels is not None
        cancel = load.cancels.records.get(i)
        asked = ""
        if cancel is not None:
            asked = f"; cancelled, answered {cancel.code} {cancel.status or cancel.problem or ''}"
        examples.append(
            f"{i} ({body['definition']}): {body['status']}; {steps or 'no open step'}{asked}"
        )
    return Check(
        "every instance ended (COMPLETED, FAILED with an error, or CANCELLED if cancelled)",
        not stuck,
        ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())),
        examples,
        stuck[:2],
    )


def effects_at_most_once(load: Load, seen: Observed) -> Check:
    by_key = seen.instance_of_key()
    problems, instances = [], []
    for instance_id, body in seen.details.items():
        key = str(body["inputs"].get("key"))
        if len(by_key[key]) != 1:
            continue  # a doubled start: reported by its own invariant
        for step in POST_STEPS.get(body["definition"], ()):
            count = seen.posts.get(effect_path(key, step), 0)
            allowed = 1 + seen.retried[(instance_id, step)]
            if count > allowed:
                problems.append(
                    f"{instance_id} step {step}: {count} POSTs, {allowed - 1} operator retries"
                )
                instances.append(instance_id)
    retries = sum(seen.retried.values())
    return Check(
        "no non-restartable effect twice without an operator retry",
        not problems,
        f"{len(seen.posts)} effect paths, {sum(seen.posts.values())} POSTs, "
        f"{retries} operator retries",
        problems[:EXAMPLES],
        instances[:2],
    )


def completed_effects_happened(seen: Observed) -> Check:
    """A POST step that the API shows COMPLETED must have reached the sink."""
    problems, instances = [], []
    for instance_id, body in seen.details.items():
        key = str(body["inputs"].get("key"))
        for activity in body["activities"]:
            step = activity["step"]
            if step not in POST_STEPS.get(body["definition"], ()):
                continue
            if activity["status"] == "COMPLETED" and not seen.posts.get(effect_path(key, step)):
                problems.append(f"{instance_id} step {step}: COMPLETED, but no POST arrived")
                instances.append(instance_id)
    return Check(
        "every completed effect reached the sink",
        not problems,
        f"{len(problems)} missing",
        problems[:EXAMPLES],
        instances[:2],
    )


async def queues_empty(env: StackEnv) -> Check:
    """Every live queue of the namespace seen empty. Servers keep sending heartbeats, so a
    queue may hold a message at any one moment; one that is never seen empty within
    QUEUE_WAIT_S holds something nobody settles."""
    deadline = time.monotonic() + QUEUE_WAIT_S
    full: dict[str, int | None] = {q: None for q in env.live_queues()}
    while True:
        depths = await queue_depths(env.namespace)
        for q in list(full):
            if depths.get(q) == 0:
                del full[q]
            else:
                full[q] = depths.get(q)
        if not full or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    dead = {q: depths[q] for q in sorted(env.dead_queues()) if depths.get(q)}
    detail = f"{len(env.live_queues())} queues seen empty" if not full else "some never empty"
    if dead:
        detail += "; dead-lettered: " + ", ".join(f"{q} {n}" for q, n in dead.items())
    details = await queue_details(env.namespace) if full else {}
    holders = await unsettled_holders() if full else []
    consumers = await _consumers(env.namespace, set(full)) if full else []
    return Check(
        "every live queue of the namespace empty",
        not full,
        detail,
        [f"{q}: {'missing' if n is None else n} ({details.get(q, '')})" for q, n in full.items()]
        + [f"held by {h}" for h in holders]
        + consumers,
    )


async def _consumers(namespace: str, queues: set[str]) -> list[str]:
    """Who consumes each of `queues`, by connection name, with what each channel holds: the
    broker's view of a message that is never settled (a private broker, asked by its node)."""
    node = broker_of(namespace).node
    if node is None or shutil.which("rabbitmqctl") is None:
        return []

    async def listing(*argv: str) -> list[dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            *("rabbitmqctl", "-q", "-n", node, *argv, "--formatter", "json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            return list(json.loads(out or b"[]"))
        except (TimeoutError, ValueError):
            return []

    names = {}
    for c in await listing("list_connections", "pid", "client_properties"):
        # Client properties come as [name, type, value] triples.
        named = [p[2] for p in c.get("client_properties") or [] if p[0] == "connection_name"]
        names[c["pid"]] = str(named[0]) if named else str(c["pid"])
    channels = {
        c["pid"]: c
        for c in await listing(
            "list_channels", "pid", "connection", "number", "messages_unacknowledged"
        )
    }
    found = []
    for c in await listing("list_consumers", "queue_name", "channel_pid", "prefetch_count"):
        if c.get("queue_name") in queues:
            channel = channels.get(c["channel_pid"], {})
            owner = names.get(channel.get("connection"), "a connection not listed")
            found.append(
                f"consumer of {c['queue_name']}: {owner} channel {channel.get('number', '?')}, "
                f"prefetch {c.get('prefetch_count')}, unacknowledged "
                f"{channel.get('messages_unacknowledged', '?')}"
            )
    return found


def kept_processing(rolls: list[Roll], seen: Observed) -> Check:
    """Instances completed while each rolling restart ran, every worker drained exited 0, and
    each one's replacement came up."""
    finished = sorted(
        moment(b["finished_at"])
        for b in seen.details.values()
        if b["status"] == "COMPLETED" and b.get("finished_at")
    )
    problems, done = [], []
    for roll in rolls:
        end = roll.ended_at if roll.ended_at is not None else roll.started_at
        completed = sum(roll.started_at <= t <= end for t in finished)
        problems += [f"roll {roll.index}: {p}" for p in roll.problems]
        if not completed:
            problems.append(
                f"roll {roll.index}: no instance completed in its {end - roll.started_at:.0f}s"
            )
        done.append(f"{completed} in {end - roll.started_at:.0f}s")
    drained = sum(len(r.drained) for r in rolls)
    detail = (
        f"{len(rolls)} rolls, {drained} workers drained (exit 0) and replaced; "
        f"instances completed during each: {', '.join(done)}"
        if rolls
        else "no rolling restart in this run"
    )
    return Check(
        "the stack kept processing through every rolling restart",
        not problems,
        detail,
        problems[:EXAMPLES],
    )


def no_effect_after_cancel(load: Load, seen: Observed) -> Check:
    """For every instance the run cancelled: no POST of it reached the sink after the answer
    (or, answered before the scheduler recorded it, after the history shows it recorded),
    except one of an attempt granted to a worker before the cancel was recorded."""
    assert load.cancels is not None
    problems, instances, allowed, unlisted = [], [], 0, 0
    took_effect = 0
    for instance_id, record in load.cancels.records.items():
        body = seen.details.get(instance_id)
        if body is None or not record.may_be_cancelled:
            continue
        key = str(body["inputs"].get("key"))
        paths = {step: effect_path(key, step) for step in POST_STEPS.get(body["definition"], ())}
        late = late_posts(record, seen.histories.get(instance_id, []), paths, seen.arrivals)
        if late is None:
            continue
        took_effect += 1
        allowed += len(late.allowed)
        unlisted += len(late.unlisted)
        problems += late.violations
        if late.violations:
            instances.append(instance_id)
    answers = ", ".join(f"{n} {k}" for k, n in sorted(load.cancels.summary().items()))
    cancelling = [r for r in load.cancels.records.values() if r.status == "CANCELLING"]
    waited = sum(len(r.waiting_for or ()) for r in cancelling)
    stopped = sum(r.status_after == "CANCELLED" for r in cancelling)
    detail = (
        f"{len(load.cancels.records)} cancels ({answers or 'none'}); {took_effect} took effect; "
        f"CANCELLING ones waited for {waited} steps ({stopped} CANCELLED when read); "
        f"{allowed} POSTs after the answer, of attempts granted before it"
    )
    if unlisted:
        detail += f" ({unlisted} of steps no longer in waiting_for when read)"
    return Check(
        "no effect started after a cancel answer",
        not problems,
        detail,
        problems[:EXAMPLES],
        instances[:2],
    )


def _flags(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(step, flag kind) of every `flagged` entry."""
    return [
        (str(h.get("step")), str((h.get("data") or {}).get("flag")))
        for h in history
        if h["kind"] == "flagged"
    ]


def no_healthy_quarantined(seen: Observed) -> Check:
    """Only the poison step is ever flagged `crash_budget`: its neighbours, also those that ran
    on a worker it took down, complete."""
    problems, instances = [], []
    isolated = 0
    for instance_id, history in seen.histories.items():
        body = seen.details.get(instance_id, {})
        isolated += sum(1 for h in history if (h.get("data") or {}).get("isolated"))
        for step, kind in _flags(history):
            poison = body.get("definition") == POISON and step == POISON_STEP
            if kind == "crash_budget" and not poison:
                problems.append(
                    f"{instance_id} ({body.get('definition')}) step {step}: flagged crash_budget"
                )
                instances.append(instance_id)
    return Check(
        "no healthy activity quarantined",
        not problems,
        f"{len(problems)} healthy activities flagged crash_budget; {isolated} attempts run "
        "alone in an isolated runner",
        problems[:EXAMPLES],
        instances[:2],
    )


def poison_failed(load: Load, seen: Observed, failed: set[tuple[str, str]], settled: bool) -> Check:
    """Every poison instance was quarantined (flagged `crash_budget`) and then failed by the
    operator; or, only when the run was cut short, is still flagged so."""
    poisons = [i for i, key in load.started.items() if load.definition_of.get(key) == POISON]
    problems, instances, waiting = [], [], 0
    for instance_id in poisons:
        body = seen.details.get(instance_id)
        if body is None:
            continue  # reported as lost
        flags = [
            kind
            for step, kind in _flags(seen.histories.get(instance_id, []))
            if step == POISON_STEP
        ]
        activity = next((a for a in body["activities"] if a["step"] == POISON_STEP), None)
        failed_by_operator = (
            body["status"] == "FAILED"
            and (instance_id, POISON_STEP) in failed
            and activity is not None
            and (activity.get("error") or {}).get("kind") == "operator"
        )
        if "crash_budget" in flags and failed_by_operator:
            continue
        flag = (activity or {}).get("flag") or {}
        still_flagged = body["status"] == "FLAGGED" and flag.get("kind") == "crash_budget"
        if still_flagged and not settled:
            waiting += 1
            continue
        state = f"{activity['status']} (attempt {activity['attempts']})" if activity else "not run"
        problems.append(
            f"{instance_id}: {body['status']}, step {POISON_STEP} {state}; flags "
            f"{', '.join(flags) or 'none'}"
        )
        instances.append(instance_id)
    detail = f"{len(poisons)} poison instances, {len(poisons) - len(problems) - waiting} failed"
    if waiting:
        detail += f"; {waiting} still flagged crash_budget (the run was cut short: not settled)"
    return Check(
        "every poison quarantined, then failed by the operator",
        not problems,
        detail,
        problems[:EXAMPLES],
        instances[:2],
    )


def timeouts_flagged(load: Load, seen: Observed) -> Check:
    """A POST sent whose answer did not come within its `timeout` (the sink held the first one
    longer) has an unknown outcome: its activity is flagged, never retried by itself; the
    operator's retry sends the second POST."""
    problems, instances, held, kinds = [], [], 0, Counter[str]()
    by_key = seen.instance_of_key()
    assert load.cancels is not None
    for key, inputs in load.inputs_of.items():
        if not inputs.get("hold_first") or len(by_key.get(key, ())) != 1:
            continue
        instance_id = by_key[key][0]
        path = effect_path(key, TIMEOUT_STEP)
        if not seen.posts.get(path):
            continue  # never sent (cancelled or failed before it)
        held += 1
        flags = [
            k for step, k in _flags(seen.histories.get(instance_id, [])) if step == TIMEOUT_STEP
        ]
        kinds.update(flags[:1])
        cancelled = (
            instance_id in load.cancels.records
            and seen.details[instance_id]["status"] == "CANCELLED"
        )
        retries = seen.retried[(instance_id, TIMEOUT_STEP)]
        if not flags and not cancelled:
            problems.append(
                f"{instance_id} step {TIMEOUT_STEP}: its first POST timed out, never flagged "
                f"({seen.posts[path]} POSTs)"
            )
            instances.append(instance_id)
        elif seen.posts[path] > 1 + retries:
            problems.append(
                f"{instance_id} step {TIMEOUT_STEP}: {seen.posts[path]} POSTs, {retries} "
                "operator retries"
            )
            instances.append(instance_id)
    return Check(
        "a POST that timed out was flagged, never repeated by itself",
        not problems,
        f"{held} first POSTs held past their timeout; flagged "
        + (", ".join(f"{n} {k}" for k, n in kinds.most_common()) or "none"),
        problems[:EXAMPLES],
        instances[:2],
    )


async def check_all(
    env: StackEnv,
    api: Api,
    load: Load,
    seen: Observed,
    *,
    rolls: list[Roll],
    failed: set[tuple[str, str]],
    settled: bool,
    triggers: Triggers,
) -> list[Check]:
    started_otherwise = [
        Check(name, ok, detail, examples)
        for name, ok, detail, examples in await trigger_checks(env.database_url, triggers)
    ]
    return [
        every_start_accepted(load),
        no_server_errors(api),
        none_lost(load, seen),
        none_doubled(load, seen),
        all_ended(load, seen),
        effects_at_most_once(load, seen),
        completed_effects_happened(seen),
        timeouts_flagged(load, seen),
        no_effect_after_cancel(load, seen),
        no_healthy_quarantined(seen),
        poison_failed(load, seen, failed, settled),
        kept_processing(rolls, seen),
        *started_otherwise,
        await queues_empty(env),
    ]
