"""Grounder end to end on tiny models: generation, [SEG] alignment, the click path, caching, bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from grounding.errors import ImageError, PromptError, QuestionError
from tests.conftest import ANSWER, QUESTION


@pytest.fixture(scope="module")
def grounder(tiny):
    from grounding import Grounder
    model, tok = tiny
    return Grounder(model, tok, max_new_tokens=12)


@pytest.fixture(scope="module")
def trained(overfit):
    from grounding import Grounder
    return Grounder(overfit["model"], overfit["tokenizer"], max_new_tokens=16)


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_trained_model_generates_its_answer_and_a_mask_on_the_object(trained, overfit):
    pred = trained.predict(overfit["image"], QUESTION)
    assert pred.answer.replace(" ", "") == ANSWER.replace(" ", "")
    assert len(pred.targets) == 1
    t = pred.targets[0]
    assert t.phrase.strip() == "the red circle" and t.seg_index == 0
    assert t.mask.shape == overfit["image"].shape[:2] and t.mask.dtype == bool
    assert iou(t.mask, overfit["mask"]) > 0.6
    assert t.box is not None


def test_random_model_runs_end_to_end(grounder, scene):
    image, _ = scene
    pred = grounder.predict(image, QUESTION)
    assert isinstance(pred.answer, str)
    for t in pred.targets:
        assert t.mask is None or t.mask.shape == image.shape[:2]
    assert pred.targets or pred.notes


def test_every_seg_yields_a_mask_aligned_with_its_phrase(grounder, scene):
    image, _ = scene
    answer = ("<ref>the red circle</ref><box>(100,200),(400,700)</box>[SEG] is left of "
              "<ref>the blue square</ref>[SEG] and [SEG]")
    pred = grounder.predict(image, QUESTION, answer=answer)
    assert [t.phrase for t in pred.targets] == ["the red circle", "the blue square", None]
    assert [t.seg_index for t in pred.targets] == [0, 1, 2]
    assert all(t.mask.shape == image.shape[:2] for t in pred.targets)
    h, w = image.shape[:2]
    assert pred.targets[0].box == pytest.approx((100 / 999 * w, 200 / 999 * h, 400 / 999 * w, 700 / 999 * h))


@pytest.mark.parametrize("answer,reason", [
    ("There is no red circle here.", "no [SEG]"),
    ("<ref>the red circle</ref><box>(12,ab),(3", "no [SEG]"),
    ("<ref>x</ref><box></box><box>((((,,,</box>", "no [SEG]"),
])
def test_malformed_answers_give_empty_targets_with_a_reason(grounder, scene, answer, reason):
    pred = grounder.predict(scene[0], QUESTION, answer=answer)
    assert pred.targets == []
    assert any(reason in n for n in pred.notes)


def test_box_only_answer_gives_a_box_target_without_mask(grounder, scene):
    pred = grounder.predict(scene[0], QUESTION, answer="<ref>the circle</ref><box>(0,0),(999,999)</box>")
    assert len(pred.targets) == 1 and pred.targets[0].mask is None
    h, w = scene[0].shape[:2]
    assert pred.targets[0].box == pytest.approx((0, 0, w, h))


def test_image_embedding_is_computed_once_per_image(tiny, scene, tmp_path):
    from PIL import Image
    from grounding import Grounder
    model, tok = tiny
    g = Grounder(model, tok, max_new_tokens=4)
    image = scene[0]
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    g.predict(image, "first question")
    g.predict(path, "second question about the same pixels")
    g.segment(image, points=[[28, 40]])
    g.segment(path, boxes=[[10, 20, 50, 60]])
    assert g.encoder_calls == 1
    g.predict(image[:, ::-1].copy(), "another image")
    assert g.encoder_calls == 2
    g.predict_batch([(image, "a"), (image, "b"), (image[::-1].copy(), "c")])
    assert g.encoder_calls == 3


def test_predict_batch_equals_one_by_one(grounder, scene):
    image, _ = scene
    other = np.ascontiguousarray(np.rot90(image))
    queries = [(image, QUESTION), (other, "what is this shape?"), (image, "describe the scene in detail please")]
    batched = grounder.predict_batch(queries, batch_size=3)
    for q, b in zip(queries, batched):
        single = grounder.predict(*q)
        assert single.answer == b.answer
        assert len(single.targets) == len(b.targets)
        for s, t in zip(single.targets, b.targets):
            assert (s.mask is None) == (t.mask is None)
            if s.mask is not None:
                assert iou(s.mask, t.mask) > 0.99 or (s.mask.sum() == t.mask.sum() == 0)


def test_click_and_box_path(grounder, scene):
    image, _ = scene
    h, w = image.shape[:2]
    one = grounder.segment(image, points=[[28, 40]])
    assert len(one.targets) == 1 and one.targets[0].mask.shape == (h, w)
    boxes = grounder.segment(image, boxes=[[5, 5, 50, 60], [55, 8, 90, 40]])
    assert len(boxes.targets) == 2
    mixed = grounder.segment(image, points=[[28, 40], [80, 20]], point_labels=[1, 0], boxes=[[5, 5, 50, 60]])
    assert len(mixed.targets) == 1


def test_mask_threshold_moves_the_mask_boundary(overfit):
    """A higher logit threshold keeps a subset of the pixels (the decoder's logits are thresholded once)."""
    from grounding import Grounder

    g = Grounder(overfit["model"], overfit["tokenizer"])
    image = overfit["image"]
    areas = []
    for threshold in (-4.0, 0.0, 4.0):
        g.mask_threshold = threshold
        areas.append(g.predict(image, "Where is the red circle?").targets[0].mask)
    loose, default, tight = areas
    assert (tight <= default).all() and (default <= loose).all()
    assert loose.sum() > default.sum() > tight.sum()


@pytest.mark.parametrize("kwargs,match", [
    (dict(points=[[500, 10]]), "outside"),
    (dict(points=[[1, 2, 3]]), "pairs"),
    (dict(points=[[1, 2]], point_labels=[3]), "labels"),
    (dict(boxes=[[10, 10, 5, 50]]), "x2 > x1"),
    (dict(), "at least one"),
])
def test_bad_prompts_are_clear_errors(grounder, scene, kwargs, match):
    with pytest.raises(PromptError, match=match):
        grounder.segment(scene[0], **kwargs)


def test_questions_empty_long_and_non_english(grounder, scene):
    image = scene[0]
    for empty in ("", "   ", "[SEG]", "<image>"):
        with pytest.raises(QuestionError, match="empty"):
            grounder.predict(image, empty)
    with pytest.raises(QuestionError, match="too long"):
        grounder.predict(image, "where is the red circle " * 210)  # 5,040 characters
    for q in ("红色的圆在哪里？", "أين الدائرة الحمراء؟", "¿Dónde está el círculo? 🔴"):
        pred = grounder.predict(image, q)
        assert pred.question == q


def test_a_long_question_gets_the_room_left_for_its_answer(tiny, scene):
    """max_new_tokens is a ceiling: a question that leaves less room in the model's context is answered in that
    room (both engines), and only one leaving too little for one target is an error."""
    from grounding import Grounder, PrefixEngine, Query
    from grounding.inference.steps import MIN_ANSWER_TOKENS

    model, tok = tiny
    g = Grounder(model, tok, max_new_tokens=model.config.max_length)   # never all of it: the image takes some
    image = scene[0]
    prompt = g.steps.encode_question(Query(image, "where is it"), g.prepare([image])[0], g.max_new_tokens)
    room = model.config.max_length - len(prompt.input_ids)
    assert 0 < room < g.max_new_tokens and g.steps.answer_budget([prompt], g.max_new_tokens) == room
    answer = g.predict(image, "where is it")   # was "too long": the room is under max_new_tokens
    assert answer.answer
    assert PrefixEngine(g).predict_group(image, [Query(image, "where is it")])[0].answer == answer.answer
    words = (room - MIN_ANSWER_TOKENS) // len(tok(" it", add_special_tokens=False)["input_ids"]) + 4
    with pytest.raises(QuestionError, match="too long"):
        g.predict(image, "where is it" + " it" * words)


def test_clicks_go_into_the_question_as_text(grounder, scene):
    from grounding.text.prompts import build_prompt, visual_prompt_text
    image = scene[0]
    h, w = image.shape[:2]
    text = visual_prompt_text((h, w), points=[[48, 36]], point_labels=[1], boxes=[[0, 0, w, h]])
    assert text == "<point>(500,500)</point> <box>(0,0),(999,999)</box>"
    assert build_prompt("what is this?", text).endswith("what is this? " + text + " ASSISTANT:")
    pred = grounder.predict(image, "what is this?", points=[[48, 36]])
    assert isinstance(pred.answer, str)


@pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_bad_image_files_are_clear_errors(grounder, tmp_path, payload):
    path = tmp_path / "bad.png"
    path.write_bytes(payload)
    with pytest.raises(ImageError, match="bad.png"):
        grounder.predict(path, QUESTION)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 1), (300, 7, 4)])
