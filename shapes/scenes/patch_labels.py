"""Per-patch labels of the synthetic scenes, for stage 0: the vision tower's dense pretraining.

A pretrained CLIP tower already tells the language model what is where; a tower trained from scratch through
text alone does not (a linear probe on such a tower's image tokens named neither colour nor kind; model card).
Stage 0 stands in for CLIP's pretraining with labels the generator knows: for each cell of the tower's
``grid x grid`` patch grid, the object covering most of the cell (background when none covers 5% of it), its
colour, kind, texture and size class, and its box.

Geometry is the processor's: the image is padded to a centred square (``side = max(h, w)``) and cut into
``grid x grid`` cells; boxes are ``(x1, y1, x2, y2)`` in ``0..1`` of that square (the object's visible mask).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from grounding.data.refer import ReferDataset
from shapes.scenes.figures import COLOURS, SHAPE_KINDS, TEXTURES
from grounding.errors import DatasetError

SIZES = ("small", "medium", "large")
# Class 0 of every attribute is "background"; an object's value v is class 1 + index(v).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "kind": tuple(SHAPE_KINDS), "texture": TEXTURES, "size": SIZES,
}
MIN_COVER = 0.05


@dataclass
class PatchLabels:
    """classes ``[grid*grid, len(ATTRIBUTES)]`` int64 (0 = background), boxes ``[grid*grid, 4]`` float32,
    objects ``[grid*grid]`` int64 (index of the cell's object in the scene, -1 = background); cells row-major,
    as the tower's tokens."""
    classes: np.ndarray
    boxes: np.ndarray
    objects: np.ndarray


def patch_labels(objects: list[dict], masks: list[np.ndarray], grid: int, flip: bool = False) -> PatchLabels:
    """objects: ``scenes.json`` object records (colour, kind, texture, size); masks: their visible ``H x W`` bool
    masks, same order (later ones drawn on top, so a pixel belongs to the last mask holding it).
    flip: labels of the horizontally mirrored image."""
    h, w = masks[0].shape if masks else (1, 1)
    owner = np.full((h, w), -1, np.int64)
    for i, m in enumerate(masks):
        owner[m] = i
    if flip:
        owner = owner[:, ::-1]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.full((side, side), -1, np.int64)
    square[top:top + h, left:left + w] = owner
    boxes = []
    for i in range(len(objects)):
        ys, xs = np.nonzero(square == i)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else (0, 0, 0, 0))
    classes = np.zeros((grid * grid, len(ATTRIBUTES)), np.int64)
    out_boxes = np.zeros((grid * grid, 4), np.float32)
    cell_objects = np.full(grid * grid, -1, np.int64)
    edges = [int(round(k * side / grid)) for k in range(grid + 1)]
    for r in range(grid):
        for c in range(grid):
            cell = square[edges[r]:edges[r + 1], edges[c]:edges[c + 1]]
            counts = np.bincount(cell.ravel() + 1, minlength=len(objects) + 1)[1:]
            if not len(counts) or counts.max() < MIN_COVER * cell.size:
                continue
            i = int(counts.argmax())
            classes[r * grid + c] = [1 + values.index(objects[i][a]) for a, values in ATTRIBUTES.items()]
            out_boxes[r * grid + c] = np.asarray(boxes[i], np.float32) / side
            cell_objects[r * grid + c] = i
    return PatchLabels(classes, out_boxes, cell_objects)


class SceneLabels:
    """Patch labels of a synthetic REFER folder (it needs the generator's ``scenes.json``)."""

    def __init__(self, ds: ReferDataset, grid: int):
        path = Path(ds.data_root) / "scenes.json"
        if not path.is_file():
            raise DatasetError(f"stage 0 needs the synthetic scenes' labels: {path} does not exist "
                               "(only folders written by `groundseg synth` have it)")
        self.ds, self.grid = ds, grid
        self.scenes = {s["image_id"]: s for s in json.loads(path.read_text())["images"]}
        self._cache: dict[tuple[int, bool], PatchLabels] = {}

    def object_index(self, image_id: int, ann_id: int) -> int:
        """Index of annotation ``ann_id`` among its scene's objects (as ``PatchLabels.objects`` counts them)."""
        return next(i for i, o in enumerate(self.scenes[image_id]["objects"]) if o["ann_id"] == ann_id)

    def __call__(self, image_id: int, flip: bool = False, mask: Callable[[int], np.ndarray] | None = None) -> PatchLabels:
        """mask: ann_id -> visible mask (default: the dataset's, decoded from its polygons). Cached."""
        key = (image_id, flip)
        if key not in self._cache:
            objects = self.scenes[image_id]["objects"]
            mask = mask or self.ds.mask
            self._cache[key] = patch_labels(objects, [mask(o["ann_id"]) for o in objects], self.grid, flip)
        return self._cache[key]
