"""The shipped default model (weights/shapes-tiny) on scenes it never saw: a floor under its model-card scores, so
that a broken or wrongly copied checkpoint cannot ship. Floors sit well below what the card measures on full
splits (v10: val teacher-forced cIoU 75.2%, a box prompt's mask IoU 0.916 with the shipped zoom and refinement) and
on these scenes (0.805 cIoU, 0.933 mask-box Acc@0.5, 0.907 box-prompt IoU), as 10 scenes are a small sample."""
from __future__ import annotations

from pathlib import Path
import dataclasses

import numpy as np
import pytest

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "shapes-tiny"


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    """Sentences of 10 scenes from a seed no training set used, at larger sizes than training (300-400 px)."""
    from grounding.data.refer import ReferDataset
    from shapes.scenes.synthetic import generate_dataset

    root = generate_dataset(tmp_path_factory.mktemp("unseen"), 10, seed=4242,
                            image_size_range=((300, 400), (300, 400)), progress=False)
    ds = ReferDataset(root, dataset="synth")
    sentences = [s for split in ("train", "val", "testA", "testB") for s in ds.sentences(split)]
    return ds, sentences


@pytest.fixture(scope="module")
def grounder():
    from grounding import Grounder
    return Grounder.from_pretrained(DEFAULT_MODEL, device="cpu")


def test_referring_masks_on_unseen_scenes(grounder, unseen):
    from grounding.text.boxes import box_iou
    from shapes.scenes.figures import mask_box_xyxy
    from grounding.images import load_image
    from grounding import Query

    ds, sentences = unseen
    inter = union = 0
    box_hits = []
    for s in sentences:
        gt = ds.mask(s.ann_id)
        answer = grounder.predict_batch([Query(load_image(ds.image_path(s.image_id)), f"Please segment {s.text}.",
                                               answer=f"<ref>{s.text}</ref>[SEG]")])[0]
        mask = answer.targets[0].mask
        inter, union = inter + (mask & gt).sum(), union + (mask | gt).sum()
        box = mask_box_xyxy(mask)
        box_hits.append(box is not None and box_iou(box, ds.box_xyxy(s.ann_id)) >= 0.5)
    assert len(sentences) >= 40
    assert inter / union > 0.70, f"cIoU {inter / union:.3f} over {len(sentences)} sentences"
    assert np.mean(box_hits) > 0.85, f"mask-box Acc@0.5 {np.mean(box_hits):.3f}"


def test_a_box_prompt_gives_the_objects_mask(grounder, unseen):
    from grounding.images import load_image

    ds, sentences = unseen
    ious = []
    for ann in sorted({s.ann_id for s in sentences})[:40]:
        image_id = next(s.image_id for s in sentences if s.ann_id == ann)
        gt = ds.mask(ann)
        mask = grounder.segment(load_image(ds.image_path(image_id)), boxes=[ds.box_xyxy(ann)]).targets[0].mask
        ious.append((mask & gt).sum() / (mask | gt).sum())
    assert np.mean(ious) > 0.83, f"mean IoU {np.mean(ious):.3f} on {len(ious)} objects"


def test_a_bare_shape_name_is_answered_with_its_object(grounder, unseen):
    """"Please segment the {kind}." about a kind the scene holds once, answered by the model itself (no teacher
    forcing). Here v10 finds 15 of the 16 objects and denies none (v9: 16; v7, v8: 14); v6 denied 15 ("There is no
    circle")."""
    from collections import Counter

    from grounding.images import load_image
    from grounding import Query

    ds, sentences = unseen
    anns = ds.annotations_by_image()
    asked, denied, found = 0, 0, 0
    for image_id in sorted({s.image_id for s in sentences}):
        count = Counter(ds.category_name(a) for a in anns[image_id])
        image = load_image(ds.image_path(image_id))
        for ann in anns[image_id]:
            name = ds.category_name(ann)
            if count[name] != 1:
                continue
            answer = grounder.predict_batch([Query(image, f"Please segment the {name}.")])[0]
            gt = ds.mask(ann)
            asked += 1
            denied += answer.answer.lower().startswith("there is no")
            found += any((t.mask & gt).sum() / (t.mask | gt).sum() > 0.5 for t in answer.targets if t.mask is not None)
    assert asked >= 10
    assert denied / asked < 0.2, f"denied {denied} of {asked}"
    assert found / asked > 0.5, f"found {found} of {asked}"


