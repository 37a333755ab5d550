"""The invariants a chaos run checks once the stack has settled (DESIGN.md: nothing is lost,
non-restartable work never runs twice without a person, every instance ends)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from chaos_api import Api
from chaos_load import POST_STEPS, Load, effect_path
from stack_env import StackEnv, queue_depths, queue_details, unsettled_holders

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

    def instance_of_key(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = defaultdict(list)
        for instance_id, body in self.details.items():
            found[str(body["inputs"].get("key"))].append(instance_id)
        return found


async def observe(api: Api, posts: dict[str, int], retried: Counter[tuple[str, str]]) -> Observed:
    summaries = await api.items("/v1/instances")
    gate = asyncio.Semaphore(16)

    async def detail(instance_id: str) -> dict[str, Any]:
        async with gate:
            response = await api.call("GET", f"/v1/instances/{instance_id}")
            response.raise_for_status()
            return dict(response.json())

    ids = [str(s["id"]) for s in summaries]
    bodies = await asyncio.gather(*(detail(i) for i in ids))
    return Observed(dict(zip(ids, bodies, strict=True)), posts, retried)


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
    problems = []
    for key, ids in seen.instance_of_key().items():
        if key not in load.definition_of:
            problems.extend(f"{i}: key {key} was never started by this run" for i in ids)
        elif len(ids) > 1:
            problems.append(f"key {key} started {len(ids)} times: {', '.join(ids)}")
    return Check(
        "no instance started twice",
        not problems,
        f"{len(seen.details)} instances for {len(load.definition_of)} start keys",
        problems[:EXAMPLES],
    )


def _ended(body: dict[str, Any]) -> bool:
    status = body["status"]
    return status == "COMPLETED" or (status == "FAILED" and bool(body.get("error")))


def all_ended(load: Load, seen: Observed) -> Check:
    statuses = Counter(b["status"] for b in seen.details.values())
    stuck = [i for i in load.started if i in seen.details and not _ended(seen.details[i])]
    examples = []
    for i in stuck[:EXAMPLES]:
        body = seen.details[i]
        steps = ", ".join(
            f"{a['step']} {a['status']} (attempt {a['attempts']})"
            for a in body["activities"]
            if a["status"] not in ("COMPLETED", "SKIPPED")
        )
        examples.append(f"{i} ({body['definition']}): {body['status']}; {steps or 'no open step'}")
    return Check(
        "every instance ended (COMPLETED, or FAILED with an error)",
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
    return Check(
        "every live queue of the namespace empty",
        not full,
        detail,
        [f"{q}: {'missing' if n is None else n} ({details.get(q, '')})" for q, n in full.items()]
        + [f"held by {h}" for h in holders],
    )


async def check_all(env: StackEnv, api: Api, load: Load, seen: Observed) -> list[Check]:
    return [
        every_start_accepted(load),
        no_server_errors(api),
        none_lost(load, seen),
        none_doubled(load, seen),
        all_ended(load, seen),
        effects_at_most_once(load, seen),
        completed_effects_happened(seen),
        await queues_empty(env),
    ]
