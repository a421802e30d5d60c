"""Registries that other packages extend: a name not registered yet is looked up in the installed packages'
entry points of the registry's group (importing such a package registers what it defines)."""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Hashable


def registered(registry: dict, key: Hashable, group: str) -> Any:
    """``registry[key]``, after loading ``group``'s entry points when ``key`` is missing; None if still missing."""
    if key not in registry:
        for point in entry_points(group=group):
            point.load()
    return registry.get(key)