def test_questions_asked_the_way_people_ask(grounder, unseen):
    """Wordings the model was never trained on ("Where is the X?", "Can you find the X in this picture?", "X" in
    capitals), about the unseen scenes: a colour + kind the scene holds once (mostly visible) is found, a near miss
    (its colour or its kind is there, not together) is denied, and a box around an object is described with its
    colour and kind. v12 on these scenes: present denied 0 of 27, mean IoU 0.856, absent denied 9 of 14 (v11: 8;
    the generator's cluttered scenes make near misses harder than the phrasing suite's), regions named 25 of 27;
    v10.1 denied most present "the {colour} {kind}" and named no region."""
    import json

    from grounding.images import load_image

    ds, _ = unseen
    scenes = json.loads((ds.data_root / "scenes.json").read_text())["images"]
    found, denied_present, denied_absent, asked_absent, named, asked = [], 0, 0, 0, 0, 0
    for k, scene in enumerate(scenes):
        image = load_image(ds.image_path(scene["image_id"]))
        objects = scene["objects"]
        pairs = [(o["colour"], o["kind"]) for o in objects]
        for i, o in enumerate(objects):
            if pairs.count(pairs[i]) > 1 or o["area"] < 0.7 * o["full_area"]:
                continue
            form = ("Where is the {}?", "Can you find the {} in this picture?", "{}")[asked % 3]
            text = form.format(f"{o['colour']} {o['kind']}")
            answer = grounder.predict(image, text.upper() if asked % 3 == 2 else text)
            asked += 1
            gt = ds.mask(o["ann_id"])
            denied_present += not answer.targets
            found.append((answer.targets[0].mask & gt).sum() / (answer.targets[0].mask | gt).sum()
                         if answer.targets else 0.0)
            described = grounder.predict(image, "What is in this region?", boxes=[o["box_xyxy"]]).answer.split()
            named += o["colour"] in described and o["kind"] in described
        near = sorted({(c, k) for c, _ in pairs for _, k in pairs} - set(pairs))
        for c, kind in near[:2]:
            answer = grounder.predict(image, f"Can you find the {c} {kind} in this picture?")
            asked_absent += 1
            denied_absent += not answer.targets
    print(f"present denied {denied_present}/{asked}, mean IoU {np.mean(found):.3f}, absent denied "
          f"{denied_absent}/{asked_absent}, regions named {named}/{asked}")
    assert asked >= 20 and asked_absent >= 12
    assert denied_present / asked <= 0.1, f"denied {denied_present} of {asked} present objects"
    assert np.mean(found) > 0.7, f"mean mask IoU {np.mean(found):.3f} over {asked} present objects"
    assert denied_absent / asked_absent >= 0.4, f"denied {denied_absent} of {asked_absent} absent objects"
    assert named / asked >= 0.7, f"named {named} of {asked} boxed objects"


def test_the_example_questions_work_on_their_images(grounder):
    """Every question the web app offers beside an example image (examples/questions.json) names an object there
    (one asks about a shape the image lacks, and is denied)."""
    import json

    from grounding.images import load_image

    examples = DEFAULT_MODEL.parent.parent / "examples"
    absent = {"Can you find the purple triangle in this picture?"}
    for name, questions in json.loads((examples / "questions.json").read_text()).items():
        image = load_image(examples / name)
        for question in questions:
            answer = grounder.predict(image, question)
            if question in absent:
                assert not answer.targets and answer.answer.startswith("There is no"), (name, question, answer.answer)
            else:
                assert answer.targets and all(t.mask is not None and t.mask.any() for t in answer.targets), \
                    (name, question, answer.answer)


