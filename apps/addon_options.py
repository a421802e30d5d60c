"""``--addon`` options: change a checkpoint's add-ons for one command (grounding/addons/).

    --addon mask_refine=off          turn an add-on off
    --addon clicked_parts=on         turn one on with its default settings
    --addon mask_zoom.context=2      change one setting (turning the add-on on if needed)
    --addon locator.mirror=false

Values are read as YAML scalars (numbers, true/false, text).
"""
from __future__ import annotations

from typing import Any

import yaml

from grounding.errors import GroundsegError

ADDON_HELP = ("Change an add-on of the checkpoint: NAME=off, NAME=on or NAME.SETTING=VALUE (repeatable; "
              "e.g. mask_refine=off, locator.mirror=false).")


class AddonOptionError(GroundsegError):
    """An ``--addon`` option that cannot be read."""


def parse_addon_options(options: list[str] | None) -> dict[str, Any]:
    """``["mask_zoom.context=2", "mask_refine=off"]`` -> ``{"mask_zoom": {"context": 2}, "mask_refine": None}``
    (the ``addons`` argument of ``Grounder``)."""
    out: dict[str, Any] = {}
    for option in options or ():
        key, sep, text = option.partition("=")
        name, dot, setting = key.strip().partition(".")
        if not sep or not name or (dot and not setting):
            raise AddonOptionError(f"--addon {option!r}: write NAME=off, NAME=on or NAME.SETTING=VALUE")
        value = yaml.safe_load(text) if text.strip() else None
        if not dot:
            if value not in (True, False) and text.strip().lower() not in ("on", "off"):
                raise AddonOptionError(f"--addon {option!r}: an add-on is turned on or off (NAME=on / NAME=off)")
            on = text.strip().lower() == "on" or value is True
            out[name] = out.get(name) or {} if on else None
            continue
        settings = out.get(name) or {}
        settings[setting] = value
        out[name] = settings
    return out
