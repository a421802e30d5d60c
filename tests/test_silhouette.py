"""The silhouette add-on (shapes/silhouette_kind.py): a small network reads a mask's kind from its silhouette, and a
plain target whose mask it does not read as the named kind is moved or dropped."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

KINDS = ["circle", "square", "triangle"]


def _drawn(kind: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A bool mask of one shape of ``kind`` at a random place, size and turn."""
    m = np.zeros((size, size), np.uint8)
    c, r = rng.uniform(0.35, 0.65, 2) * size, rng.uniform(0.15, 0.3) * size
    if kind == "circle":
        cv2.circle(m, (int(c[0]), int(c[1])), int(r), 1, -1)
    else:
        corners = 4 if kind == "square" else 3
        turn = rng.uniform(0, 2 * np.pi)
        angles = turn + 2 * np.pi * np.arange(corners) / corners
        cv2.fillPoly(m, [np.round(c + r * np.stack([np.cos(angles), np.sin(angles)], 1)).astype(np.int32)], 1)
    return m.astype(bool)


def test_silhouette_keeps_the_aspect_and_centres_the_mask():
    from shapes.silhouette_kind import FILL, SIDE, silhouette

    assert silhouette(np.zeros((20, 30), bool)) is None
    mask = np.zeros((300, 400), bool)
    mask[100:140, 50:130] = True            # 80 x 40: twice as wide as tall
    s = silhouette(mask)
    assert s.shape == (SIDE, SIDE) and s.dtype == np.float32
    cols, rows = np.flatnonzero(s.max(0) > 0.5), np.flatnonzero(s.max(1) > 0.5)
    assert len(cols) == pytest.approx(FILL * SIDE, abs=1) and len(rows) == pytest.approx(FILL * SIDE / 2, abs=1)
    assert abs((cols[0] + cols[-1]) / 2 - (SIDE - 1) / 2) <= 1 and abs((rows[0] + rows[-1]) / 2 - (SIDE - 1) / 2) <= 1


def test_roughened_masks_stay_tight_and_near_the_original():
    from shapes.silhouette_kind import roughened

    rng = np.random.default_rng(0)
    crop = np.ones((50, 70), bool)
    for _ in range(30):
        r = roughened(crop, rng)
        assert r.ndim == 2 and (r > 0.5).any(0).all() and (r > 0.5).any(1).all()   # cut to its tight box
        assert 0.5 * 50 * 70 <= (r > 0.5).sum() <= 1.6 * 50 * 70


def test_a_short_training_tells_drawn_kinds_apart():
    """Trained on roughened masks of circles, squares and triangles, the network names the kind of new, clean ones."""
    from shapes.silhouette_kind import kind_probabilities, train_silhouette

    rng = np.random.default_rng(1)
    labels = np.arange(300) % 3
    crops = []
    for k in labels:
        m = _drawn(KINDS[k], rng)
        x, y, w, h = cv2.boundingRect(m.view(np.uint8))
        crops.append(m[y:y + h, x:x + w])
    torch.set_num_threads(1)
    net, report = train_silhouette(crops, labels, len(KINDS), steps=120, batch=64, lr=3e-3, progress=False)
    test = np.arange(60) % 3
    p = kind_probabilities(net, [_drawn(KINDS[k], rng, size=200) for k in test])
    assert p.shape == (60, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert (p.argmax(1) == test).mean() >= 0.9
    assert kind_probabilities(net, [np.zeros((9, 9), bool)]).sum() == 0   # an empty mask reads as nothing


DEFAULT_MODEL = __import__("pathlib").Path(__file__).resolve().parent.parent / "weights" / "shapes-tiny"


def _bumped_pentagon(h: int = 300, w: int = 400) -> np.ndarray:
    """A pentagon's mask with a neighbour's bite taken in on one side: too ragged for the outline rules
    (``outline_kind`` says nothing), still a pentagon's silhouette."""
    a = -np.pi / 2 + 2 * np.pi * np.arange(5) / 5
    corners = np.round([150, 150] + 90 * np.stack([np.cos(a), np.sin(a)], 1)).astype(np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [corners], 1)
    cv2.circle(mask, tuple(int(v) for v in (corners[1] + corners[2]) // 2), 25, 1, -1)
    return mask.astype(bool)


def test_the_shipped_check_drops_a_target_of_another_kinds_silhouette():
    """On the shipped model: "the hexagon" answered with a pentagon's mask is denied, with a note saying why;
    "the pentagon" with the same mask stays, the network sure enough of it (``sure_of``) to stand for a clear
    outline."""
    from grounding import Grounder
    from grounding.result import Prediction, Target
    from shapes.outline_kind import outline_kind
    from shapes.silhouette_kind import sure_of

    grounder = Grounder.from_pretrained(DEFAULT_MODEL, device="cpu")
    silhouette = grounder.model.addons["silhouette"]
    assert silhouette.settings.level > 0
    mask = _bumped_pentagon()
    assert outline_kind(mask) is None
    assert silhouette.probability(mask, "pentagon") > 0.9 > 0.01 > silhouette.probability(mask, "hexagon")
    # so sure a reading stands for a clear outline in the group checks
    assert sure_of(grounder.model, mask, "pentagon") and not sure_of(grounder.model, mask, "hexagon")
    image = np.full((*mask.shape, 3), 200, np.uint8)
    image[mask] = 70
    prepared = grounder.prepare([image])[0]
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    for phrase, kept in (("the hexagon", False), ("the pentagon", True)):
        answer = f"<ref>{phrase}</ref><box>(0,0),(1,1)</box>[SEG]"
        prediction = Prediction(answer, [Target(phrase, box, mask, 0.9, 0)], mask.shape)
        reviewed = silhouette.review(grounder.model, grounder.steps.processor.tokenizer, prepared, None, prediction)
        if kept:
            assert reviewed.targets and reviewed.answer == answer
        else:
            assert not reviewed.targets and reviewed.answer == "There is no hexagon in the image."
            assert any("silhouette" in n for n in reviewed.notes)
