"""The chaos run's load: a few definitions mixing restartable and non-restartable steps, and
instances started at a steady rate, every accepted one recorded.

Each instance gets an input `key`; its non-restartable POSTs go to `/effect/<key>/<step>` on the
sink, so a count there belongs to exactly one (instance, step).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from chaos_api import Api, ApiUnavailable

POST_STEPS = {
    "chaos-mixed": {"push", "fan_post"},
    "chaos-shell": {"notify", "notify_again"},
    "chaos-light": set(),
}
"""The steps of each definition that POST to the sink (non-restartable side effects)."""


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


def definitions(sink: str) -> list[dict[str, Any]]:
    inputs = {
        "key": {"type": "string"},
        "nap": {"type": "number"},
        "hold": {"type": "number"},
        "flip": {"type": "boolean"},
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
    return [mixed, shell, light]


@dataclass
class Load:
    """Starts instances and remembers every one the API accepted (202)."""

    api: Api
    rng: random.Random
    rate: float
    started: dict[str, str] = field(default_factory=dict)
    """instance id -> its key"""
    definition_of: dict[str, str] = field(default_factory=dict)
    """key -> definition name, for every start attempted"""
    unconfirmed: dict[str, str] = field(default_factory=dict)
    """key -> why its start never got an answer: such an instance may or may not exist"""
    refused: dict[str, str] = field(default_factory=dict)
    """key -> the 4xx a valid start got"""
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

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
            task = asyncio.create_task(self._start(n))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # A fixed schedule, not a sleep after each start: slow answers do not slow the rate.
            await asyncio.sleep(max(0.0, begin + n / self.rate - time.monotonic()))
        await self.finish()

    async def finish(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks)

    def _inputs(self) -> tuple[str, dict[str, Any]]:
        definition = self.rng.choices(list(POST_STEPS), weights=[5, 4, 2])[0]
        hold = self.rng.choice([0, 0, 0.5, 1.0, 2.0, 3.0])
        inputs = {
            "key": f"{self.rng.getrandbits(48):012x}",
            "nap": round(self.rng.uniform(0.05, 1.0), 2),
            "hold": hold,
            "flip": self.rng.random() < 0.5,
        }
        return definition, inputs

    async def _start(self, n: int) -> None:
        definition, inputs = self._inputs()
        key = inputs["key"]
        self.definition_of[key] = definition
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
            self.started[response.json()["id"]] = key
        else:
            self.refused[key] = f"start {n}: {response.status_code} {response.text[:300]}"