def test_all_shapes_of_a_colour_are_named_once_each(grounder):
    """"Please segment all red shapes." on a drawn scene with three red shapes and two others: one target per red
    shape, none twice, none on another colour (the language model alone names two; the region add-on's
    ``GroupCount`` reads the locator's next peak and goes on while it holds another red shape)."""
    import cv2

    image = np.full((320, 400, 3), 225, np.uint8)
    shapes = {"red circle": ((70, 80), (215, 35, 40)), "red square": ((320, 90), (215, 35, 40)),
              "red triangle": ((200, 250), (215, 35, 40)), "blue star": ((330, 250), (40, 80, 220)),
              "green circle": ((80, 250), (40, 160, 60))}
    masks = {}
    for name, ((x, y), colour) in shapes.items():
        m = np.zeros(image.shape[:2], np.uint8)
        if "circle" in name:
            cv2.circle(m, (x, y), 34, 1, -1)
        elif "square" in name:
            cv2.rectangle(m, (x - 32, y - 32), (x + 32, y + 32), 1, -1)
        elif "triangle" in name:
            cv2.fillPoly(m, [np.array([[x, y - 38], [x - 38, y + 30], [x + 38, y + 30]], np.int32)], 1)
        else:
            pts = [(x + r * np.cos(a), y + r * np.sin(a)) for i, a in enumerate(np.linspace(-np.pi / 2, 1.5 * np.pi, 11)[:10])
                   for r in [36 if i % 2 == 0 else 15]]
            cv2.fillPoly(m, [np.array(pts, np.int32)], 1)
        image[m.astype(bool)] = colour
        masks[name] = m.astype(bool)
    answer = grounder.predict(image, "Please segment all red shapes.")
    hits = [max(masks, key=lambda n: (t.mask & masks[n]).sum() / (t.mask | masks[n]).sum()) for t in answer.targets]
    ious = [(t.mask & masks[n]).sum() / (t.mask | masks[n]).sum() for t, n in zip(answer.targets, hits)]
    assert sorted(hits) == ["red circle", "red square", "red triangle"], (answer.answer, hits)
    assert min(ious) > 0.5, ious


def test_a_plural_names_each_of_its_objects(grounder):
    """"Please segment the green pentagons." about examples/pentagons.png (two green pentagons, one dotted, beside a
    red hexagon, a ring and a triangle): a target on each, as "all ..." gets (v13 named only the first)."""
    import cv2
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image

    image = load_image(EXAMPLES_DIR / "pentagons.png")
    r, g, b = (image[..., i].astype(int) for i in range(3))
    green = ((g > 100) & (g > r + 50) & (g > b + 50)).astype(np.uint8)
    green = cv2.morphologyEx(green, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))   # the dots inside one of them
    n, labels, stats, _ = cv2.connectedComponentsWithStats(green)
    pentagons = [labels == i for i in np.argsort(-stats[1:, cv2.CC_STAT_AREA])[:2] + 1]
    answer = grounder.predict(image, "Please segment the green pentagons.")
    assert len(answer.targets) == 2, answer.answer
    hits = [[(t.mask & p).sum() / (t.mask | p).sum() for p in pentagons] for t in answer.targets]
    assert sorted(int(np.argmax(h)) for h in hits) == [0, 1] and min(max(h) for h in hits) > 0.7, hits


def test_all_shapes_names_every_object(grounder):
    """"Please segment all shapes." about examples/shapes.png: one target on each of its four objects (v14.2 named
    the two the model wrote, whatever the count: a group of no colour or kind got none added)."""
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image
    from grounding.text.boxes import box_iou

    objects = [(92, 32, 188, 128), (170, 108, 249, 188), (200, 173, 287, 262), (332, 21, 390, 77)]
    answer = grounder.predict(load_image(EXAMPLES_DIR / "shapes.png"), "Please segment all shapes.")
    assert len(answer.targets) == 4, answer.answer
    found = sorted(max(range(4), key=lambda j: box_iou(t.box, objects[j])) for t in answer.targets)
    assert found == [0, 1, 2, 3] and all(max(box_iou(t.box, o) for o in objects) > 0.8 for t in answer.targets)
    assert all(t.mask is not None and t.mask.sum() > 1500 for t in answer.targets), answer.answer


@pytest.mark.parametrize("question", ["Segment everything.", "How many objects are there?", "Segment each shape."])
def test_everyday_words_for_every_object(grounder, question):
    """Words the training questions never used ("everything", "objects", "each") are read as the trained words
    they mean: all four objects of examples/shapes.png, a note saying how the question was read, and no note that
    the model reads English only (its answer names what the question asks about)."""
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image
    from grounding.text.boxes import box_iou

    objects = [(92, 32, 188, 128), (170, 108, 249, 188), (200, 173, 287, 262), (332, 21, 390, 77)]
    answer = grounder.predict(load_image(EXAMPLES_DIR / "shapes.png"), question)
    found = sorted(max(range(4), key=lambda j: box_iou(t.box, objects[j])) for t in answer.targets)
    assert found == [0, 1, 2, 3] and all(t.mask is not None for t in answer.targets), answer.answer
    assert any(n.startswith("read '") for n in answer.notes) and not any("English only" in n for n in answer.notes)


