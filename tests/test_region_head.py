"""The region head (shapes/region_head.py) and the ``region`` add-on: a box or a click is answered with the object's
description read from the cells under it."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from shapes.region_head import CLICK_CELLS, Vocabulary, cell_cover, describe, region_box


def test_cell_cover_counts_the_share_of_each_cell_inside_the_box():
    grid = 4
    one_cell = torch.tensor([[0.25, 0.5, 0.5, 0.75]])            # exactly cell (row 2, col 1)
    cover = cell_cover(one_cell, grid).reshape(grid, grid)
    assert cover[2, 1] == pytest.approx(1.0) and cover.sum() == pytest.approx(1.0)
    half = cell_cover(torch.tensor([[0.0, 0.0, 0.125, 0.25]]), grid).reshape(grid, grid)
    assert half[0, 0] == pytest.approx(0.5) and half.sum() == pytest.approx(0.5)


def test_a_region_is_placed_in_the_padded_square():
    # a 100 x 200 (H x W) image sits in a 200-px square 50 px from its top
    box = region_box((100, 200), box=(20, 10, 60, 30))
    assert box.tolist() == pytest.approx([0.1, 0.3, 0.3, 0.4])
    click = region_box((100, 200), point=(100, 50))
    assert (click[2] - click[0]).item() == pytest.approx(CLICK_CELLS / 8)
    assert ((click[:2] + click[2:]) / 2).tolist() == pytest.approx([0.5, 0.5])


def test_descriptions_are_written_as_the_training_data_writes_them():
    from types import SimpleNamespace

    from shapes.scenes.expressions import region_description

    values = {"colour": "red", "kind": "square", "size": "medium", "texture": "dots", "outline": "white"}
    assert describe(values) == region_description(SimpleNamespace(**values)) == \
        "a medium-sized red dotted square with a white outline"
    assert describe({**values, "texture": "solid", "outline": ""}) == "a medium-sized red square"


def test_train_region_head_and_the_add_on_answer_a_box_question(tmp_path, scene):
    """A few scenes, a few epochs on the tiny random model: the written model loads with its head, and a question
    with a box (answered without a target) gets the head's description in the vocabulary's words."""
    from grounding import Grounder, Query
    from grounding.checkpoint import save_checkpoint
    from grounding.presets import build_random
    from shapes.region_head import train_region_head
    from shapes.scenes.synthetic import generate_dataset

    model, tok = build_random("tiny", seed=4)
    save_checkpoint(model, tok, tmp_path / "base")
    data = generate_dataset(tmp_path / "synth", 12, seed=6, progress=False)
    report = train_region_head(tmp_path / "base", data, tmp_path / "out", epochs=3, progress=False)
    assert report["train_samples"] > 0 and 0.0 <= report["val"]["named"] <= 1.0
    assert json.loads((tmp_path / "out" / "region_scores.json").read_text())["epochs"] == 3

    grounder = Grounder.from_pretrained(tmp_path / "out" / "model", device="cpu")
    image, _ = scene
    vocab = Vocabulary.of_scenes()
    box = Query(image, "What is in this region?", boxes=[[10, 10, 40, 40]], answer_prefix="a thing")
    pred = grounder.predict_batch([box], max_new_tokens=4)[0]
    words = pred.answer.split()
    assert words[0] in ("a", "an") and any(w in vocab.kinds for w in words), pred.answer
    assert any(w in vocab.colours for w in words), pred.answer
    assert any("region head" in n for n in pred.notes)
    assert not any("names no object" in n for n in pred.notes)          # a description is an answer
    click = grounder.predict_batch([Query(image, "What is this?", points=[[20, 20]], answer_prefix="a thing")],
                                   max_new_tokens=4)[0]
    assert any(w in vocab.kinds for w in click.answer.split()), click.answer
    plain = grounder.predict_batch([Query(image, "What is this?", answer_prefix="a thing")], max_new_tokens=4)[0]
    assert not any("region head" in n for n in plain.notes)              # no region: the model's own answer
    given = grounder.predict_batch([Query(image, "What is in this region?", boxes=[[10, 10, 40, 40]],
                                          answer="a thing")])[0]
    assert given.answer == "a thing"                                     # a given answer is left alone


def test_plain_phrases_are_those_naming_only_a_colour_and_a_kind():
    from shapes.region_verify import plain_names

    vocab = Vocabulary.of_scenes()
    assert plain_names("the cyan square", vocab) == (["cyan"], ["square"])
    assert plain_names("Yellow circle", vocab) == (["yellow"], ["circle"])
    assert plain_names("the star", vocab) == ([], ["star"])
    assert plain_names("the red shape", vocab) == (["red"], [])
    assert plain_names("all red shapes", vocab) == (["red"], [])          # a group: what each of its objects is
    assert plain_names("all the stars", vocab) == ([], ["star"])
    assert plain_names("every green cross", vocab) == (["green"], ["cross"])
    for other in ("the small red square", "all small shapes", "the circle below the cyan shape", "the square shape",
                  "the shape", "the red blue square", ""):
        assert plain_names(other, vocab) is None, other


def test_the_region_check_drops_plain_targets_its_head_does_not_read_in_their_box():
    """With the check at its strictest (every probability is under 1.01) a plain target becomes "There is no ...",
    with a note naming the region head; a referring phrase is left to the presence head; with the check off the
    answer is the model's."""
    from pathlib import Path

    from grounding import Grounder
    from grounding.images import load_image

    model = Path(__file__).resolve().parent.parent / "weights/shapes-tiny"
    image = load_image(model.parent.parent / "examples/shapes.png")
    strict = Grounder.from_pretrained(model, device="cpu", addons={"region": {"verify": 1.01}})
    dropped = strict.predict(image, "Where is the yellow circle?")
    assert not dropped.targets and dropped.answer == "There is no yellow circle in the image."
    assert any("region head" in n for n in dropped.notes)
    assert strict.predict(image, "Please segment the circle below the cyan shape.").targets
    kept = Grounder.from_pretrained(model, device="cpu", addons={"region": {"verify": 0.0}})
    assert kept.predict(image, "Where is the yellow circle?").targets


