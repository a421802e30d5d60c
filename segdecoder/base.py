"""The one interface both mask-decoder backends (SAM, SAM2) implement.

Coordinate conventions used everywhere in this package:
- images come in as ``uint8`` numpy arrays ``H x W x 3`` (RGB), already oriented;
- points are pixel ``(x, y)`` in the ORIGINAL image, labels ``1`` (foreground) / ``0`` (background);
- boxes are pixel ``x1, y1, x2, y2`` (float) in the ORIGINAL image;
- masks come back as ``bool`` arrays ``N x H x W`` at the ORIGINAL resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch


@dataclass
class ImageEmbedding:
    """The mask decoder's view of one image, computed once and reused for every prompt.

    features:      ``[1, C, h, w]`` image embedding (C = prompt_dim, h = w = image_size / 16),
                   in the module's dtype, on its device.
    high_res:      SAM2's extra feature maps (``[1, C/8, 4h, 4w]``, ``[1, C/4, 2h, 2w]``, already
                   through the decoder's ``conv_s0`` / ``conv_s1``); empty for SAM.
    input_size:    ``(h, w)`` of the resized image inside the square model input, before padding
                   (SAM: longest side = image_size; SAM2: always ``(image_size, image_size)``).
    original_size: ``(H, W)`` of the image the user gave.
    """

    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    high_res: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    def to(self, device: torch.device | str) -> "ImageEmbedding":
        return ImageEmbedding(
            self.features.to(device), self.input_size, self.original_size,
            tuple(t.to(device) for t in self.high_res),
        )


@dataclass
class MaskPrediction:
    """masks ``[N, H, W]`` bool at the original size; scores ``[N]`` predicted IoU;
    logits ``[N, h, w]`` low-resolution logits of the chosen mask (for refinement or a next click);
    region_sides ``[N]``: the longest side, in original pixels, of the region each mask was decoded from
    (None: the whole image; segdecoder/zoom.py decodes on crops)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: torch.Tensor
    region_sides: np.ndarray | None = None


@runtime_checkable
class MaskDecoderBackend(Protocol):
    """SAM-style decoder: a frozen image encoder, a prompt encoder and a light mask decoder.

    Prompts for ``N`` masks on one image are given together; any of ``seg_embeddings``,
    ``points`` (+ ``point_labels``) and ``boxes`` may be combined, each with leading dim ``N``.
    A ``[SEG]`` embedding enters the decoder as one extra sparse prompt token.
    """

    backend_name: str       # "sam" | "sam2"
    preset: str             # e.g. "tiny", "vit_h", "hiera_l"
    prompt_dim: int         # size of one sparse prompt token (256 for official models)
    image_size: int         # side of the square model input (1024 for official models)

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 ``H x W x 3`` -> (float ``[3, S, S]`` normalised model input, input_size ``(h, w)``)."""

    def encode(self, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """Run the image encoder (no grad) on a batch of images; one embedding per image."""

    def mask_logits(
        self,
        embedding: ImageEmbedding,
        seg_embeddings: torch.Tensor | None = None,   # [N, prompt_dim]
        points: torch.Tensor | None = None,           # [N, K, 2] pixel xy in the original image
        point_labels: torch.Tensor | None = None,     # [N, K] 1 fg / 0 bg
        boxes: torch.Tensor | None = None,            # [N, 4] pixel xyxy in the original image
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable: (low-res logits ``[N, M, h', w']``, predicted IoU ``[N, M]``), M = 3 if multimask else 1."""

    def upscale(self, low_res_logits: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        """Differentiable: ``[N, M, h', w']`` -> logits ``[N, M, H, W]`` at the original image size."""

    def decode(
        self,
        embedding: ImageEmbedding,
        seg_embeddings: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask: bool = False,
        threshold: float = 0.0,
    ) -> MaskPrediction:
        """No grad. One mask per prompt; with ``multimask`` the best of 3 by predicted IoU. Foreground = logit > threshold."""
