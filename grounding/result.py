"""The one result type of the service, and its one JSON form.

A :class:`Prediction` is what answering one question about one image produces: the model's text
answer plus one :class:`Target` per grounded object. The CLI prints it, the app's API returns it
and the annotation files store it, all through :meth:`Prediction.to_json`, so a result written by
one can be read by the others.

Conventions (see ``design.md``):
- boxes are float pixel ``(x1, y1, x2, y2)`` in the ORIGINAL image, continuous coordinates:
  pixel column ``c`` covers ``[c, c + 1)``, so a mask occupying columns 3..5 has ``x1 = 3``,
  ``x2 = 6``;
- masks are ``bool`` arrays ``H x W`` at the ORIGINAL resolution; in JSON they are COCO RLE
  (``{"size": [H, W], "counts": str}``, as written by ``pycocotools.mask.encode``).

JSON form of a prediction::

    {"version": 1, "question": str | null, "answer": str, "image_size": [H, W],
     "notes": [str, ...],
     "targets": [{"phrase": str | null, "box": [x1, y1, x2, y2] | null,
                  "bbox_xywh": [x, y, w, h] | null, "area": number | null,
                  "score": float | null, "seg_index": int | null,
                  "mask": {"size": [H, W], "counts": str} | null}, ...]}

``bbox_xywh`` and ``area`` are derived (for COCO-style consumers) and ignored when reading.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from segdecoder.boxes import Box, box_from_mask  # re-exported: ``from grounding.result import box_from_mask``

JSON_VERSION = 1


# --------------------------------------------------------------------------- RLE


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Encode an ``H x W`` mask (any dtype; nonzero = inside) as JSON-ready COCO RLE.

    Returns ``{"size": [H, W], "counts": str}``; ``pycocotools.mask.decode`` accepts it as is.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H x W), got shape {mask.shape}")
    # pycocotools reads column-major uint8 data.
    rle = coco_mask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Decode COCO RLE into a ``bool`` ``H x W`` C-contiguous array.

    Accepts compressed RLE (``counts`` as ``str`` or ``bytes``) and the uncompressed form
    (``counts`` as a list of run lengths) found in some COCO annotation files.
    """
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        compressed = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        compressed = {"size": [height, width], "counts": raw}
    with warnings.catch_warnings():
        # pycocotools 2.0.x's decoder calls np.array(..., copy=False) on an object whose
        # __array__ predates NumPy 2's copy keyword; NumPy then warns on every call. Harmless.
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        decoded = coco_mask.decode(compressed)
    return np.ascontiguousarray(decoded, dtype=bool)


# --------------------------------------------------------------------------- Target


