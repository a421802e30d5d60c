"""Mask utilities the mask steps use: cutting masks to boxes, keeping the parts a click names."""
from __future__ import annotations

import cv2
import numpy as np


def clip_to_boxes(masks: np.ndarray, boxes: np.ndarray, margin: float) -> np.ndarray:
    """Bool masks ``[n, H, W]`` cut to their boxes ``[n, 4]`` (pixel xyxy) grown by ``margin`` times the box's
    width / height on each side."""
    out = masks.copy()
    height, width = masks.shape[1:]
    for mask, (x1, y1, x2, y2) in zip(out, np.asarray(boxes, np.float64)):
        grow_x, grow_y = (x2 - x1) * margin, (y2 - y1) * margin
        left, top = max(0, int(np.floor(x1 - grow_x))), max(0, int(np.floor(y1 - grow_y)))
        right, bottom = min(width, int(np.ceil(x2 + grow_x))), min(height, int(np.ceil(y2 + grow_y)))
        mask[:top], mask[bottom:], mask[:, :left], mask[:, right:] = False, False, False, False
    return out


def clicked_parts(mask: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The parts (8-connected components) of a bool ``[H, W]`` mask that hold a positive click (``points [k, 2]``
    pixel xy, ``labels [k]``, 1 = object); the mask unchanged if no positive click lies on it."""
    _, parts = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    h, w = mask.shape
    hit = {int(parts[int(np.clip(y, 0, h - 1)), int(np.clip(x, 0, w - 1))]) for (x, y), label in zip(points, labels)
           if label == 1}
    hit.discard(0)
    return np.isin(parts, list(hit)) if hit else mask


def within_reach(mask: np.ndarray, reference: np.ndarray, margin: float = 0.05) -> np.ndarray:
    """Bool ``[H, W]`` ``mask`` cut to ``reference`` grown by ``margin`` times its box's longer side (at least
    2 px): what background clicks may leave of the mask their positive clicks alone give. (A small decoder
    trained mostly on single clicks can answer "object click + background click" with a mask that spreads onto
    like-coloured neighbours; a background click must only take pixels away.)"""
    ys, xs = np.nonzero(reference)
    if not len(ys):
        return np.zeros_like(mask)
    side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    grow = max(2, int(round(margin * side)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    return mask & cv2.dilate(reference.astype(np.uint8), kernel).astype(bool)
