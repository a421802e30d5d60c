"""Object proposals: the boxes of the objects an image holds, found by the mask decoder alone.

This follows SAM's "segment everything" way. The decoder gets one click at each point of a grid, in the whole
image and in overlapping tiles of it (``TILES``). A tile is encoded again, so small objects come out larger: the
default model's decoder reads 256 pixels a side. Each click gives the decoder's single-mask output. On the phrasing
suite's seed 1234, its best-of-three found fewer objects at the same thresholds: 129 of 181 against 142. A mask is
kept only if it looks like one whole object:
- the decoder's predicted IoU is at least ``MIN_SCORE``;
- decoded again from its own tight box, it agrees with itself by at least ``MIN_CONSISTENCY`` IoU (a part of an
  object, or a patch of background, gets another mask from a box);
- in a tile, it does not touch a tile edge that lies inside the image (an object cut by the tile).
Among masks whose boxes overlap by more than ``NMS_IOU``, the higher score stays.

Masks are decoded in a small frame (``FRAME_SIDE`` pixels on the longest side) whatever the image's size: a proposal
is a box, and the masks an answer shows are decoded again from it at full size.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import nms

GRID = 12               # clicks per side of a view's grid
TILES = 2               # tiles per side (0: the whole image only)
TILE_SIDE = 0.6         # a tile's side, as a share of the image's
FRAME_SIDE = 256        # longest side, in pixels, of the frame a view's masks are decoded in
MIN_SCORE = 0.6         # the decoder's predicted IoU of a proposal's mask
MIN_CONSISTENCY = 0.8   # IoU of a proposal's mask with the mask its own box gets
NMS_IOU = 0.5           # boxes overlapping more are the same object: the higher score stays
AREA = (0.0005, 0.5)    # a proposal's share of its view


@dataclass
class Proposal:
    box: list[float]    # pixel xyxy in the original image
    score: float        # the decoder's predicted IoU of its mask


def _tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Pixel xyxy boxes ``[N, 4]`` (right and bottom edges exclusive) of non-empty bool masks ``[N, h, w]``."""
    rows, cols = masks.any(2), masks.any(1)
    first = lambda v: v.float().argmax(1)
    last = lambda v: v.shape[1] - v.flip(1).float().argmax(1)
    return torch.stack([first(cols), first(rows), last(cols), last(rows)], 1).float()


def tiles(height: int, width: int, per_side: int | None = None) -> list[tuple[int, int, int, int]]:
    """Overlapping crops (pixel x1, y1, x2, y2) covering an ``height x width`` image, ``per_side`` (``TILES``) a
    side."""
    per_side = TILES if per_side is None else per_side
    if per_side < 2:
        return []
    starts = lambda side: [round(k * side * (1 - TILE_SIDE) / (per_side - 1)) for k in range(per_side)]
    tw, th = round(width * TILE_SIDE), round(height * TILE_SIDE)
    return [(x, y, x + tw, y + th) for y in starts(height) for x in starts(width)]


@torch.no_grad()
def view_proposals(decoder, embedding, grid: int = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """One view's (the whole image's or a tile's decoder ``embedding``) proposals: boxes ``[N, 4]`` pixel xyxy in
    the view and their scores ``[N]``, best first; boxes touching the view's edges are kept (the caller knows
    which edges are the image's)."""
    H, W = embedding.original_size
    scale = FRAME_SIDE / max(H, W)
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    small = dataclasses.replace(embedding, original_size=(h, w))
    steps = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(steps * h, steps * w, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], 1)[:, None]
    first = decoder.decode(small, points=points, point_labels=torch.ones(len(points), 1, dtype=torch.long))
    masks, scores = torch.from_numpy(first.masks), torch.from_numpy(np.asarray(first.scores, dtype=np.float32))
    area = masks.flatten(1).float().mean(1)
    keep = (scores >= MIN_SCORE) & (area >= AREA[0]) & (area <= AREA[1])
    masks, scores = masks[keep], scores[keep]
    if not len(masks):
        return torch.zeros(0, 4), torch.zeros(0)
    boxes = _tight_boxes(masks)
    again = torch.from_numpy(decoder.decode(small, boxes=boxes).masks)
    a, b = masks.flatten(1), again.flatten(1)
    agree = (a & b).sum(1) / (a | b).sum(1).clamp(min=1)
    keep = agree >= MIN_CONSISTENCY
    to_pixels = torch.tensor([W / w, H / h, W / w, H / h])
    order = scores[keep].argsort(descending=True)
    return (boxes[keep] * to_pixels)[order], scores[keep][order]


@torch.no_grad()
def object_proposals(decoder, pixels: np.ndarray, embedding, grid: int = GRID) -> list[Proposal]:
    """The objects of an image (uint8 ``H x W x 3`` ``pixels``, its decoder ``embedding``), best score first."""
    H, W = pixels.shape[:2]
    crops = tiles(H, W)
    views = [((0, 0, W, H), embedding)] + list(zip(crops, decoder.encode([pixels[y1:y2, x1:x2]
                                                                          for x1, y1, x2, y2 in crops])))
    all_boxes, all_scores = [], []
    for (x1, y1, x2, y2), view in views:
        boxes, scores = view_proposals(decoder, view, grid)
        margin = 2.0   # pixels of the view: a box this close to an inner edge of a tile is cut by it
        cut = (((boxes[:, 0] <= margin) & (x1 > 0)) | ((boxes[:, 1] <= margin) & (y1 > 0))
               | ((boxes[:, 2] >= x2 - x1 - margin) & (x2 < W)) | ((boxes[:, 3] >= y2 - y1 - margin) & (y2 < H)))
        all_boxes.append(boxes[~cut] + torch.tensor([x1, y1, x1, y1], dtype=torch.float32))
        all_scores.append(scores[~cut])
    boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
    return [Proposal(boxes[i].tolist(), float(scores[i])) for i in nms(boxes, scores, NMS_IOU).tolist()]
