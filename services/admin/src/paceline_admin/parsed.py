"""Stored definitions, parsed once: a (name, version) never changes once saved, and parsing a
large one takes a good fraction of a second, which a start would otherwise pay every time."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from paceline_engine.definitions import Definition, parse_definition

CACHE_SIZE = 256
"""Parsed definitions kept, the most recently used."""

_cache: OrderedDict[tuple[str, int], Definition] = OrderedDict()


async def parsed(name: str, version: int, body: Any) -> Definition:
    """The stored definition `name` `version` (whose body is `body`), parsed off the event
    loop the first time. Raises DefinitionError when it no longer validates (not cached)."""
    key = (name, version)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    definition = await asyncio.to_thread(parse_definition, body, version=version)
    _cache[key] = definition
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return definition
