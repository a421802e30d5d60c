"""Initialisation of a small language model trained from scratch (stage 1 of the default model).

transformers initialises Llama with N(0, 0.02) everywhere, a scale made for 4096-wide models. At width 256 it
leaves the word embeddings at norm 0.02 * sqrt(256) ~ 0.3, far below the normed image tokens', and every linear
layer shrinking its input ~3x, and the model is slow to gather a phrase into the one state that must look its
object up. This init, with stage 1's phrase-words task (``phrase_words_loss``, shapes/stages.py), makes it learn
that about as fast as a bag-of-words query does (the binding diagnostic in weights/shapes-tiny/MODEL_CARD.md).
Stage 1 applies it with ``reinit_language_model``.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def unit_scale_init(language_model: nn.Module, residual_scale: float = 0.35) -> None:
    """Re-draw a (never trained) language model's weights in place: embeddings N(0, 1) (unit RMS, the scale of
    the normed image tokens), each linear layer N(0, 1/fan_in), the layers writing into the residual stream
    (``o_proj``, ``down_proj``) ``residual_scale`` times that. Norm weights stay at 1."""
    for name, module in language_model.named_modules():
        if isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 1.0)
        elif isinstance(module, nn.Linear):
            scale = residual_scale if name.endswith(("o_proj", "down_proj")) else 1.0
            module.weight.normal_(0.0, scale * module.in_features ** -0.5)
            if module.bias is not None:
                module.bias.zero_()