def test_all_shapes_goes_on_past_an_object_the_head_is_unsure_of(grounder):
    """examples/crosses.png: the region head reads its striped hexagon as some kind with probability 0.38 only, and
    "all shapes" stopped there (3 of its 6 objects). A candidate whose mask is one new object of a clear outline
    counts too: at least 5, each on its own object."""
    from apps.demo import EXAMPLES_DIR
    from grounding.text.boxes import box_iou

    objects = [(54, 67, 203, 212), (217, 256, 311, 357), (374, 209, 464, 300), (256, 104, 321, 170),
               (35, 240, 99, 306), (297, 101, 354, 156)]
    answer = grounder.predict(EXAMPLES_DIR / "crosses.png", "Please segment all shapes.")
    found = [max(range(len(objects)), key=lambda j: box_iou(t.box, objects[j])) for t in answer.targets]
    assert len(found) >= 5 and len(set(found)) == len(found), answer.answer
    assert all(box_iou(t.box, objects[j]) > 0.7 for t, j in zip(answer.targets, found)), answer.answer


def test_every_shape_of_a_drawn_scene_gets_its_own_target(grounder):
    """Six shapes drawn with OpenCV: "Please segment all shapes." and "Segment every shape." name each once, with a
    mask on it. Six targets need about 160 answer tokens (the answer was cut at 128 before, after the fourth)."""
    import cv2

    image = np.full((360, 480, 3), (200, 200, 190), np.uint8)
    cv2.circle(image, (70, 80), 40, (220, 40, 40), -1)
    cv2.rectangle(image, (180, 40), (270, 120), (40, 90, 220), -1)
    cv2.fillPoly(image, [np.array([[380, 30], [440, 130], [320, 130]])], (40, 160, 60))
    cv2.circle(image, (400, 270), 45, (235, 210, 40), -1)
    cv2.rectangle(image, (40, 200), (150, 310), (140, 60, 180), -1)
    cv2.fillPoly(image, [np.array([[240, 190], [300, 250], [240, 310], [180, 250]])], (240, 140, 40))
    _, labels = cv2.connectedComponents((np.abs(image.astype(int) - (200, 200, 190)).sum(-1) > 30).astype(np.uint8))
    shapes = [labels == i for i in range(1, labels.max() + 1)]
    assert len(shapes) == 6
    for question in ("Please segment all shapes.", "Segment every shape."):
        answer = grounder.predict(image, question)
        assert len(answer.targets) == 6, (question, answer.answer)
        found = [max(range(6), key=lambda j: (t.mask & shapes[j]).sum() / (t.mask | shapes[j]).sum())
                 for t in answer.targets]
        assert sorted(found) == list(range(6)), (question, found)
        assert all((t.mask & shapes[j]).sum() / (t.mask | shapes[j]).sum() > 0.8 for t, j in zip(answer.targets, found))


def test_a_plural_phrase_is_copied_whole_and_a_group_keeps_only_its_objects(grounder):
    """"the yellow circles" is copied whole (it was cut to "the yellow", the last word the model had seen end a
    phrase) and boxes the yellow circle of examples/shapes.png; the model's second "all the triangles" on
    examples/crosses.png (one triangle, beside crosses) is dropped, and absent groups are denied in the plural."""
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image

    shapes, crosses = (load_image(EXAMPLES_DIR / f"{n}.png") for n in ("shapes", "crosses"))
    circles = grounder.predict(shapes, "Please segment the yellow circles.")
    assert [t.phrase for t in circles.targets] == ["the yellow circles"], circles.answer
    x1, y1, x2, y2 = circles.targets[0].box
    assert abs(x1 - 170) < 8 and abs(y1 - 108) < 8 and abs(x2 - 249) < 8 and abs(y2 - 188) < 8, circles.targets[0].box
    triangles = grounder.predict(crosses, "Please segment all the triangles.")
    assert len(triangles.targets) == 1 and triangles.targets[0].box[0] > 200, triangles.answer   # the blue one
    stars = grounder.predict(shapes, "Please segment all the purple stars.")
    assert not stars.targets and stars.answer == "There are no purple stars in the image.", stars.answer


