"""A convolutional patch embedding for small ViT towers trained from scratch ("early convolutions",
Xiao et al. 2021).

CLIP's patch embedding is one ``patch x patch`` convolution with stride ``patch``: a linear map of each patch's
pixels. Pretrained at CLIP's scale that is enough; a 4-layer tower trained from scratch on a few thousand images
learns colour and position quickly through it but the shape of an object (a triangle vs a star) very slowly.
Here ``log2(patch)`` stages of two 3x3 convolutions (the first with stride 2; GroupNorm and GELU between) give
the same ``[B, width, s/patch, s/patch]`` grid with local shape features, and CLIP's linear patch embedding is
added to it: GroupNorm removes each image's mean colour, which the linear path keeps. The stems were compared
on the per-patch labels of the synthetic scenes (shapes/scenes/patch_labels.py); the measurements are in
weights/shapes-tiny/MODEL_CARD.md.
It is the ``vision_stem`` add-on (``kind: conv``; shapes/addons.py); real LLaVA checkpoints keep CLIP's own
embedding (they do not name the add-on).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class ConvPatchEmbedding(nn.Module):
    """``[B, 3, s, s]`` -> ``[B, width, s / patch, s / patch]``: ``net`` (per stage: stride-2 conv, GroupNorm,
    GELU, conv; widths doubling up to ``width``; no norm or activation after the last) + ``linear`` (CLIP's
    ``patch x patch`` stride-``patch`` convolution)."""

    def __init__(self, width: int, patch_size: int, channels: int = 3):
        super().__init__()
        n = int(math.log2(patch_size))
        if 2 ** n != patch_size:
            raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch_size}")
        widths = [channels] + [max(16, width >> (n - 1 - i)) for i in range(n)]
        layers: list[nn.Module] = []
        for i in range(n):
            w = widths[i + 1]
            layers += [nn.Conv2d(widths[i], w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.GELU(),
                       nn.Conv2d(w, w, 3, padding=1)]
            if i < n - 1:
                layers += [nn.GroupNorm(8, w), nn.GELU()]
        self.net = nn.Sequential(*layers)
        self.linear = nn.Conv2d(channels, width, patch_size, stride=patch_size)

    @property
    def weight(self) -> torch.Tensor:
        """CLIP's embeddings read ``patch_embedding.weight.dtype`` to cast the pixels."""
        return self.linear.weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels) + self.linear(pixels)


def install_vision_stem(vision_tower: nn.Module, kind: str | None) -> None:
    """Replace a CLIP tower's patch embedding in place (``kind``: None keeps CLIP's, ``"conv"``)."""
    if kind is None:
        return
    if kind != "conv":
        raise ValueError(f"unknown vision_stem {kind!r}; use 'conv' or leave it unset")
    embeddings = vision_tower.embeddings if hasattr(vision_tower, "embeddings") else vision_tower.vision_model.embeddings
    config = embeddings.config
    embeddings.patch_embedding = ConvPatchEmbedding(config.hidden_size, config.patch_size, config.num_channels)
