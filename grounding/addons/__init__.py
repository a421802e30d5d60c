"""Add-ons: optional extras a checkpoint names in ``groundseg.json`` (base.py says which hooks they have)."""
from grounding.addons.base import AddOn, AnswerRows, DecoderPrompts, LogitsRule, MaskContext, SegRead
from grounding.addons.registry import addon_class, build_addons, register_addon
from grounding.addons import masks as _builtin_mask_steps  # noqa: F401  (registers mask_zoom, mask_refine, ...)

__all__ = ["AddOn", "AnswerRows", "DecoderPrompts", "LogitsRule", "MaskContext", "SegRead", "addon_class",
           "build_addons", "register_addon"]
