"""The chaos run's load: a few definitions mixing restartable and non-restartable steps, and
instances started at a steady rate, every accepted one recorded.

Each instance gets an input `key`; its non-restartable POSTs go to `/effect/<key>/<step>` on the
sink, so a count there belongs to exactly one (instance, step).

Mixed in with the faults the run injects, the load itself brings three more:
- time-outs: chaos-shell's `deliver` POSTs with a 1 s `timeout`, and for some instances the
  sink holds its first request longer (`?hold_first=`): the outcome is unknown, the activity
  flagged `outcome_unknown`, and only the operator's retry may POST again;
- poison: one start in POISON_EVERY is a `chaos-poison` instance, whose restartable shell step
  SIGKILLs the process that runs it (its worker, then its isolated runner) every time;
- cancels: a share of the started instances is cancelled a moment later (chaos_cancels.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from chaos_api import Api, ApiUnavailable
from chaos_cancels import CANCEL_AFTER_S, CANCEL_SHARE, Cancels

POST_STEPS = {
    "chaos-mixed": {"push", "fan_post"},
    "chaos-shell": {"notify", "notify_again", "deliver"},
    "chaos-light": set(),
    "chaos-poison": set(),
}
"""The steps of each definition that POST to the sink (non-restartable side effects)."""
WEIGHTS = {"chaos-mixed": 5, "chaos-shell": 4, "chaos-light": 2}
"""How often each definition but the poison is started."""
POISON = "chaos-poison"
POISON_STEP = "poison"
POISON_EVERY = 200
"""One start in this many is a poison instance, at a seeded offset in its second half: a short
run (480 starts) has two, a 200-fault one (2400) twelve. Each takes down two workers and three
isolated runners before it is quarantined."""
TIMEOUT_STEP = "deliver"
"""chaos-shell's POST with a 1 s `timeout`."""
HOLD_FIRST_S = 3.0
"""How long the sink holds the first `deliver` POST of an instance chosen to time out."""
TIMEOUT_SHARE = 0.1
"""The share of chaos-shell instances whose first `deliver` POST times out."""


def effect_path(key: str, step: str) -> str:
    return f"/effect/{key}/{step}"


def _post(step: str, sink: str) -> dict[str, Any]:
    return {
        "id": step,
        "type": "http.request",
        "with": {
            "method": "POST",
            "url": f"{sink}/effect/${{inputs.key}}/{step}?hold=${{inputs.hold}}",
            "json": {"key": "${inputs.key}", "step": step},
        },
    }


def _post_timing_out(step: str, sink: str) -> dict[str, Any]:
    """A POST that gives up after 1 s: when the sink holds its first request for longer
    (`hold_first`), the request was sent and no answer came: its outcome is unknown."""
    return {
        "id": step,
        "type": "http.request",
        "with": {
            "method": "POST",
            "url": f"{sink}/effect/${{inputs.key}}/{step}?hold_first=${{inputs.hold_first}}",
            "json": {"key": "${inputs.key}", "step": step},
            "timeout": 1,
        },
    }


def definitions(sink: str) -> list[dict[str, Any]]:
    inputs = {
        "key": {"type": "string"},
        "nap": {"type": "number"},
        "hold": {"type": "number"},
        "flip": {"type": "boolean"},
        "hold_first": {"type": "number", "default": 0},
    }
    look = {"id": "look", "type": "http.request", "with": {"method": "GET", "url": f"{sink}/look"}}
    nap = {"id": "nap", "type": "sleep", "with": {"seconds": "${inputs.nap}"}}
    mixed = {
        "name": "chaos-mixed",
        "inputs": inputs,
        "steps": [
            look,
            nap,
            _post("push", sink),
            {
                "id": "fan",
                "parallel": [
                    [{"id": "fan_noop", "type": "noop", "with": {"key": "${inputs.key}"}}],
                    [_post("fan_post", sink)],
                    [{"id": "fan_nap", "type": "sleep", "with": {"seconds": "${inputs.nap}"}}],
                ],
            },
            {
                "id": "gate",
                "if": "steps.look.output.status == 200",
                "then": [{"id": "tail", "type": "shell.command", "with": {"argv": ["true"]}}],
                "else": [{"id": "odd", "type": "noop", "with": {}}],
            },
        ],
    }
    shell = {
        "name": "chaos-shell",
        "inputs": inputs,
        "steps": [
            {"id": "run", "type": "shell.command", "with": {"argv": ["true"]}},
            _post("notify", sink),
            {
                "id": "choose",
                "if": "inputs.flip",
                "then": [_post("notify_again", sink)],
                "else": [{"id": "quiet", "type": "noop", "with": {"flip": "${inputs.flip}"}}],
            },
            {"id": "rest", "type": "sleep", "with": {"seconds": "${inputs.nap}"}},
            _post_timing_out(TIMEOUT_STEP, sink),
        ],
    }
    light = {
        "name": "chaos-light",
        "inputs": inputs,
        "steps": [
            {"id": "first", "type": "noop", "with": {"key": "${inputs.key}"}},
            nap,
            look,
        ],
    }
    poison = {
        "name": POISON,
        "inputs": inputs,
        "steps": [
            {"id": "before", "type": "noop", "with": {"key": "${inputs.key}"}},
            {
                # Kills the process that runs it: its worker, or its isolated runner.
                "id": POISON_STEP,
                "type": "shell.command",
                "restartable": True,
                "with": {"argv": ["sh", "-c", "kill -9 $PPID; sleep 5"]},
            },
        ],
    }
    return [mixed, shell, light, poison]


