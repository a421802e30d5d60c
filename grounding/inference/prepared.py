"""What one question is about: the ``Query`` a user asks and the ``PreparedImage`` both models read."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from grounding.errors import PromptError, QuestionError
from segdecoder import ImageEmbedding


@dataclass
class PreparedImage:
    """An image as both models see it: ``pixels`` uint8 ``H x W x 3``, the decoder's embedding and the
    vision tower's input ``[3, s, s]``; ``extras``: what add-ons read of it, kept with it (by add-on name)."""
    pixels: np.ndarray
    digest: str
    embedding: ImageEmbedding
    vision: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[0], self.pixels.shape[1]


@dataclass
class Query:
    """One question about one image. Points are pixel (x, y) with labels 1/0; boxes pixel xyxy."""
    image: Any
    question: str
    points: Sequence[Sequence[float]] | None = None
    point_labels: Sequence[int] | None = None
    boxes: Sequence[Sequence[float]] | None = None
    answer: str | None = None  # given answer => teacher forcing, no generation
    answer_prefix: str | None = None  # the answer starts with this text and the model writes the rest

    def __post_init__(self) -> None:
        if self.answer is not None and self.answer_prefix is not None:
            raise QuestionError("give a whole answer (teacher forcing) or an answer prefix, not both")


def check_prompts(size: tuple[int, int], points, point_labels, boxes):
    """Validate clicks/boxes against the image ``size`` (H, W) -> float arrays (or None)."""
    h, w = size
    pts = labels = bxs = None
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
            raise PromptError("points must be a list of (x, y) pixel pairs")
        if ((pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)).any():
            raise PromptError(f"a point lies outside the {w}x{h} image")
        labels = np.ones(len(pts), np.int64) if point_labels is None else np.asarray(point_labels, np.int64)
        if labels.shape != (len(pts),) or not np.isin(labels, (0, 1)).all():
            raise PromptError("point labels must be 1 (object) or 0 (background), one per point")
    if boxes is not None and len(boxes):
        bxs = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if np.size(boxes) % 4 == 0 else None
        if bxs is None or not np.isfinite(bxs).all():
            raise PromptError("boxes must be (x1, y1, x2, y2) pixel quadruples")
        if (bxs[:, 2] <= bxs[:, 0]).any() or (bxs[:, 3] <= bxs[:, 1]).any():
            raise PromptError("a box must have x2 > x1 and y2 > y1")
        bxs[:, [0, 2]] = bxs[:, [0, 2]].clip(0, w)
        bxs[:, [1, 3]] = bxs[:, [1, 3]].clip(0, h)
    return pts, labels, bxs
