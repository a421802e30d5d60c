"""REC/RES metrics against hand-computed values (reference.md section 5)."""
from __future__ import annotations

import numpy as np
import pytest

from eval.metrics import ResAccumulator, mask_iou_parts, rec_hit, sentence_iou, summarise


def m(rows):
    return np.array(rows, dtype=bool)


def test_mask_iou_parts_counts_pixels():
    gt = m([[1, 1, 0], [0, 0, 0]])
    pred = m([[0, 1, 1], [0, 0, 0]])
    assert mask_iou_parts(pred, gt) == (1, 3)
    assert mask_iou_parts(None, gt) == (0, 2)  # no [SEG]: an empty prediction
    assert mask_iou_parts(np.zeros((2, 3), np.uint8), np.zeros((2, 3), bool)) == (0, 0)


def test_mask_shapes_must_match():
    with pytest.raises(ValueError, match="original image resolution"):
        mask_iou_parts(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_res_accumulator_hand_computed():
    acc = ResAccumulator()
    # 1: I=1, U=3
    assert acc.add(m([[0, 1, 1], [0, 0, 0]]), m([[1, 1, 0], [0, 0, 0]])) == pytest.approx(1 / (3 + 1e-5))
    # 2: empty GT and empty prediction -> 1.0
    assert acc.add(np.zeros((2, 3), bool), np.zeros((2, 3), bool)) == 1.0
    # 3: empty GT, non-empty prediction (2 px) -> 0
    assert acc.add(m([[1, 1, 0], [0, 0, 0]]), np.zeros((2, 3), bool)) == 0.0
    # 4: no prediction at all, GT of 4 px: counted as an empty mask, not skipped -> 0
    assert acc.add(None, m([[1, 1, 0], [1, 1, 0]])) == 0.0
    assert acc.n == 4
    assert (acc.intersection, acc.union) == (1, 3 + 0 + 2 + 4)
    assert acc.ciou == pytest.approx(1 / 9)
    assert acc.giou == pytest.approx((1 / (3 + 1e-5) + 1.0 + 0.0 + 0.0) / 4)


def test_giou_uses_the_epsilon_and_none_counts_as_empty():
    acc = ResAccumulator()
    acc.add(m([[1, 1], [1, 1]]), m([[1, 1], [1, 1]]))  # perfect: 4 / (4 + 1e-5), not exactly 1
    assert acc.giou == pytest.approx(4 / (4 + 1e-5), abs=0, rel=1e-12)
    assert acc.giou < 1.0
    acc.add(None, np.zeros((2, 2), bool))  # None prediction, empty GT: empty/empty -> 1.0
    assert acc.giou == pytest.approx((4 / (4 + 1e-5) + 1.0) / 2)
    assert acc.ciou == 1.0  # 4 / 4


def test_sentence_iou_and_add_parts_agree_with_add():
    a, b = ResAccumulator(), ResAccumulator()
    rng = np.random.default_rng(0)
    for _ in range(5):
        pred, gt = rng.random((6, 7)) > 0.5, rng.random((6, 7)) > 0.6
        a.add(pred, gt)
        b.add_parts(*mask_iou_parts(pred, gt))
    assert (a.ciou, a.giou) == (b.ciou, b.giou)
    assert sentence_iou(0, 0) == 1.0 and sentence_iou(0, 5) == 0.0
    with pytest.raises(ValueError):
        sentence_iou(3, 2)


def test_empty_accumulator_has_no_scores():
    acc = ResAccumulator()
    assert acc.ciou is None and acc.giou is None


def test_rec_hit_boundary_is_inclusive():
    gt = (0.0, 0.0, 10.0, 10.0)
    assert rec_hit((0.0, 0.0, 10.0, 5.0), gt)          # IoU exactly 50 / 100 = 0.5: a hit
    assert rec_hit((0.0, 0.0, 5.0, 10.0), gt)
    assert not rec_hit((0.0, 0.0, 10.0, 4.999), gt)    # just below
    assert rec_hit(gt, gt)
    assert not rec_hit(None, gt)                       # unparseable output: a miss


def test_rec_hit_uses_continuous_area():
    # continuous: 4 * 1.9 / 16 = 0.475 -> miss (the "+1" convention would give 14.5 / 25 = 0.58, a hit)
    assert not rec_hit((0.0, 0.0, 4.0, 1.9), (0.0, 0.0, 4.0, 4.0))
    # disjoint and degenerate boxes
    assert not rec_hit((20.0, 20.0, 30.0, 30.0), (0.0, 0.0, 10.0, 10.0))
    assert not rec_hit((5.0, 5.0, 5.0, 9.0), (0.0, 0.0, 10.0, 10.0))


def test_summarise():
    acc = ResAccumulator()
    acc.add_parts(1, 3)
    acc.add_parts(0, 0)
    s = summarise(acc, [True, False, True, True])
    assert s["cIoU"] == pytest.approx(1 / 3)
    assert s["gIoU"] == pytest.approx((1 / (3 + 1e-5) + 1.0) / 2)
    assert s["acc@0.5"] == 0.75
    assert (s["n_res"], s["n_rec"]) == (2, 4)
    only_rec = summarise(rec_hits=[False])
    assert only_rec["cIoU"] is None and only_rec["gIoU"] is None and only_rec["acc@0.5"] == 0.0
    assert summarise(ResAccumulator(), [])["acc@0.5"] is None