def test_odd_image_shapes_work(grounder, shape):
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    pred = grounder.predict(image, QUESTION, answer="[SEG]")
    assert pred.targets[0].mask.shape == shape[:2]


def test_sam2_backend_end_to_end(scene, tmp_path):
    """The same model with a SAM2 mask decoder: [SEG] masks and clicks at the image's size, saved and reloaded."""
    from grounding import Grounder
    from grounding.presets import init_tiny
    g = Grounder.from_pretrained(init_tiny(tmp_path / "sam2", backend="sam2"), device="cpu", max_new_tokens=6)
    image = scene[0]
    pred = g.predict(image, QUESTION, answer="<ref>a</ref>[SEG] <ref>b</ref>[SEG]")
    assert [t.mask.shape for t in pred.targets] == [image.shape[:2]] * 2
    assert g.segment(image, points=[[28, 40]]).targets[0].mask.shape == image.shape[:2]
    assert g.model.mask_decoder.backend_name == "sam2"


def test_a_click_keeps_only_the_mask_parts_it_names():
    """A click's mask that spilt onto a second, separate shape keeps the clicked part; a click off the mask, or a
    background click, leaves it alone; two positive clicks on two parts keep both."""
    from segdecoder.masks import clicked_parts

    mask = np.zeros((60, 80), bool)
    mask[5:25, 5:25] = True       # the clicked square
    mask[40:55, 60:75] = True     # a spill onto another shape
    one = clicked_parts(mask, np.array([[10.5, 12.0]]), np.array([1]))
    assert one[5:25, 5:25].all() and not one[40:55, 60:75].any()
    assert np.array_equal(clicked_parts(mask, np.array([[40.0, 30.0]]), np.array([1])), mask)   # off the mask
    assert np.array_equal(clicked_parts(mask, np.array([[62.0, 45.0]]), np.array([0])), mask)   # background click
    both = clicked_parts(mask, np.array([[10.0, 10.0], [79.9, 59.9], [62.0, 45.0]]), np.array([1, 1, 1]))
    assert np.array_equal(both, mask)


