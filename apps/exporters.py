"""Annotation file writers: COCO instances, YOLO segmentation, LabelMe. Used by ``groundseg annotate``.

Input: one :class:`AnnotatedImage` per image (in the caller's order: sorted paths) holding
:class:`Instance` objects, and the category names (the prompts, in order). Every writer is
deterministic (same input, same bytes: no timestamps, no absolute paths) and writes atomically.

Video frames are images too: frame ``i`` of ``a/clip.mp4`` is an :class:`AnnotatedImage` named
``a/clip.mp4/{i:06d}.png`` (see :func:`frame_file`: where the frame would be if the video were
extracted into a folder named after it) with ``frame`` = :class:`FrameOf` ``(video, index, length)``,
and its instances carry ``track_id``, the object's id across the frames (unique in the whole output).
COCO adds a top-level ``videos`` list (``{id, file_name, width, height, length}``; present only when
there are videos), ``video_id`` and ``frame_id`` (0-based, presentation order) on each frame's image
entry and ``track_id`` on its annotations. YOLO and LabelMe write one file per frame under the video's
path (``labels/a/clip.mp4/000012.txt``, ``labelme/a/clip.mp4/000012.json`` whose ``imagePath`` is
``000012.png`` and whose ``group_id`` is the track id, so an object keeps its group on every frame).

Coordinate conventions (the project's, see ``design.md``):

- ``Instance.box`` is float pixel ``(x1, y1, x2, y2)`` in continuous coordinates: pixel column ``c``
  covers ``[c, c + 1)``, so ``x2`` is the last column + 1. COCO ``bbox`` is ``[x1, y1, x2 - x1, y2 - y1]``.
- ``Instance.mask`` is a ``bool`` ``H x W`` array at the image's (EXIF-upright) size.
- Polygon vertices (YOLO, LabelMe) are the pixel indices ``(column, row)`` of the mask's outer
  boundary pixels, as ``cv2.findContours`` gives them; ``cv2.fillPoly`` of those vertices (or
  LabelMe's own polygon rasteriser) gives back the mask, holes excepted. YOLO divides them by
  ``(W, H)``, so they lie in ``[0, 1)``.

Choices:

- COCO: ``segmentation`` is compressed RLE (``{"size": [H, W], "counts": str}``); a box-only
  instance (the model gave a box but no mask) has no ``segmentation`` key and its ``area`` is the
  box's. ``bbox`` is the mask's tight box when there is a mask (so box and mask always agree), else
  the model's box. ``score`` is the mask decoder's predicted IoU, or ``null`` when unknown.
- YOLO: one line per instance, ``class x1 y1 x2 y2 ...``, with the LARGEST outer contour only (a
  YOLO line is one instance, so extra parts would become extra objects); a box-only instance, or a
  mask too small for a polygon, is written as its box's four corners.
- LabelMe: every outer contour of an instance is a ``polygon`` shape; the shapes of one instance
  share its ``group_id`` (1, 2, ... within the image). A box-only instance is a ``rectangle``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import cv2
import numpy as np
import yaml

from grounding.result import atomic_write_text, rle_encode

COCO_FILE = "instances.json"
YOLO_DIR = "labels"
YOLO_DATA = "data.yaml"
LABELME_DIR = "labelme"
LABELME_VERSION = "5.0.1"


@dataclass(frozen=True)
class Instance:
    """One annotated object: ``category`` is the 0-based prompt index; mask and/or box (see module doc)."""
    category: int
    mask: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None
    score: float | None = None
    track_id: int | None = None  # video frames: the object's id across frames

    def __post_init__(self) -> None:
        if self.mask is None and self.box is None:
            raise ValueError("an instance needs a mask or a box")


@dataclass(frozen=True)
class FrameOf:
    """Where a video frame comes from: ``video`` (POSIX path relative to the input folder), frame ``index``
    (0-based, presentation order) of ``length`` frames."""
    video: str
    index: int
    length: int


@dataclass(frozen=True)
class AnnotatedImage:
    """``file``: POSIX path relative to the input folder (a video frame: :func:`frame_file`);
    ``width``/``height`` of the upright image; ``frame``: set for a video frame."""
    file: str
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)
    frame: FrameOf | None = None


def frame_file(video: str, index: int) -> str:
    """The name of frame ``index`` of ``video`` in every format: ``a/clip.mp4/000012.png``."""
    return f"{video}/{index:06d}.png"


# --------------------------------------------------------------------------- geometry


def instance_box(inst: Instance, width: int, height: int) -> tuple[float, float, float, float]:
    """The instance's ``(x1, y1, x2, y2)``: the mask's tight box if it has one, else its box clipped
    to the image."""
    if inst.mask is not None:
        rows, cols = np.flatnonzero(inst.mask.any(axis=1)), np.flatnonzero(inst.mask.any(axis=0))
        return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
    x1, y1, x2, y2 = inst.box  # type: ignore[misc]
    return (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Outer contours of a ``bool`` ``H x W`` mask as ``K x 2`` int arrays of pixel ``(x, y)``, those with
    at least 3 vertices only, largest area first (ties: top-left first)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = [c.reshape(-1, 2) for c in contours if len(c) >= 3]
    return sorted(polygons, key=lambda p: (-cv2.contourArea(p), p[:, 1].min(), p[:, 0].min()))


def _box_corners(box: Sequence[float]) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]


def _r(value: float, digits: int = 2) -> float:
    """Round for the files; ``+ 0.0`` turns ``-0.0`` into ``0.0``."""
    return round(float(value), digits) + 0.0


def sidecar_paths(files: Iterable[str], suffix: str) -> dict[str, str]:
    """Per-image file names: ``a/b.jpg`` -> ``a/b{suffix}`` (the tools' convention), except where two
    images would share one (``a/b.jpg`` and ``a/b.png``): those get ``a/b.jpg{suffix}``."""
    files = list(files)
    plain = {f: str(PurePosixPath(f).with_suffix(suffix)) if PurePosixPath(f).suffix else f + suffix for f in files}
    taken: dict[str, int] = {}
    for name in plain.values():
        taken[name] = taken.get(name, 0) + 1
    return {f: (name if taken[name] == 1 else f + suffix) for f, name in plain.items()}


def prune(folder: Path, keep: set[Path], suffix: str) -> None:
    """Delete ``*{suffix}`` files under ``folder`` that are not in ``keep`` (left by images since removed
    from the input), then empty sub-folders, so a rerun's output matches a fresh run's."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob(f"*{suffix}"), reverse=True):
        if path.is_file() and path not in keep:
            path.unlink()
    for dirpath, _dirs, _files in sorted(os.walk(folder), reverse=True):
        if Path(dirpath) != folder and not os.listdir(dirpath):
            os.rmdir(dirpath)


# --------------------------------------------------------------------------- writers
#
# Each writer takes the images one at a time (``add``), so a large folder's masks never need to be in
# memory together, then ``finish()`` writes what covers the whole set and returns the main output path.


class CocoWriter:
    """``out_dir/instances.json`` (one line): image ids 1..N and annotation ids 1..M in the order images are
    added, category ids 1..K in prompt order, ``name`` = the prompt."""

    def __init__(self, out_dir: Path, categories: Sequence[str], files: Sequence[str]):
        self.path, self.categories = out_dir / COCO_FILE, list(categories)
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.videos: list[dict] = []  # video ids 1..V in the order their first frame is added

    def add(self, image: AnnotatedImage) -> None:
        image_id = len(self.images) + 1
        entry = {"id": image_id, "file_name": image.file, "width": image.width, "height": image.height}
        if image.frame is not None:
            if not self.videos or self.videos[-1]["file_name"] != image.frame.video:
                self.videos.append({"id": len(self.videos) + 1, "file_name": image.frame.video, "width": image.width,
                                    "height": image.height, "length": image.frame.length})
            entry.update(video_id=self.videos[-1]["id"], frame_id=image.frame.index)
        self.images.append(entry)
        for inst in image.instances:
            x1, y1, x2, y2 = instance_box(inst, image.width, image.height)
            ann = {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": inst.category + 1}
            if inst.mask is not None:
                ann["segmentation"] = rle_encode(inst.mask)
                ann["area"] = int(np.count_nonzero(inst.mask))
            else:
                ann["area"] = _r(max(0.0, x2 - x1) * max(0.0, y2 - y1))
            ann["bbox"] = [_r(x1), _r(y1), _r(x2 - x1), _r(y2 - y1)]
            ann["score"] = None if inst.score is None else _r(inst.score, 4)
            ann["iscrowd"] = 0
            if inst.track_id is not None:
                ann["track_id"] = inst.track_id
            self.annotations.append(ann)

    def finish(self) -> Path:
        data = {
            "info": {"description": "groundseg annotate"},
            **({"videos": self.videos} if self.videos else {}),
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": i, "name": n, "supercategory": "object"} for i, n in enumerate(self.categories, 1)],
        }
        return atomic_write_text(self.path, json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")


def yolo_lines(image: AnnotatedImage) -> list[str]:
    """``class x1 y1 x2 y2 ...`` per instance, coordinates normalised by (W, H), 6 decimals."""
    lines = []
    w, h = image.width, image.height
    for inst in image.instances:
        polygons = mask_polygons(inst.mask) if inst.mask is not None else []
        points = polygons[0] if len(polygons) else _box_corners(instance_box(inst, w, h))
        coords = " ".join(f"{min(max(x / w, 0.0), 1.0):.6f} {min(max(y / h, 0.0), 1.0):.6f}" for x, y in points)
        lines.append(f"{inst.category} {coords}")
    return lines


class YoloWriter:
    """``out_dir/labels/<image path, suffix .txt>`` per image (empty for an image without objects: a
    background image) and ``out_dir/data.yaml`` with the class names (0-based, prompt order)."""

    def __init__(self, out_dir: Path, categories: Sequence[str], files: Sequence[str]):
        self.out_dir, self.folder, self.categories = out_dir, out_dir / YOLO_DIR, list(categories)
        self.names = sidecar_paths(files, ".txt")
        self.written: set[Path] = set()

    def add(self, image: AnnotatedImage) -> None:
        path = self.folder / self.names[image.file]
        atomic_write_text(path, "".join(line + "\n" for line in yolo_lines(image)))
        self.written.add(path)

    def finish(self) -> Path:
        prune(self.folder, self.written, ".txt")
        data = {"nc": len(self.categories), "names": dict(enumerate(self.categories))}
        header = ("# groundseg annotate: YOLO segmentation labels. labels/ mirrors the input folder: the labels\n"
                  "# of <input>/a/b.jpg are in labels/a/b.txt (class x1 y1 x2 y2 ..., normalised polygon);\n"
                  "# those of frame 12 of <input>/a/clip.mp4 in labels/a/clip.mp4/000012.txt.\n")
        atomic_write_text(self.out_dir / YOLO_DATA, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return self.folder


def labelme_dict(image: AnnotatedImage, categories: Sequence[str]) -> dict:
    """LabelMe JSON of one image; ``imagePath`` is the image's file name, so the file works once placed
    beside its image (``labelme/`` mirrors the input folder). ``group_id``: 1, 2, ... per instance, or the
    instance's ``track_id`` on video frames."""
    shapes = []
    for number, inst in enumerate(image.instances, start=1):
        group_id = number if inst.track_id is None else inst.track_id
        base = {"label": categories[inst.category], "group_id": group_id, "description": "", "flags": {}}
        polygons = mask_polygons(inst.mask) if inst.mask is not None else []
        for poly in polygons:
            shapes.append({**base, "points": [[float(x), float(y)] for x, y in poly], "shape_type": "polygon"})
        if not polygons:
            x1, y1, x2, y2 = instance_box(inst, image.width, image.height)
            shapes.append({**base, "points": [[_r(x1), _r(y1)], [_r(x2), _r(y2)]], "shape_type": "rectangle"})
    return {
        "version": LABELME_VERSION, "flags": {}, "shapes": shapes,
        "imagePath": PurePosixPath(image.file).name, "imageData": None,
        "imageHeight": image.height, "imageWidth": image.width,
    }


class LabelmeWriter:
    """``out_dir/labelme/<image path, suffix .json>`` per image."""

    def __init__(self, out_dir: Path, categories: Sequence[str], files: Sequence[str]):
        self.folder, self.categories = out_dir / LABELME_DIR, list(categories)
        self.names = sidecar_paths(files, ".json")
        self.written: set[Path] = set()

    def add(self, image: AnnotatedImage) -> None:
        path = self.folder / self.names[image.file]
        atomic_write_text(path, json.dumps(labelme_dict(image, self.categories), ensure_ascii=False, indent=2) + "\n")
        self.written.add(path)

    def finish(self) -> Path:
        prune(self.folder, self.written, ".json")
        return self.folder


WRITERS = {"coco": CocoWriter, "yolo": YoloWriter, "labelme": LabelmeWriter}
