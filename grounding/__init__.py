"""groundseg's core: any grounding checkpoint, one inference pipeline.

    from grounding import Grounder
    grounder = Grounder.from_pretrained("weights/shapes-tiny")
    prediction = grounder.predict("photo.jpg", "Where is the red circle?")

Public API: ``Grounder``, ``PrefixEngine``, ``Query``, ``Prediction``, ``Target``, ``load_checkpoint``,
``save_checkpoint``, ``GroundingConfig``, ``AddOn``, ``register_addon``, ``ModelFamily``, ``register_family``.
Names are imported when first used, so ``import grounding.text.boxes`` stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Grounder": "grounding.inference.predictor",
    "PrefixEngine": "grounding.inference.engine",
    "Query": "grounding.inference.prepared",
    "Prediction": "grounding.result",
    "Target": "grounding.result",
    "load_checkpoint": "grounding.checkpoint",
    "save_checkpoint": "grounding.checkpoint",
    "GroundingConfig": "grounding.config",
    "AddOn": "grounding.addons",
    "register_addon": "grounding.addons",
    "ModelFamily": "grounding.families",
    "register_family": "grounding.families",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'grounding' has no attribute {name!r}")