def test_click_tuning_runs_only_for_checkpoints_that_ask_for_it(tiny, scene):
    """``clicked_parts`` is an add-on: a checkpoint without it keeps every part of a click's mask (an occluded
    object can be in pieces); turned on, a click's mask keeps the parts under its positive clicks."""
    from grounding import Grounder
    from grounding.addons import MaskContext
    from segdecoder import MaskPrediction

    model, tok = tiny
    assert Grounder(model, tok).steps.mask_steps == []
    steps = Grounder(model, tok, addons={"clicked_parts": True}).steps.mask_steps
    assert [s.name for s in steps] == ["clicked_parts"]
    mask = np.zeros((1, 60, 80), bool)
    mask[0, 5:25, 5:25] = mask[0, 40:55, 60:75] = True
    pred = MaskPrediction(mask, np.ones(1, np.float32), torch.zeros(1, 4, 4))
    ctx = lambda source, boxes=None: MaskContext(None, None, None, {"points": torch.tensor([[[10.0, 10.0]]]),
                                                 "point_labels": torch.tensor([[1]]), "boxes": boxes}, source, {})
    assert steps[0].refine(pred, ctx("prompt")).masks.sum() == 400
    assert steps[0].refine(pred, ctx("answer")).masks.sum() == 625          # answers' masks are not touched
    assert steps[0].refine(pred, ctx("prompt", torch.ones(1, 4))).masks.sum() == 625   # nor box prompts