@pytest.mark.parametrize("question", ["请分割黄色的圆", "Où est le cercle jaune ?", "Dónde está el círculo amarillo?"])
def test_a_question_in_another_language_is_answered_in_words_that_name_what_is_boxed(grounder, question):
    """With no English word to copy, each target is named by the region head's reading of its box (once per
    object), never by the byte pieces of another script ("<ref>\ufffd</ref>") nor a word the question never asked
    ("est"); no such name is denied, and the note says that the model reads English only."""
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image
    from grounding.text.boxes import box_iou

    image = load_image(EXAMPLES_DIR / "shapes.png")
    answer = grounder.predict(image, question)
    assert "\ufffd" not in answer.answer and any("English only" in n for n in answer.notes), answer
    assert answer.targets and "There is no" not in answer.answer, answer.answer   # nothing denied it never asked
    region = grounder.model.addons["region"]
    for i, t in enumerate(answer.targets):
        prepared = grounder.prepare([image])[0]
        assert t.phrase == region.describe(grounder.model, prepared, box=t.box), answer.answer
        assert all(box_iou(t.box, u.box) <= 0.2 for u in answer.targets[:i]), answer.answer
        assert f"<ref>{t.phrase}</ref>" in answer.answer


@pytest.mark.parametrize("question", ["What is in the image?", "Describe the image.", "Segment the dog."])
def test_a_question_about_the_picture_names_an_object_in_it(grounder, question):
    """The picture itself is not what a phrase is about (it was "There is no image in the image."), nor is a word
    the model never read ("dog"; it was `<ref>segment</ref>`): the model boxes an object of its choice, named by the
    region head's reading of its box, and a note says so, naming the words it never read."""
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image

    image = load_image(EXAMPLES_DIR / "shapes.png")
    answer = grounder.predict(image, question)
    assert answer.targets and "There is no" not in answer.answer, answer.answer
    prepared = grounder.prepare([image])[0]
    for t in answer.targets:
        assert t.phrase == grounder.model.addons["region"].describe(grounder.model, prepared, box=t.box, mask=t.mask)
    [note] = [n for n in answer.notes if "named by the region head" in n]
    assert ("'dog'" in note) == ("dog" in question), note


@pytest.mark.parametrize("how", ["box", "click"])
def test_a_marked_object_is_named_by_the_kind_its_outline_has(grounder, how):
    """"What is in this region?" with a box, and "What is this?" with a click, on each object of
    examples/shapes.png: its kind is right (the region head alone read the outlined yellow circle as a hexagon)."""
    from apps.demo import EXAMPLES_DIR

    objects = {"square": [(92, 32, 188, 128), (200, 173, 287, 262), (332, 21, 390, 77)],
               "circle": [(170, 108, 249, 188)]}
    for kind, boxes in objects.items():
        for box in boxes:
            if how == "box":
                answer = grounder.predict(EXAMPLES_DIR / "shapes.png", "What is in this region?", boxes=[list(box)])
            else:
                centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
                answer = grounder.predict(EXAMPLES_DIR / "shapes.png", "What is this?", points=[centre],
                                          point_labels=[1])
            assert answer.answer.split()[-1] == kind, (box, answer.answer)


