"""``group_complete``: an "all ..." answer also gets the objects the locator never reached, found among the mask
decoder's object proposals (shapes/group_complete.py, shapes/object_proposals.py)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "shapes-tiny"
BACKGROUND = (205, 200, 190)


def eleven_shapes() -> tuple[np.ndarray, list[np.ndarray]]:
    """A 600 x 420 scene of 11 flat shapes drawn with OpenCV (circles and squares, 9 colours), and each one's mask."""
    palette = [(220, 40, 40), (40, 90, 220), (40, 160, 60), (235, 210, 40), (140, 60, 180), (240, 140, 40),
               (45, 200, 215), (240, 140, 190), (120, 80, 45)]
    centres = [(80, 80), (230, 70), (390, 90), (530, 80), (90, 230), (260, 220), (420, 240), (540, 230), (100, 360),
               (300, 360), (480, 360)]
    image = np.full((420, 600, 3), BACKGROUND, np.uint8)
    masks = []
    for k, (x, y) in enumerate(centres):
        mask = np.zeros(image.shape[:2], np.uint8)
        if k % 2 == 0:
            cv2.circle(mask, (x, y), 40, 1, -1)
        else:
            cv2.rectangle(mask, (x - 38, y - 38), (x + 38, y + 38), 1, -1)
        image[mask > 0] = palette[k % len(palette)]
        masks.append(mask > 0)
    return image, masks


@pytest.fixture(scope="module")
def grounder():
    from grounding import Grounder
    return Grounder.from_pretrained(DEFAULT_MODEL, device="cpu")


@pytest.mark.parametrize("phrase, names", [
    ("all red shapes", (["red"], [])),
    ("all the pentagons", ([], ["pentagon"])),
    ("the green pentagons", (["green"], ["pentagon"])),
    ("every shape", ([], [])),
    ("all the objects", ([], [])),
    ("shapes", ([], [])),
    ("crosses", ([], ["cross"])),
    ("the red square", None),          # one object
    ("the shape", None),
    ("all small shapes", None),        # a word the check cannot read in a box
])
def test_a_group_phrase_names_what_each_of_its_objects_is(phrase, names):
    from shapes.group_complete import group_names
    from shapes.region_head import Vocabulary

    assert group_names(phrase, Vocabulary.of_scenes()) == names


def test_tiles_overlap_and_cover_the_image():
    from shapes.object_proposals import tiles

    crops = tiles(300, 500, per_side=2)
    assert len(crops) == 4
    covered = np.zeros((300, 500), int)
    for x1, y1, x2, y2 in crops:
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1 and covered.max() == 4   # the middle lies in every tile
    assert tiles(300, 500, per_side=0) == []


def test_proposals_find_every_object_of_a_drawn_scene_and_no_background(grounder):
    from grounding.text.boxes import box_iou
    from shapes.object_proposals import object_proposals

    image, masks = eleven_shapes()
    prepared = grounder.prepare([image])[0]
    proposals = object_proposals(grounder.model.mask_decoder, prepared.pixels, prepared.embedding)
    boxes = [cv2.boundingRect(m.astype(np.uint8)) for m in masks]
    boxes = [(x, y, x + w, y + h) for x, y, w, h in boxes]
    best = [max(box_iou(p.box, b) for b in boxes) for p in proposals]
    found = {max(range(len(boxes)), key=lambda j: box_iou(p.box, boxes[j])) for p, b in zip(proposals, best) if b > 0.7}
    assert found == set(range(len(boxes))), [p.box for p in proposals]
    on_nothing = [p.box for p, b in zip(proposals, best) if b < 0.1]
    assert not on_nothing, on_nothing


def test_all_shapes_names_each_of_eleven_objects_once(grounder):
    """The language model and the locator name 10 of the 11 objects; the eleventh comes from the proposals, with its
    box text in the answer, its own mask and a note."""
    from grounding.text.boxes import parse_answer

    image, masks = eleven_shapes()
    answer = grounder.predict(image, "Please segment all shapes.")
    assert len(answer.targets) == 11, answer.answer
    ious = [[(t.mask & m).sum() / (t.mask | m).sum() for m in masks] for t in answer.targets]
    assert sorted(int(np.argmax(row)) for row in ious) == list(range(11))
    assert min(max(row) for row in ious) > 0.8, [max(row) for row in ious]
    parsed = parse_answer(answer.answer, answer.image_size)
    assert [p.seg_index for p in parsed] == [t.seg_index for t in answer.targets] == list(range(11))
    assert any("added" in n for n in answer.notes), answer.notes


def test_an_answer_cut_off_by_the_token_limit_loses_its_unfinished_target_and_gets_the_rest(grounder):
    """40 answer tokens hold one target of "all shapes" and part of a second: the unfinished one leaves the answer
    text (it has neither box nor [SEG]), and the proposals give the group the other three objects of
    examples/shapes.png."""
    from apps.demo import EXAMPLES_DIR
    from grounding.text.boxes import box_iou

    objects = [(92, 32, 188, 128), (170, 108, 249, 188), (200, 173, 287, 262), (332, 21, 390, 77)]
    answer = grounder.predict(EXAMPLES_DIR / "shapes.png", "Please segment all shapes.", max_new_tokens=40)
    assert answer.answer.endswith("[SEG]") and answer.answer.count("<ref>") == 4, answer.answer
    assert any("no readable box" in n for n in answer.notes), answer.notes
    found = sorted(max(range(4), key=lambda j: box_iou(t.box, objects[j])) for t in answer.targets)
    assert found == [0, 1, 2, 3], answer.answer


def test_a_solid_mask_counts_as_an_object_and_background_texture_does_not():
    """A rounded, lumpy blob (no kind can be read from it) is solid; a mask that follows blotchy background texture,
    or a thin L, is not."""
    from shapes.group_complete import solid
    from shapes.outline_kind import outline_kind

    blob = np.zeros((120, 120), np.uint8)
    cv2.ellipse(blob, (60, 60), (40, 28), 20, 0, 360, 1, -1)
    cv2.circle(blob, (92, 66), 14, 1, -1)
    assert outline_kind(blob.astype(bool)) is None and solid(blob.astype(bool))

    rng = np.random.default_rng(0)
    texture = cv2.resize(rng.normal(0, 1, (15, 15)).astype(np.float32), (120, 120)) > 0.3
    assert not solid(texture)
    ell = np.zeros((120, 120), bool)
    ell[20:100, 20:35] = ell[85:100, 20:100] = True
    assert not solid(ell)