def test_the_grouped_engine_gives_the_naive_masks_with_the_default_models_mask_steps():
    """The shipped model with its mask steps (zoom: one crop per object, prompts sharing it decoded together;
    GrabCut on a thread pool): the grouped engine (each image's [SEG]s post-processed in one call) writes the same
    answers and masks as one question at a time, and the steps did change masks."""
    from pathlib import Path

    import cv2

    from grounding import Grounder, PrefixEngine, Query
    from shapes.scenes.synthetic import compose_scene

    scene = compose_scene(np.random.default_rng(7), 300, 400)
    images = [cv2.imdecode(np.frombuffer(scene.png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].copy()]
    asks = ["the circle", "the square", "the circle", "the largest shape", "the triangle"]
    queries = [[Query(im, f"Please segment {a}.", answer="[SEG].") for a in asks] for im in images]
    model = Path(__file__).resolve().parent.parent / "weights" / "shapes-tiny"
    g = Grounder.from_pretrained(model, device="cpu")
    grouped = [p for per_image in PrefixEngine(g).predict_groups([(q[0].image, q) for q in queries])
               for p in per_image]
    naive = []
    for q in (q for per_image in queries for q in per_image):
        g.clear_cache()
        naive += g.predict_batch([q], batch_size=1)
    assert g.zoom_crops > 0
    plain = Grounder.from_pretrained(model, device="cpu", addons={"mask_refine": None, "mask_zoom": None})
    unrefined = [p for per_image in PrefixEngine(plain).predict_groups([(q[0].image, q) for q in queries])
                 for p in per_image]
    changed = 0
    for a, b, c in zip(naive, grouped, unrefined):
        assert a.answer == b.answer and len(a.targets) == len(b.targets) == 1
        assert np.array_equal(a.targets[0].mask, b.targets[0].mask)
        changed += not np.array_equal(b.targets[0].mask, c.targets[0].mask)
    assert changed >= len(grouped) // 2


def test_the_masks_of_a_batch_decoded_beside_the_next_batch_are_the_same():
    """``overlap``: a batch's masks are decoded (with the mask steps) on a worker thread while the next batch is
    answered. Over several batches, an image's questions split between two of them, answers and masks equal those
    of the same engine on one thread and of one question at a time."""
    from pathlib import Path

    import cv2

    from grounding import Grounder, PrefixEngine, Query
    from shapes.scenes.synthetic import compose_scene

    images = []
    for seed in (7, 8):
        scene = compose_scene(np.random.default_rng(seed), 260, 340)
        images.append(cv2.imdecode(np.frombuffer(scene.png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].copy())
    asks = ["the circle", "the largest shape", "the triangle", "the shape on the left", "the square"]
    groups = [(im, [Query(im, f"Please segment {a}.", answer="[SEG].") for a in asks]) for im in images]
    g = Grounder.from_pretrained(Path(__file__).resolve().parent.parent / "weights" / "shapes-tiny", device="cpu")
    runs = []
    for overlap in (True, False):
        g.clear_cache()
        runs.append([p for per_image in PrefixEngine(g, overlap=overlap).predict_groups(groups, batch_size=3)
                     for p in per_image])
    naive = []
    for q in (q for _, qs in groups for q in qs):
        g.clear_cache()
        naive += g.predict_batch([q], batch_size=1)
    for a, b, c in zip(*runs, naive):
        assert a.answer == b.answer == c.answer and len(a.targets) == len(b.targets) == len(c.targets) == 1
        assert np.array_equal(a.targets[0].mask, b.targets[0].mask)
        assert np.array_equal(a.targets[0].mask, c.targets[0].mask)
