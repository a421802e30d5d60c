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


def clip_to_boxes(masks: np.ndarray, boxes: np.ndarray, margin: float) -> np.ndarray:
    """Bool masks ``[n, H, W]`` cut to their boxes ``[n, 4]`` (pixel xyxy) grown by ``margin`` times the box's
    width / height on each side. A box prompt says where its object is; a decoder that also reads a [SEG]
    prompt can spill onto a like-coloured neighbour beyond it, and those pixels are wrong (default model, val:
    cIoU 74.7 -> 75.2 at margin 0.05, where the locator's boxes are off by a few pixels)."""
    out = masks.copy()
    height, width = masks.shape[1:]
    for mask, (x1, y1, x2, y2) in zip(out, np.asarray(boxes, np.float64)):
        grow_x, grow_y = (x2 - x1) * margin, (y2 - y1) * margin
        left, top = max(0, int(np.floor(x1 - grow_x))), max(0, int(np.floor(y1 - grow_y)))
        right, bottom = min(width, int(np.ceil(x2 + grow_x))), min(height, int(np.ceil(y2 + grow_y)))
        mask[:top], mask[bottom:], mask[:, :left], mask[:, right:] = False, False, False, False
    return out
