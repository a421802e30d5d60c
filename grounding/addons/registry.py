"""Which add-on class a name means: add-ons register themselves with ``@register_addon``; a name not yet
registered is looked up in the installed packages' ``groundseg.addons`` entry points (importing such a package
registers its add-ons), so the core never imports the packages that define them."""
from __future__ import annotations

from typing import Any, Mapping

from grounding.addons.base import AddOn
from grounding.errors import CheckpointError
from grounding.plugins import registered

ENTRY_POINT_GROUP = "groundseg.addons"
_REGISTRY: dict[str, type[AddOn]] = {}


def register_addon(cls: type[AddOn]) -> type[AddOn]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"two add-ons are named {cls.name!r}: {_REGISTRY[cls.name].__module__} and {cls.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def addon_class(name: str) -> type[AddOn]:
    if registered(_REGISTRY, name, ENTRY_POINT_GROUP) is None:
        raise CheckpointError(f"unknown add-on {name!r}; known: {', '.join(sorted(_REGISTRY)) or 'none'} "
                              f"(an add-on comes from a package that registers it under '{ENTRY_POINT_GROUP}')")
    return _REGISTRY[name]


def build_addons(settings: Mapping[str, Mapping[str, Any] | None]) -> list[AddOn]:
    """``{name: settings}`` (a checkpoint's ``addons``) -> add-on instances, in that order."""
    out = []
    for name, values in settings.items():
        cls = addon_class(name)
        try:
            out.append(cls(cls.parse_settings(values)))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"add-on {name!r}: {exc}") from exc
    return out
