"""benchmarks/phrasing_suite.py at a tiny size: held-out scenes are drawn as described, every item is scored, and
the report holds each measure with its target."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "phrasing_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("phrasing_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_scenes_hold_their_objects(suite):
    rng = np.random.default_rng(0)
    for style in suite.STYLES:
        scene = suite.make_scene(rng, style)
        h, w = scene.image.shape[:2]
        assert 260 <= h <= 460 and 260 <= w <= 460 and scene.image.dtype == np.uint8
        assert len(scene.objects) >= 3
        pairs = [(o.colour, o.kind) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)                     # each (colour, kind) names one object
        for o in scene.objects:
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # the object's pixels carry its colour (outlined: the fill inside the dark ring does)
            inside = scene.image[o.mask].astype(float).mean(0)
            background = scene.image[~np.any([p.mask for p in scene.objects], 0)].astype(float).mean(0)
            assert np.abs(inside - background).sum() > 30


def test_items_cover_every_kind_and_held_out_form(suite):
    rng = np.random.default_rng(1)
    scenes = [suite.make_scene(rng, s) for s in suite.STYLES]
    items = suite.make_items(scenes, rng, per_scene=3)
    assert {i.kind for i in items} == {"present", "absent", "multi", "region", "foreign"}
    assert {i.form for i in items if i.kind == "present"} >= {"please-segment", "where-is", "bare", "bare-the"}
    for item in items:
        objs = scenes[item.scene].objects
        if item.kind == "absent":   # an absent phrase names no object of its scene
            assert all(f"{o.colour} {o.kind}" not in item.question.lower() for o in objs)
        if item.kind == "present":
            assert item.phrase.lower().removeprefix("the ") in item.question.lower()


def test_each_scene_gets_one_question_about_all_its_objects(suite):
    from grounding.result import Prediction, Target

    scenes, items = suite.draw_suite(scenes_per_style=1, seed=5, per_scene=1)
    every = [i for i in items if i.kind == "every"]
    assert [i.scene for i in every] == list(range(len(scenes))) and len(scenes) == len(suite.STYLES) + 2
    assert all(i.objects == list(range(len(scenes[i.scene].objects))) for i in every)
    scene = scenes[0]
    size = scene.image.shape[:2]
    right = suite.score(every[0], scene, Prediction("", [Target(box=o.box, mask=o.mask) for o in scene.objects], size))
    short = suite.score(every[0], scene, Prediction("", [Target(box=o.box, mask=o.mask) for o in scene.objects[1:]],
                                                    size))
    assert right["exact"] and right["hits"] == len(scene.objects) and not short["exact"]
    assert suite.summarise([right, short])["every_recall"] == (2 * len(scene.objects) - 1) / (2 * len(scene.objects))


def test_the_suite_runs_on_a_tiny_model_and_reports_every_measure(suite, tiny_dir):
    from grounding import Grounder
    grounder = Grounder.from_pretrained(tiny_dir, device="cpu", max_new_tokens=12)
    report, rows = suite.run_suite(grounder, scenes_per_style=1, seed=3, per_scene=1)
    assert len(rows) == sum(report["counts"].values()) >= 4 * 4
    for key, (target, how) in suite.TARGETS.items():
        value = report[key]
        assert value is None or 0.0 <= value <= 1.0, key
        assert report["passed"][key] == (value is not None and (value <= target if how == "max" else value >= target))
    assert report["present_mask_iou"] is not None and set(report["by_style"]) == {*suite.STYLES, suite.GREY,
                                                                                            suite.DRAWN}
    # a denial is a present question answered with no target, and then its IoU is 0
    for r in rows:
        if r["kind"] == "present" and r["denied"]:
            assert r["targets"] == 0 and r["iou"] == 0.0
    assert "present_denied" in suite.table(report)


def test_grey_scenes_come_through_the_loader_and_their_questions_name_kinds_only(suite):
    scenes = [suite.make_grey_scene(np.random.default_rng(n), style) for n, style in enumerate(suite.STYLES)]
    for n, (scene, style) in enumerate(zip(scenes, suite.STYLES)):
        image, colour = scene.image, suite.make_scene(np.random.default_rng(n), style).image
        assert scene.style == suite.GREY and image.dtype == np.uint8 and image.shape == colour.shape
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
        # the 16-bit PNG was scaled to 8 bits, not clipped white: each pixel is the colour scene's luma
        luma = colour.astype(float) @ np.array([0.299, 0.587, 0.114])
        assert np.abs(image[..., 0] - luma).max() <= 1.0
    rng = np.random.default_rng(4)
    items = suite.make_grey_items(scenes, rng, per_scene=3)
    assert {i.kind for i in items} == {"present", "absent", "multi", "region"}
    colours = set(suite.COLOURS)
    for item in items:
        objs = scenes[item.scene].objects
        assert not colours & set(item.question.lower().replace(".", " ").split()), item.question
        named = item.phrase.lower().removeprefix("the ")
        if item.kind == "present":
            assert [o.kind for o in objs].count(named) == 1
        if item.kind == "absent":
            assert named not in [o.kind for o in objs]
    # a region answer on a grey scene is right with the kind alone
    from grounding.result import Prediction
    o = scenes[0].objects[0]
    region = suite.Item(0, "region", "What is this?", "what-is-this", objects=[0], box=o.box)
    assert suite.score(region, scenes[0], Prediction(f"a large {o.kind}", [], image.shape[:2]))["named"]


def test_drawn_scenes_are_css_coloured_and_turned_and_leave_the_other_items_as_they_were(suite):
    from PIL import ImageColor
    scenes = [suite.make_drawn_scene(np.random.default_rng(n)) for n in range(12)]
    for scene in scenes:
        h, w = scene.image.shape[:2]
        assert scene.style == suite.DRAWN and 480 <= h <= 800 and 480 <= w <= 800 and len(scene.objects) >= 3
        for o in scene.objects:
            inner = cv2.erode(o.mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            assert (scene.image[inner] == ImageColor.getrgb(o.colour)).all()   # CSS's colour, exactly
    # rectangles stand at any angle: some are taller than wide
    rects = [o.box for s in scenes for o in s.objects if o.kind == "rectangle"]
    assert any(y2 - y1 > 1.3 * (x2 - x1) for x1, y1, x2, y2 in rects)
    with_drawn = suite.draw_suite(scenes_per_style=1, seed=6, per_scene=1)
    without = suite.draw_suite(scenes_per_style=1, seed=6, per_scene=1, drawn=False)
    assert [s.style for s in with_drawn[0]][-1] == suite.DRAWN
    assert [vars(i) for i in with_drawn[1] if i.kind != "every"][:len(without[1]) - 5] == \
        [vars(i) for i in without[1] if i.kind != "every"]


def test_scoring_counts_a_right_answer_right(suite):
    from grounding.result import Prediction, Target
    rng = np.random.default_rng(2)
    scene = suite.make_scene(rng, "plain")
    o = scene.objects[0]
    h, w = scene.image.shape[:2]
    item = suite.Item(0, "present", "Where is the X?", "where-is", f"the {o.colour} {o.kind}", [0])
    good = Prediction("", [Target(phrase=f"the {o.colour} {o.kind}", box=o.box, mask=o.mask)], (h, w))
    row = suite.score(item, scene, good)
    assert row["iou"] == 1.0 and row["copied"] and not row["denied"]
    wrong = Prediction("", [Target(phrase="the purple star", box=o.box, mask=scene.objects[1].mask)], (h, w))
    row = suite.score(item, scene, wrong)
    assert row["iou"] == 0.0 and not row["copied"]
    multi = suite.Item(0, "multi", "", "x-and-y", objects=[0, 1])
    twice = Prediction("", [Target(box=o.box, mask=o.mask), Target(box=o.box, mask=o.mask)], (h, w))
    row = suite.score(multi, scene, twice)
    assert not row["exact"] and (row["hits"], row["wanted"]) == (1, 2)   # one object named twice is not two
    b = scene.objects[1]
    both = Prediction("", [Target(box=b.box, mask=b.mask), Target(box=o.box, mask=o.mask)], (h, w))
    row = suite.score(multi, scene, both)
    assert row["exact"] and row["hits"] == 2
    one = suite.score(multi, scene, Prediction("", [Target(box=b.box, mask=b.mask)], (h, w)))
    report = suite.summarise([row, one, suite.score(multi, scene, twice)])
    assert report["multi_precision"] == 4 / 5 and report["multi_recall"] == 4 / 6


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from shapes.scenes.synthetic import generate_dataset
    return generate_dataset(tmp_path_factory.mktemp("synth") / "data", 12, seed=5, progress=False)


def test_phrasing_conversations_name_their_objects_in_wordings_the_suite_does_not_use(synth_dir, suite):
    """The "phrasing" training kind: "the {colour} {kind}" / "{colour} {kind}" about an object they name alone,
    "the X and the Y" with one target each, region questions with the box after the words; never a held-out form."""
    import json
    from grounding.data.refer import ReferDataset
    from grounding.data.tasks import build_conversations
    ds = ReferDataset(synth_dir, "synth", "unc")
    convs = build_conversations(ds, "train", seed=0, kinds=("phrasing",))
    objects = {o["ann_id"]: o for r in json.loads((synth_dir / "scenes.json").read_text())["images"]
               for o in r["objects"]}
    assert convs and {c.kind for c in convs} == {"phrasing"}
    seen_kinds = set()
    for c in convs:
        asked = c.question.lower().rstrip(".?! ")
        assert not asked.startswith(("what is in this region", "what is this")), c.question
        for ref in c.answer.split("<ref>")[1:] or [c.answer[len("There is no "):-len(" in the image.")]]:
            p = ref.split("</ref>")[0]
            bare = p.removeprefix("the ")
            assert asked not in (bare, f"the {bare}", f"where is {p}", f"can you find {p} in this picture"), c.question
        if c.answer.startswith("There is no"):
            colour_kind = c.answer[len("There is no "):-len(" in the image.")]
            assert colour_kind in c.question.lower() and not c.ann_ids
            image_objects = [objects[a] for a in ds.annotations_by_image()[c.image_id]]
            assert colour_kind not in {f"{o['colour']} {o['kind']}" for o in image_objects}
            seen_kinds.add("denial")
        elif c.ann_ids:
            refs = c.answer.split("<ref>")[1:]
            assert len(refs) == len(c.ann_ids) == c.answer.count("[SEG]")
            for ref, ann in zip(refs, c.ann_ids):
                phrase = ref.split("</ref>")[0]
                o = objects[ann]
                assert phrase.removeprefix("the ") == f"{o['colour']} {o['kind']}"
                assert phrase in c.question.lower()
                assert ds.mask(ann).any()
            seen_kinds.add("multi" if len(c.ann_ids) > 1 else "one")
        else:
            assert "<box>" in c.question and not c.question.startswith("<box>")   # the box after the words
            assert c.answer.startswith(("a ", "an ")) and "<ref>" not in c.answer
            seen_kinds.add("region")
    assert seen_kinds == {"one", "multi", "region", "denial"}
    assert "phrasing" not in {c.kind for c in build_conversations(ds, "train", seed=0)}  # opt-in


def test_a_question_in_another_language_gets_a_note(tiny_dir):
    """The question_language add-on: a question mostly in words the model was not trained on gets a note; an
    English one in its words does not."""
    from grounding import Grounder
    from tests.conftest import draw_scene
    words = ["please", "segment", "the", "red", "circle", "where", "is"]
    g = Grounder.from_pretrained(tiny_dir, device="cpu", max_new_tokens=4,
                                 addons={"question_language": {"words": words}})
    image, _ = draw_scene()
    note = [n for n in g.predict(image, "请分割红色的圆。").notes if "English only" in n]
    assert len(note) == 1
    assert not [n for n in g.predict(image, "Please segment the RED circle!").notes if "English" in n]
    assert not [n for n in Grounder.from_pretrained(tiny_dir, device="cpu", max_new_tokens=4)
                .predict(image, "请分割红色的圆。").notes if "English" in n]   # off unless the model names it


def test_a_repeated_phrase_takes_the_next_object_for_its_box_text():
    """"all yellow shapes" repeats one phrase per object: the box text of the k-th repeat is read at the locator's
    k-th peak (as its mask is), so two targets do not share one box."""
    from shapes.box_writer import BoxWriter
    writer = object.__new__(BoxWriter)
    writer.ref_start, writer.ref_end = 1, 2
    phrase = [7, 8]
    answer = [1, 7, 8, 2, 5, 5, 9, 1, 7, 2, 5, 1, 7, 8, 2, 5]      # the phrase, another, the phrase again
    assert writer.repeats(answer, phrase) == 2
    assert writer.repeats(answer[:4], phrase) == 1 and writer.repeats([], phrase) == 0
