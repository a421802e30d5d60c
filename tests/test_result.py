"""Tests of grounding.result: RLE and JSON round trips are exact; the JSON is what COCO tools read.

Sizes are (H, W); boxes are float pixel xyxy with exclusive x2/y2."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as coco_mask

from grounding.result import Prediction, Target, box_from_mask, rle_decode, rle_encode

# pycocotools 2.0.x + NumPy 2 warn inside coco_mask.decode; the tests call it directly on purpose.
COCO_DECODE_WARNING = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ODD_SIZES = [(1, 1), (1, 7), (7, 1), (3, 5), (31, 17), (64, 48), (101, 3)]


def random_mask(shape, density, seed=0):
    return np.random.default_rng(seed).random(shape) < density


@pytest.mark.parametrize("shape", ODD_SIZES)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_rle_round_trip_exact(shape, density):
    mask = random_mask(shape, density)
    rle = rle_encode(mask)
    assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
    decoded = rle_decode(json.loads(json.dumps(rle)))
    assert decoded.dtype == np.bool_ and decoded.flags.c_contiguous
    assert np.array_equal(decoded, mask)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       density=st.floats(0.0, 1.0))
def test_rle_round_trip_property(h, w, seed, density):
    mask = random_mask((h, w), density, seed)
    assert np.array_equal(rle_decode(rle_encode(mask)), mask)


@COCO_DECODE_WARNING
def test_rle_is_readable_by_pycocotools():
    mask = random_mask((13, 29), 0.3)
    rle = json.loads(json.dumps(rle_encode(mask)))
    decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert decoded.shape == (13, 29)
    assert np.array_equal(decoded.astype(bool), mask)
    assert coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode()}) == mask.sum()


def test_rle_accepts_non_bool_masks_and_uncompressed_counts():
    mask = np.zeros((4, 5), np.uint8)
    mask[1:3, 2:4] = 7
    assert np.array_equal(rle_decode(rle_encode(mask)), mask != 0)
    # Uncompressed COCO RLE: column-major run lengths starting with zeros.
    column_major = (mask != 0).flatten(order="F")
    runs, current, count = [], False, 0
    for value in column_major:
        if value != current:
            runs.append(count)
            current, count = value, 0
        count += 1
    runs.append(count)
    assert np.array_equal(rle_decode({"size": [4, 5], "counts": runs}), mask != 0)


def test_rle_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((2, 3, 4), bool))


def test_box_from_mask_is_tight_and_exclusive():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:6] = True
    assert box_from_mask(mask) == (3.0, 2.0, 6.0, 5.0)
    assert box_from_mask(np.zeros((4, 4), bool)) is None
    assert box_from_mask(np.ones((1, 1), bool)) == (0.0, 0.0, 1.0, 1.0)
    target = Target(mask=mask)
    assert target.box_from_mask() == (3.0, 2.0, 6.0, 5.0)
    assert target.area == 9
    assert Target(box=(1, 2, 4, 6)).area == 12.0
    assert Target().area is None and Target().box_from_mask() is None


def test_target_normalises_inputs():
    target = Target(phrase="cup", box=np.array([1, 2, 3, 4], np.int64),
                    mask=np.eye(3, dtype=np.uint8), score=np.float32(0.5), seg_index=np.int64(2))
    assert target.box == (1.0, 2.0, 3.0, 4.0) and all(type(v) is float for v in target.box)
    assert target.mask.dtype == np.bool_
    assert type(target.score) is float and type(target.seg_index) is int
    with pytest.raises(ValueError, match="x1, y1, x2, y2"):
        Target(box=(1, 2, 3))
    with pytest.raises(ValueError, match="2-D"):
        Target(mask=np.zeros((2, 2, 2), bool))


def make_prediction(h=37, w=53) -> Prediction:
    empty = np.zeros((h, w), bool)
    full = np.ones((h, w), bool)
    return Prediction(
        answer="<ref>the white cup</ref><box>(388,270),(455,352)</box>[SEG] and <ref>a plate</ref>[SEG]",
        targets=[
            Target("the white cup", (1.25, 2.5, 30.125, 20.0), random_mask((h, w), 0.3, 1), 0.8731, 0),
            Target("a plate", None, full, None, 1),
            Target(None, (0.1, 0.2, 0.3, 0.4), empty, 1e-9, 2),
            Target("no mask, ünïcode", (3.0, 4.0, 5.0, 6.0), None, None, None),
        ],
        image_size=(h, w),
        question="Where is the cup? <point>(412,300)</point>",
        notes=["target 2's mask is empty"],
    )


def assert_same(a: Prediction, b: Prediction) -> None:
    assert (a.answer, a.question, a.image_size, a.notes) == (b.answer, b.question, b.image_size, b.notes)
    assert len(a.targets) == len(b.targets)
    for x, y in zip(a.targets, b.targets):
        assert (x.phrase, x.box, x.score, x.seg_index) == (y.phrase, y.box, y.score, y.seg_index)
        if x.mask is None:
            assert y.mask is None
        else:
            assert y.mask.dtype == np.bool_ and np.array_equal(x.mask, y.mask)


def test_json_round_trip_exact_through_json_text():
    prediction = make_prediction()
    text = json.dumps(prediction.to_json())
    assert_same(prediction, Prediction.from_json(json.loads(text)))


def test_json_fields():
    data = make_prediction().to_json()
    assert data["image_size"] == [37, 53]
    cup, plate, tiny, unmasked = data["targets"]
    assert cup["box"] == [1.25, 2.5, 30.125, 20.0]
    assert cup["bbox_xywh"] == [1.25, 2.5, 28.875, 17.5]
    assert plate["box"] is None and plate["bbox_xywh"] == [0.0, 0.0, 53.0, 37.0]  # from the mask
    assert plate["area"] == 37 * 53 and tiny["area"] == 0
    assert unmasked["mask"] is None and unmasked["area"] == 4.0
    assert set(cup) == {"phrase", "box", "bbox_xywh", "area", "score", "seg_index", "mask"}


def test_empty_prediction_with_a_note():
    prediction = Prediction(answer="I cannot see one.", targets=[], image_size=(4, 4),
                            notes=["the answer has no [SEG] token"])
    back = Prediction.from_json(json.loads(json.dumps(prediction.to_json())))
    assert back.targets == [] and back.notes == ["the answer has no [SEG] token"]


def test_mask_size_must_match_image():
    with pytest.raises(ValueError, match="original size"):
        Prediction("x", [Target(mask=np.zeros((3, 4), bool))], image_size=(4, 3))


@COCO_DECODE_WARNING
def test_save_json_atomic_and_readable_by_pycocotools(tmp_path):
    prediction = make_prediction()
    path = prediction.save_json(tmp_path / "out" / "nested" / "p.json")
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # no temporary file left
    assert_same(prediction, Prediction.load_json(path))
    stored = json.loads(path.read_text(encoding="utf-8"))
    rle = stored["targets"][0]["mask"]
    decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert decoded.shape == (37, 53)
    assert np.array_equal(decoded.astype(bool), prediction.targets[0].mask)
    # Overwriting replaces the whole file; permissions follow the umask, not tempfile's 0o600.
    Prediction("again", [], (37, 53)).save_json(path)
    assert Prediction.load_json(path).answer == "again"
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_unknown_version_is_refused():
    data = make_prediction().to_json()
    data["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        Prediction.from_json(data)
