"""A LayerNorm on the vision features before LLaVA's projector (as InternVL's projector starts), for towers
trained from scratch.

LLaVA's projector (Linear -> GELU -> Linear) reads the tower's residual stream as is. A small tower trained from
scratch grows that stream to norms in the hundreds, so its image tokens reached the language model at a norm of
~85 against ~0.4 for the text embeddings (the default model's first stage 1, 2026-11-23): after the first layer
the text positions were swamped by what attention copied in, and the model never learnt to read the image (every
region was "a small purple dotted circle", masks at chance, over 1,700 steps). With the norm the projected
tokens start at the text embeddings' scale. Real LLaVA checkpoints keep their projector as it is
(``GroundingConfig.projector_norm`` False).

The norm is an attribute of the existing projector applied by a forward pre-hook, so the projector's own weights
keep their transformers names and only ``multi_modal_projector.norm.{weight,bias}`` are added.
"""
from __future__ import annotations

from torch import nn


def install_projector_norm(projector: nn.Module, width: int) -> None:
    """Give ``projector`` (LLaVA's ``multi_modal_projector``) a LayerNorm over its ``width``-wide input."""
    if hasattr(projector, "norm"):
        return
    projector.norm = nn.LayerNorm(width)
    projector.register_forward_pre_hook(lambda module, args: (module.norm(args[0]), *args[1:]))
