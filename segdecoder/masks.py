"""A prompt's mask as the product returns it: decoded, decoded again on a crop around the object (zoom.py) and its
outline refined against the image (refine.py), each as the model's settings ask."""
from __future__ import annotations

import dataclasses

import numpy as np

from segdecoder.base import ImageEmbedding, MaskDecoderBackend, MaskPrediction
from segdecoder.refine import refine_masks
from segdecoder.zoom import decode_zoomed


def decode_masks(backend: MaskDecoderBackend, embedding: ImageEmbedding, pixels: np.ndarray,
                 zoom: float | None = None, refine: str | None = None, **prompts) -> tuple[MaskPrediction, int]:
    """``backend.decode(embedding, **prompts)``; then, with ``zoom`` (a context, None: off), ``decode_zoomed`` of
    the same prompts; then, with ``refine`` (``"grabcut"``, None: off), each mask's outline refined on ``pixels``
    (uint8 ``H x W x 3``, the image ``embedding`` was made from). Returns the prediction and how many crops were
    encoded."""
    pred = backend.decode(embedding, **prompts)
    crops = 0
    if zoom:
        pred, crops = decode_zoomed(backend, pixels, pred, zoom, **prompts)
    if refine:
        sides = pred.region_sides if pred.region_sides is not None else np.full(len(pred.masks), max(pixels.shape[:2]))
        pred = dataclasses.replace(pred, masks=refine_masks(pixels, pred.masks, sides, pred.low_res_logits.shape[-1]))
    return pred, crops
