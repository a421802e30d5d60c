"""Zoomed decoding: each mask decoded again on a crop around its object, re-encoded at the decoder's input size.

A SAM-style decoder sees the whole image resized to its input side, so an object that is small next to the image
covers few of the encoder's patches and its outline comes back coarse (the default model's SAM ``tiny`` reads 256 px
through 16-px patches: a 1-3% object of a 480-px image spans 2-3 patches). Decoding the same prompt on a square of
``context`` times the object's box side, centred on the box, gives the object about ``1 / context`` of the
decoder's input side whatever its size in the image. The price is one more image-encoder pass per object: the
crops of one call are encoded in one batch, and the prompts that share a crop (an image's [SEG]s on the same
object) are decoded in one decoder call.

Too little context leaves the decoder too little of the object's surroundings to tell its outline; too much
makes most crops the whole image again. The default model's ``mask_zoom`` add-on uses ``context`` 3, chosen on
its val split (the measurements by context are in weights/shapes-tiny/MODEL_CARD.md).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from segdecoder.base import MaskDecoderBackend, MaskPrediction
from segdecoder.boxes import box_from_mask

# A window covering more than this share of the image is the image again: the first decode is kept.
_MAX_WINDOW_SHARE = 0.8


def zoom_window(box: Sequence[float], size: tuple[int, int], context: float) -> tuple[int, int, int, int] | None:
    """Pixel xyxy ``box`` in an image of ``size`` ``(H, W)`` -> the crop ``(x1, y1, x2, y2)`` (ints, exclusive
    ends): a square of side ``context * max(box w, box h)`` centred on the box and clipped to the image; None when
    that covers most of the image anyway (more than 80% of it)."""
    H, W = size
    x1, y1, x2, y2 = (float(v) for v in box)
    half = context * max(x2 - x1, y2 - y1, 1.0) / 2
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = max(0, int(np.floor(cx - half))), max(0, int(np.floor(cy - half)))
    right, bottom = min(W, int(np.ceil(cx + half))), min(H, int(np.ceil(cy + half)))
    if right - left < 2 or bottom - top < 2 or (right - left) * (bottom - top) > _MAX_WINDOW_SHARE * H * W:
        return None
    return left, top, right, bottom


def decode_zoomed(backend: MaskDecoderBackend, pixels: np.ndarray, first: MaskPrediction, context: float,
                  seg_embeddings: torch.Tensor | None = None, points: torch.Tensor | None = None,
                  point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                  multimask: bool = False, threshold: float = 0.0) -> tuple[MaskPrediction, int]:
    """Decode each of ``first``'s N prompts again on a crop around its object and paste the mask back.

    ``pixels``: the uint8 ``H x W x 3`` image; ``first``: ``backend.decode`` of the same prompts on the whole image.
    The prompts are as in ``MaskDecoderBackend.decode`` (pixel coordinates of the whole image, leading dim N).
    The window comes from the prompt's box when it has one, else from the box of its first mask (a click names a
    point, not an extent), grown to hold the prompt's clicks. A prompt whose first mask is empty, or whose window is
    nearly the whole image, keeps its first result. Returns (masks ``[N, H, W]`` with the zoomed decodes' predicted IoU, and ``low_res_logits``
    those of the whole-image decode, as the crops' are in other coordinates; how many crops were encoded).
    """
    H, W = pixels.shape[:2]
    windows = []
    for i in range(len(first.masks)):
        box = boxes[i].tolist() if boxes is not None else box_from_mask(first.masks[i])
        if box is not None and points is not None:   # the crop must hold every click (a click off the mask too)
            xs, ys = [box[0], box[2], *points[i, :, 0].tolist()], [box[1], box[3], *points[i, :, 1].tolist()]
            box = [min(xs), min(ys), max(xs), max(ys)]
        windows.append(None if box is None else zoom_window(box, (H, W), context))
    todo = [i for i, w in enumerate(windows) if w is not None]
    if not todo:
        return first, 0
    unique = list(dict.fromkeys(windows[i] for i in todo))
    with torch.no_grad():
        embeddings = dict(zip(unique, backend.encode(
            [np.ascontiguousarray(pixels[t:b, l:r]) for l, t, r, b in unique])))
    masks, scores = first.masks.copy(), first.scores.copy()
    sides = np.full(len(masks), float(max(H, W)))
    for window in unique:
        # the prompts that share a crop are decoded in one call (the decoder repeats the crop's embedding per prompt)
        rows = [i for i in todo if windows[i] == window]
        pick = torch.tensor(rows, dtype=torch.long)
        l, t, r, b = window
        shift = lambda xy, n: None if xy is None else xy[pick.to(xy.device)] - xy.new_tensor([l, t] * n)
        take = lambda x: None if x is None else x[pick.to(x.device)]
        crop = backend.decode(embeddings[window], seg_embeddings=take(seg_embeddings), points=shift(points, 1),
                              point_labels=take(point_labels), boxes=shift(boxes, 2), multimask=multimask,
                              threshold=threshold)
        masks[rows] = False
        masks[rows, t:b, l:r] = crop.masks
        scores[rows] = crop.scores
        sides[rows] = max(r - l, b - t)
    return MaskPrediction(masks=masks, scores=scores, low_res_logits=first.low_res_logits,
                          region_sides=sides), len(unique)