def test_a_group_repeat_whose_mask_fills_little_of_its_box_is_dropped():
    """A further object of "all the yellow shapes" is kept when its mask fills its box, and dropped with a note when
    its box also holds a stretch of empty ground (the mask's tight box overlaps it under REPEAT_BOX_FIT), as a
    locator cell at an object's edge boxes it."""
    from pathlib import Path

    from grounding import Grounder
    from grounding.images import load_image
    from grounding.result import Prediction
    from shapes.region_verify import REPEAT_BOX_FIT

    model = Path(__file__).resolve().parent.parent / "weights/shapes-tiny"
    image = load_image(model.parent.parent / "examples/shapes.png")
    grounder = Grounder.from_pretrained(model, device="cpu")
    circle, square = grounder.segment(image, boxes=[[168, 109, 247, 192], [197, 171, 287, 262]]).targets
    phrase = "all the yellow shapes"
    ref = f"<ref>{phrase}</ref>[SEG]"

    def verified(square_box, mask=square.mask, group=phrase):
        targets = [dataclasses.replace(circle, phrase=group),
                   dataclasses.replace(square, phrase=group, box=square_box, mask=mask)]
        prediction = Prediction(f"<ref>{group}</ref>[SEG] <ref>{group}</ref>[SEG]", targets, image.shape[:2])
        return grounder.model.addons["region"].verify(grounder.model, grounder.processor.tokenizer,
                                                      grounder.prepare([image])[0], prediction)

    assert len(verified(square.box).targets) == 2
    x1, y1, x2, y2 = square.box
    loose = verified((x1, y1 - (y2 - y1), x2 + (x2 - x1), y2))          # three times its area, above and right
    assert len(loose.targets) == 1 and loose.answer == ref, loose.answer
    assert any(f"needed {REPEAT_BOX_FIT}" in n for n in loose.notes), loose.notes
    # a group of any kind ("all shapes") is checked too, and a repeat with an empty mask is dropped
    assert len(verified(square.box, group="all shapes").targets) == 2
    assert len(verified(square.box, np.zeros_like(square.mask), "all shapes").targets) == 1