@dataclass
class Load:
    """Starts instances and remembers every one the API accepted (202); cancels some."""

    api: Api
    rng: random.Random
    rate: float
    started: dict[str, str] = field(default_factory=dict)
    """instance id -> its key"""
    definition_of: dict[str, str] = field(default_factory=dict)
    """key -> definition name, for every start attempted"""
    inputs_of: dict[str, dict[str, Any]] = field(default_factory=dict)
    """key -> the inputs it was started with"""
    unconfirmed: dict[str, str] = field(default_factory=dict)
    """key -> why its start never got an answer: such an instance may or may not exist"""
    refused: dict[str, str] = field(default_factory=dict)
    """key -> the 4xx a valid start got"""
    cancels: Cancels | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.cancels is None:
            self.cancels = Cancels(self.api)
        # Start number `poison_offset`, then every POISON_EVERY-th, is a poison instance.
        self.poison_offset = self.rng.randrange(POISON_EVERY // 2, POISON_EVERY)

    async def define(self, sink: str) -> None:
        for definition in definitions(sink):
            response = await self.api.call("POST", "/v1/definitions", json=definition)
            if response.status_code != 201:
                raise RuntimeError(f"definition refused: {response.status_code} {response.text}")

    async def run(self, until: float) -> None:
        """Start instances at `rate` per second until the monotonic time `until`."""
        n = 0
        begin = time.monotonic()
        while time.monotonic() < until:
            n += 1
            self._spawn(self._start(n))
            # A fixed schedule, not a sleep after each start: slow answers do not slow the rate.
            await asyncio.sleep(max(0.0, begin + n / self.rate - time.monotonic()))
        await self.finish()

    async def finish(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _inputs(self, n: int) -> tuple[str, dict[str, Any], float | None]:
        """The definition, the inputs, and when to cancel it (None: it is not cancelled)."""
        definition = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        hold = self.rng.choice([0, 0, 0.5, 1.0, 2.0, 3.0])
        inputs = {
            "key": f"{self.rng.getrandbits(48):012x}",
            "nap": round(self.rng.uniform(0.05, 1.0), 2),
            "hold": hold,
            "flip": self.rng.random() < 0.5,
        }
        times_out = self.rng.random() < TIMEOUT_SHARE
        cancel_after = self.rng.uniform(*CANCEL_AFTER_S)
        cancelled = self.rng.random() < CANCEL_SHARE
        if n % POISON_EVERY == self.poison_offset:
            # Never cancelled: a poison ends FAILED by the operator once it is quarantined.
            return POISON, inputs, None
        if definition == "chaos-shell" and times_out:
            inputs["hold_first"] = HOLD_FIRST_S
        return definition, inputs, cancel_after if cancelled else None

    async def _start(self, n: int) -> None:
        definition, inputs, cancel_after = self._inputs(n)
        key = inputs["key"]
        self.definition_of[key] = definition
        self.inputs_of[key] = inputs
        body = {"definition": definition, "inputs": inputs}
        # The same Idempotency-Key on every try (Api.call tries again on a broken connection or
        # a 5xx): a start that was recorded but whose answer was lost comes back as the same
        # instance, never a second one.
        headers = {"Idempotency-Key": f"chaos-{key}"}
        try:
            response = await self.api.call(
                "POST", "/v1/instances", json=body, headers=headers, patience=90
            )
        except ApiUnavailable as exc:
            self.unconfirmed[key] = str(exc)
            return
        if response.status_code == 202:
            instance_id = str(response.json()["id"])
            self.started[instance_id] = key
            if cancel_after is not None:
                assert self.cancels is not None
                await asyncio.sleep(cancel_after)
                await self.cancels.cancel(instance_id, definition, key)
        else:
            self.refused[key] = f"start {n}: {response.status_code} {response.text[:300]}"