def test_a_grayscale_scan_gets_whole_masks(grounder, unseen):
    """The unseen scenes as 16-bit grayscale PNGs (read by groundseg's loader): a box around an object gives its
    mask, and "Please segment the {kind}." about a kind the scene holds once finds it. Every training scene is in
    colour. Here v14 gives box-prompt IoU 0.858 and kind IoU 0.720 (v13: 0.858, 0.663; v12.2, before SAM's encoder
    learnt grey views: 0.840, 0.654; the same scenes in colour: 0.907 box-prompt IoU)."""
    import io
    import json

    from PIL import Image

    from grounding.images import load_image

    ds, _ = unseen
    scenes = json.loads((ds.data_root / "scenes.json").read_text())["images"]
    box_ious, found = [], []
    for scene in scenes:
        colour = load_image(ds.image_path(scene["image_id"])).astype(np.float64)
        buf = io.BytesIO()
        Image.fromarray(np.round(colour @ [0.299, 0.587, 0.114] * 257).astype(np.uint16)).save(buf, format="PNG")
        image = load_image(buf.getvalue())
        objects = [o for o in scene["objects"] if o["area"] >= 0.7 * o["full_area"]]
        kinds = [o["kind"] for o in scene["objects"]]
        for o in objects:
            gt = ds.mask(o["ann_id"])
            mask = grounder.segment(image, boxes=[o["box_xyxy"]]).targets[0].mask
            box_ious.append((mask & gt).sum() / (mask | gt).sum())
            if kinds.count(o["kind"]) == 1:
                answer = grounder.predict(image, f"Please segment the {o['kind']}.")
                found.append((answer.targets[0].mask & gt).sum() / (answer.targets[0].mask | gt).sum()
                             if answer.targets else 0.0)
    print(f"grey: box-prompt IoU {np.mean(box_ious):.3f} ({len(box_ious)}), kind IoU {np.mean(found):.3f} "
          f"({len(found)})")
    assert len(box_ious) >= 30 and len(found) >= 15
    assert np.mean(box_ious) > 0.78, f"box-prompt mean IoU {np.mean(box_ious):.3f}"
    assert np.mean(found) > 0.55, f"kind mean IoU {np.mean(found):.3f}"


def test_each_mask_lies_in_its_own_box(grounder):
    """"Where are the yellow shapes?" is answered with repeats of one phrase: the k-th repeat's mask is the k-th
    object's, the one its box text names (the mask of a repeat once counted only earlier [SEG]s, so each mask lay
    on the object of the box before it)."""
    import cv2

    from grounding.text.boxes import box_iou

    image = np.full((360, 480, 3), (60, 70, 90), np.uint8)
    cv2.circle(image, (80, 90), 40, (230, 200, 40), -1)
    cv2.circle(image, (380, 260), 35, (40, 120, 220), -1)
    cv2.circle(image, (250, 280), 30, (230, 200, 40), -1)
    cv2.rectangle(image, (200, 40), (290, 130), (220, 50, 50), -1)
    cv2.rectangle(image, (360, 60), (430, 130), (230, 200, 40), -1)
    answer = grounder.predict(image, "Where are the yellow shapes?")
    assert len(answer.targets) == 3 and all(t.mask is not None and t.mask.any() for t in answer.targets), answer.answer
    for t in answer.targets:
        ys, xs = np.nonzero(t.mask)
        assert box_iou([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], t.box) > 0.8, (answer.answer, t.box)