@dataclass
class Target:
    """One grounded object of an answer.

    phrase:    the ``<ref>`` text naming it, if the answer has one.
    box:       float pixel ``(x1, y1, x2, y2)`` in the original image, if known.
    mask:      ``bool`` ``H x W`` at the original size, if a [SEG] produced one.
    score:     the mask decoder's predicted IoU (or another confidence), if any.
    seg_index: which [SEG] token of the answer (0-based) produced the mask.
    """

    phrase: str | None = None
    box: Box | None = None
    mask: np.ndarray | None = None
    score: float | None = None
    seg_index: int | None = None

    def __post_init__(self) -> None:
        if self.box is not None:
            values = tuple(float(v) for v in np.asarray(self.box, dtype=float).reshape(-1))
            if len(values) != 4:
                raise ValueError(f"a box is (x1, y1, x2, y2), got {len(values)} numbers")
            self.box = values  # type: ignore[assignment]
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim != 2:
                raise ValueError(f"a target mask must be 2-D (H x W), got shape {mask.shape}")
            self.mask = mask if mask.dtype == np.bool_ else mask != 0
        if self.score is not None:
            self.score = float(self.score)
        if self.seg_index is not None:
            self.seg_index = int(self.seg_index)

    def box_from_mask(self) -> Box | None:
        """Tight box of :attr:`mask` (see :func:`box_from_mask`); ``None`` without a mask or
        for an empty one."""
        return None if self.mask is None else box_from_mask(self.mask)

    @property
    def area(self) -> float | None:
        """Mask pixel count when there is a mask (COCO's ``area``), else the box area, else None."""
        if self.mask is not None:
            return int(np.count_nonzero(self.mask))
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            return max(0.0, x2 - x1) * max(0.0, y2 - y1)
        return None

    @property
    def bbox_xywh(self) -> tuple[float, float, float, float] | None:
        """COCO ``[x, y, w, h]`` of :attr:`box`, or of the mask's box when there is no box."""
        box = self.box if self.box is not None else self.box_from_mask()
        if box is None:
            return None
        x1, y1, x2, y2 = box
        return (x1, y1, x2 - x1, y2 - y1)

    def to_json(self) -> dict[str, Any]:
        bbox = self.bbox_xywh
        return {
            "phrase": self.phrase,
            "box": None if self.box is None else list(self.box),
            "bbox_xywh": None if bbox is None else list(bbox),
            "area": self.area,
            "score": self.score,
            "seg_index": self.seg_index,
            "mask": None if self.mask is None else rle_encode(self.mask),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Target":
        mask = data.get("mask")
        return cls(
            phrase=data.get("phrase"),
            box=None if data.get("box") is None else tuple(data["box"]),
            mask=None if mask is None else rle_decode(mask),
            score=data.get("score"),
            seg_index=data.get("seg_index"),
        )


# --------------------------------------------------------------------------- Prediction


@dataclass
class Prediction:
    """The answer to one question about one image.

    answer:     the model's text, special tokens included (``<ref>``, ``<box>``, ``[SEG]``).
    targets:    grounded objects, in the order they appear in the answer.
    image_size: ``(H, W)`` of the original image; every mask has this shape.
    question:   what was asked, if recorded.
    notes:      why something is empty or was dropped, e.g. "the answer has no [SEG] token".
    """

    answer: str
    targets: list[Target]
    image_size: tuple[int, int]
    question: str | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        height, width = (int(v) for v in self.image_size)
        self.image_size = (height, width)
        self.targets = list(self.targets)
        self.notes = list(self.notes)
        for index, target in enumerate(self.targets):
            if target.mask is not None and target.mask.shape != self.image_size:
                raise ValueError(
                    f"target {index}'s mask is {target.mask.shape[0]}x{target.mask.shape[1]} "
                    f"(H x W) but the image is {height}x{width}; masks must be at the original size"
                )

    def to_json(self) -> dict[str, Any]:
        """A ``json.dumps``-ready dict (plain Python types only); see the module docstring."""
        return {
            "version": JSON_VERSION,
            "question": self.question,
            "answer": self.answer,
            "image_size": list(self.image_size),
            "notes": list(self.notes),
            "targets": [target.to_json() for target in self.targets],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Prediction":
        """Inverse of :meth:`to_json` (exact: masks, boxes and scores come back identical)."""
        version = data.get("version", JSON_VERSION)
        if version != JSON_VERSION:
            raise ValueError(f"prediction JSON version {version} is not supported (expected {JSON_VERSION})")
        return cls(
            answer=data["answer"],
            targets=[Target.from_json(t) for t in data.get("targets", [])],
            image_size=tuple(data["image_size"]),
            question=data.get("question"),
            notes=list(data.get("notes", [])),
        )

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (a temporary file in the same folder,
        then ``os.replace``), creating parent folders. A reader never sees a half-written file."""
        text = json.dumps(self.to_json(), ensure_ascii=False)
        return atomic_write_text(path, text)

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "Prediction":
        with open(path, encoding="utf-8") as handle:
            return cls.from_json(json.load(handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder (so the rename
    stays on one file system), flushed to disk, then ``os.replace``. Creates parent folders."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 lets the umask decide the permissions, as for any ordinary file
    # (tempfile would create it 0o600 and the result would stay private after the rename).
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return target
