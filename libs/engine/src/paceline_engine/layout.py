"""Where each step sits in its definition: the sequence that holds it, its index there, and the
container step (condition or parallel) that owns that sequence.

The engine moves on from a step that finished by looking only at its place (the next step of
the same sequence, or the container that owns the sequence), never by walking the whole
definition: the cost of a transition does not grow with the number of steps.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from paceline_engine.definitions import ConditionStep, Definition, ParallelStep, Step, WaitStep

__all__ = ["Layout", "Place", "layout_of"]


@dataclass(frozen=True, slots=True)
class Place:
    """Where one step is."""

    sequence: tuple[Step, ...]
    """The sequence (root, a condition's `then`/`else`, or a parallel branch) holding it."""
    index: int
    """Its 0-based index in `sequence`."""
    owner: str | None
    """The condition or parallel step whose branch `sequence` is; None for the root."""
    position: int
    """Its 0-based place among all steps, depth first, in definition order."""


class Layout:
    """Every step's `Place`, built once per definition (linear in its size)."""

    __slots__ = ("_places", "_waits", "_waits_by_signal")

    def __init__(self, definition: Definition) -> None:
        self._places: dict[str, Place] = {}
        self._waits: dict[str, WaitStep] = {}
        self._waits_by_signal: dict[str, list[WaitStep]] = {}
        for step in definition.walk():
            if isinstance(step, WaitStep):
                self._waits[step.id] = step
                if step.signal is not None:
                    self._waits_by_signal.setdefault(step.signal, []).append(step)
        # An explicit stack: nesting depth costs no Python frames.
        stack: list[tuple[tuple[Step, ...], str | None]] = [(definition.steps, None)]
        order: list[tuple[tuple[Step, ...], int, str | None]] = []
        while stack:
            sequence, owner = stack.pop()
            for index, step in enumerate(sequence):
                order.append((sequence, index, owner))
                if isinstance(step, ConditionStep):
                    stack.append((step.otherwise, step.id))
                    stack.append((step.then, step.id))
                elif isinstance(step, ParallelStep):
                    stack.extend((branch, step.id) for branch in reversed(step.branches))
        positions = {s.id: n for n, s in enumerate(definition.walk())}
        for sequence, index, owner in order:
            step_id = sequence[index].id
            self._places[step_id] = Place(sequence, index, owner, positions[step_id])

    def place(self, step_id: str) -> Place:
        """Raises KeyError for a step the definition does not have."""
        return self._places[step_id]

    def position(self, step_id: str) -> int:
        return self._places[step_id].position

    def wait(self, step_id: str) -> WaitStep:
        """The wait step `step_id`; KeyError when it is not one."""
        return self._waits[step_id]

    def waits_for(self, signal: str) -> list[WaitStep]:
        """The wait steps for `signal`, in definition order."""
        return self._waits_by_signal.get(signal, [])


_CACHE_SIZE = 512
# Keyed by id(): the cache holds the definition itself, so its id cannot be reused while cached.
_cache: OrderedDict[int, tuple[Definition, Layout]] = OrderedDict()


def layout_of(definition: Definition) -> Layout:
    """The definition's layout, computed once for each of the `_CACHE_SIZE` most recently used
    definitions (schedulers keep their definitions for ever, so it is computed once)."""
    key = id(definition)
    hit = _cache.get(key)
    if hit is not None and hit[0] is definition:
        _cache.move_to_end(key)
        return hit[1]
    layout = Layout(definition)
    _cache[key] = (definition, layout)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return layout
