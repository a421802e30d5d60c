"""REC and RES scores, exactly as reference.md section 5 defines them.

Conventions:
- masks are ``bool`` (or 0/1) ``H x W`` arrays at the ORIGINAL image resolution; a prediction of
  ``None`` (the model wrote no [SEG]) is an empty mask of the ground truth's shape — such a
  sentence is scored, never skipped;
- boxes are float pixel ``(x1, y1, x2, y2)`` in the original image, continuous coordinates
  (area = (x2 - x1) * (y2 - y1), no +1); a missing box (``None``: unparseable output) is a miss.

RES (LISA's definition):
- cIoU = (sum of intersections) / (sum of unions) over all sentences;
- gIoU = mean over sentences of ``I / (U + 1e-5)``, where a sentence whose ground truth AND
  prediction are both empty scores 1.0 (its union is 0) and an empty ground truth with a
  non-empty prediction scores 0 (its intersection is 0).

REC: Acc@0.5 = fraction of sentences whose predicted box has IoU >= 0.5 with the ground truth.

All scores are fractions in [0, 1]; reports multiply by 100.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from grounding.text.boxes import box_iou

GIOU_EPS = 1e-5
REC_THRESHOLD = 0.5


def mask_iou_parts(pred: np.ndarray | None, gt: np.ndarray) -> tuple[int, int]:
    """``(intersection, union)`` pixel counts of a predicted and a ground-truth ``H x W`` mask.

    ``pred=None`` counts as an empty mask. Shapes must match (both at the original resolution).
    """
    gt = np.asarray(gt) != 0
    if gt.ndim != 2:
        raise ValueError(f"a ground-truth mask must be 2-D (H x W), got shape {gt.shape}")
    if pred is None:
        return 0, int(np.count_nonzero(gt))
    pred = np.asarray(pred) != 0
    if pred.shape != gt.shape:
        raise ValueError(f"predicted mask is {pred.shape} but the ground truth is {gt.shape}: "
                         "masks must both be at the original image resolution")
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def sentence_iou(intersection: int, union: int) -> float:
    """One sentence's gIoU term: 1.0 when the union is empty (empty GT and empty prediction),
    else ``I / (U + 1e-5)`` (so an empty GT with a non-empty prediction scores 0)."""
    if union < 0 or intersection < 0 or intersection > union:
        raise ValueError(f"need 0 <= intersection <= union, got I={intersection}, U={union}")
    return 1.0 if union == 0 else intersection / (union + GIOU_EPS)


class ResAccumulator:
    """Running RES scores over sentences (add them one at a time, in any order)."""

    def __init__(self) -> None:
        self.intersection = 0  # Python ints: exact sums whatever the number of pixels
        self.union = 0
        self._giou_sum = 0.0
        self.n = 0

    def add(self, pred_mask: np.ndarray | None, gt_mask: np.ndarray) -> float:
        """Score one sentence; returns its gIoU term. ``None`` = the model gave no mask."""
        return self.add_parts(*mask_iou_parts(pred_mask, gt_mask))

    def add_parts(self, intersection: int, union: int) -> float:
        """Score one sentence from its pixel counts (as stored in predictions.jsonl)."""
        term = sentence_iou(int(intersection), int(union))
        self.intersection += int(intersection)
        self.union += int(union)
        self._giou_sum += term
        self.n += 1
        return term

    @property
    def ciou(self) -> float | None:
        """Sum I / sum U; ``None`` before any sentence; 1.0 if every union was empty (nothing to
        find and nothing predicted, the same convention as the per-sentence gIoU term)."""
        if self.n == 0:
            return None
        return 1.0 if self.union == 0 else self.intersection / self.union

    @property
    def giou(self) -> float | None:
        """Mean per-sentence term (see :func:`sentence_iou`); ``None`` before any sentence."""
        return None if self.n == 0 else self._giou_sum / self.n


def rec_hit(pred_box: Sequence[float] | None, gt_box: Sequence[float]) -> bool:
    """REC correctness of one sentence: IoU(pred, gt) >= 0.5 (continuous area); ``None`` = miss."""
    if pred_box is None:
        return False
    return box_iou(pred_box, gt_box) >= REC_THRESHOLD


def summarise(res: ResAccumulator | None = None, rec_hits: Iterable[bool] | None = None) -> dict:
    """The scores of a run: ``{"cIoU", "gIoU", "acc@0.5", "n_res", "n_rec"}``.

    A task that was not scored (``res=None`` / ``rec_hits=None``) or has no sentences gives
    ``None`` for its scores, so a report never shows a 0 that was not measured.
    """
    hits = None if rec_hits is None else [bool(h) for h in rec_hits]
    return {
        "cIoU": None if res is None else res.ciou,
        "gIoU": None if res is None else res.giou,
        "acc@0.5": None if not hits else sum(hits) / len(hits),
        "n_res": 0 if res is None else res.n,
        "n_rec": 0 if hits is None else len(hits),
    }