def test_a_box_gets_its_mask_unless_the_question_asks_for_a_box(grounder):
    """"How many squares are there?" about examples/shapes.png (three squares and a circle): the model answers with
    boxes, as it learnt to for "Answer with a box.", and each box is now followed by its [SEG]: three masks, each on
    its own square, named "squares" (the phrase's first token carries a space, "<ref> squares</ref>" before).
    "Answer with a box." still gets a box and no mask."""
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image
    from grounding.text.boxes import box_iou

    image = load_image(EXAMPLES_DIR / "shapes.png")
    squares = grounder.predict(image, "How many squares are there?")
    assert [t.phrase for t in squares.targets] == ["squares"] * 3 and "<ref> " not in squares.answer, squares.answer
    assert squares.answer.startswith("There are 3 squares: <ref>squares</ref>"), squares.answer   # the count add-on
    boxes = []
    for t in squares.targets:
        ys, xs = np.nonzero(t.mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert box_iou(boxes[-1], t.box) > 0.8, (squares.answer, t.box)
    assert max(box_iou(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]) < 0.1, boxes
    boxed = grounder.predict(image, "Where is the cyan square? Answer with a box.")
    assert len(boxed.targets) == 1 and boxed.targets[0].mask is None and "[SEG]" not in boxed.answer, boxed.answer
    x1, y1, x2, y2 = boxed.targets[0].box
    assert abs(x1 - 92) < 8 and abs(y1 - 32) < 8 and abs(x2 - 188) < 8 and abs(y2 - 128) < 8, boxed.targets[0].box


def test_a_loose_box_takes_its_masks_tight_box_where_the_mask_is_the_boxed_object(grounder):
    """An answer's box can be loose about a right mask (a thin rectangle boxed as a square: box IoU 0.37 with the
    object on the phrasing suite). Where the mask its box gets is the target's own mask, the box and its text become
    the mask's tight box; a mask of a part of the object (the whole object comes from the box) keeps its box."""
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image
    from grounding.result import Prediction, box_from_mask
    from grounding.text.boxes import box_iou, format_box

    image = load_image(EXAMPLES_DIR / "crosses.png")
    hexagon = grounder.predict(image, "Please segment the hexagon.").targets[0]
    tight = box_from_mask(hexagon.mask)
    region, prepared = grounder.model.addons["region"], grounder.prepare([image])[0]
    x1, y1, x2, y2 = tight
    loose = (x1 - 0.25 * (x2 - x1), y1 - 0.25 * (y2 - y1), x2 + 0.25 * (x2 - x1), y2 + 0.25 * (y2 - y1))
    assert box_iou(loose, tight) < 0.5 and loose[0] > 0 and loose[1] > 0

    def verified(box, mask):
        target = dataclasses.replace(hexagon, box=box, mask=mask)
        answer = f"<ref>{hexagon.phrase}</ref>{format_box(box, image.shape[:2])}[SEG]"
        return region.verify(grounder.model, grounder.processor.tokenizer, prepared,
                             Prediction(answer, [target], image.shape[:2]))

    fixed = verified(loose, hexagon.mask)
    assert len(fixed.targets) == 1 and box_iou(fixed.targets[0].box, tight) > 0.99, fixed.targets[0].box
    assert fixed.answer == f"<ref>{hexagon.phrase}</ref>{format_box(tight, image.shape[:2])}[SEG]", fixed.answer
    assert (fixed.targets[0].mask == hexagon.mask).all() and "tight box" in fixed.notes[-1], fixed.notes
    corner = hexagon.mask.copy()
    corner[round((y1 + y2) / 2):] = False
    corner[:, round((x1 + x2) / 2):] = False
    kept = verified(tight, corner)
    assert kept.targets[0].box == tuple(tight) and not kept.notes, (kept.targets[0].box, kept.notes)


def test_a_groups_repeat_whose_mask_holds_much_of_an_earlier_object_is_dropped(grounder):
    """A repeat of "all crosses" whose mask is half of the first cross and all of another (a box between two objects
    gets a mask of both) names no new object: it is dropped with a note, though far less than half of its mask lies
    on the earlier target's. The other cross alone stays."""
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image
    from grounding.result import Prediction, box_from_mask
    from grounding.text.boxes import format_box

    image = load_image(EXAMPLES_DIR / "crosses.png")
    crosses = grounder.predict(image, "Please segment all crosses.").targets
    assert len(crosses) >= 2
    other, first = sorted(crosses[:2], key=lambda t: -t.mask.sum())   # the smaller cross first
    half = first.mask.copy()
    x1, _, x2, _ = box_from_mask(first.mask)
    half[:, : round((x1 + x2) / 2)] = False
    region, prepared = grounder.model.addons["region"], grounder.prepare([image])[0]

    def verified(mask):
        second = dataclasses.replace(other, mask=mask, box=box_from_mask(mask))
        answer = " ".join(f"<ref>{t.phrase}</ref>{format_box(t.box, image.shape[:2])}[SEG]" for t in (first, second))
        return region.verify(grounder.model, grounder.processor.tokenizer, prepared,
                             Prediction(answer, [first, second], image.shape[:2]))

    merged = half | other.mask
    assert (merged & first.mask).sum() < 0.5 * merged.sum()
    dropped = verified(merged)
    assert len(dropped.targets) == 1 and "holds" in dropped.notes[-1], dropped.notes
    kept = verified(other.mask)
    assert len(kept.targets) == 2 and not kept.notes, kept.notes


def test_a_half_hidden_cross_is_found_by_its_silhouette(grounder):
    """On examples/crosses.png the white cross is half hidden behind the hexagon: its mask's outline reads as a
    star's (or no kind), but the silhouette network is sure it is a cross, so "the white cross" is answered on it
    and "all crosses" names all three crosses."""
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image

    image = load_image(EXAMPLES_DIR / "crosses.png")
    white = grounder.predict(image, "the white cross")
    assert len(white.targets) == 1, white.answer
    x1, y1, x2, y2 = white.targets[0].box
    assert 300 < (x1 + x2) / 2 < 360 and 95 < (y1 + y2) / 2 < 165, white.targets[0].box   # right of the hexagon
    crosses = grounder.predict(image, "Please segment all crosses.").targets
    centres = sorted(((t.box[0] + t.box[2]) / 2, (t.box[1] + t.box[3]) / 2) for t in crosses)
    assert len(crosses) == 3 and centres[0][0] < 100 and 300 < centres[1][0] < 360 and centres[2][0] > 370, centres


def test_a_target_whose_outline_has_another_kind_moves_to_that_kind_or_is_dropped(grounder):
    """The region head misreads kinds on scenes unlike its training (grey ones: "the hexagon" boxed on a pentagon
    passed its check). A plain target whose mask's outline clearly has another kind than its phrase names moves to
    the locator's candidate of that kind, box text and mask together, or is dropped when there is none. Here the
    answers are made wrong on purpose, on examples/crosses.png (a purple square, a blue hexagon, three crosses and a
    triangle): "the hexagon" on the brown cross, "the circle" on the purple square."""
    from apps.demo import EXAMPLES_DIR
    from grounding.images import load_image
    from grounding.result import Prediction
    from grounding.text.boxes import format_box

    image = load_image(EXAMPLES_DIR / "crosses.png")
    hexagon = grounder.predict(image, "Please segment the hexagon.").targets[0]
    cross = grounder.predict(image, "Where is the brown cross?").targets[0]
    square = grounder.segment(image, boxes=[[57, 68, 196, 206]]).targets[0]
    region, prepared = grounder.model.addons["region"], grounder.prepare([image])[0]

    def verified(phrase, target):
        wrong = Prediction(f"<ref>{phrase}</ref>{format_box(target.box, image.shape[:2])}[SEG]",
                           [dataclasses.replace(target, phrase=phrase)], image.shape[:2])
        return region.verify(grounder.model, grounder.processor.tokenizer, prepared, wrong)

    moved = verified("the hexagon", cross)
    assert len(moved.targets) == 1 and "moved" in " ".join(moved.notes), moved.notes
    iou = (moved.targets[0].mask & hexagon.mask).sum() / (moved.targets[0].mask | hexagon.mask).sum()
    assert iou > 0.8, iou
    assert moved.answer == f"<ref>the hexagon</ref>{format_box(moved.targets[0].box, image.shape[:2])}[SEG]"
    assert format_box(moved.targets[0].box, image.shape[:2]) != format_box(cross.box, image.shape[:2])
    dropped = verified("the circle", square)
    assert not dropped.targets and dropped.answer == "There is no circle in the image.", dropped.answer
    assert "outline is a square's" in dropped.notes[-1], dropped.notes


def test_shapes_drawn_by_another_hand_are_found_by_their_outline(grounder):
    """A picture drawn with PIL's ImageDraw in CSS colours, poses the training scenes never had: a rectangle
    standing up and a diamond lying on its side. The region and presence heads misread such kinds (v17.1 denied
    both); where the mask's outline clearly has the named kind, the kind is taken from it and the head reads the
    colour alone. Shapes that are not there are still denied."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (560, 420), "white")
    pen = ImageDraw.Draw(picture)
    pen.polygon([(90, 60), (150, 60), (150, 200), (90, 200)], fill="yellow")
    pen.ellipse([300, 60, 390, 150], fill="blue")
    pen.polygon([(430, 250), (500, 300), (430, 350), (360, 300)], fill="green")
    pen.regular_polygon((180, 320, 55), 5, rotation=20, fill="red")
    image = np.asarray(picture).copy()
    for question, colour in (("Where is the yellow rectangle?", (255, 255, 0)), ("the diamond", (0, 128, 0)),
                             ("Please segment the green diamond.", (0, 128, 0)), ("the red pentagon", (255, 0, 0))):
        answer = grounder.predict(image, question)
        assert len(answer.targets) == 1, (question, answer.answer, answer.notes)
        truth, mask = (image == colour).all(-1), answer.targets[0].mask
        assert (mask & truth).sum() / (mask | truth).sum() > 0.9, question
    for question in ("the yellow square", "Where is the red star?", "the orange diamond", "the blue pentagon"):
        assert not grounder.predict(image, question).targets, question
