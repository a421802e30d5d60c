"""Mirror test-time augmentation of the fusion locator (shapes/locator_mirror.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shapes.locator_mirror import combine, mirror_ids, mirror_token_ids, unmirror


def test_the_word_swap_keeps_case_and_space_markers_and_leaves_other_words():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = ["▁left", "▁right", "▁Left", "▁Right", "left", "most", "▁leftmost", "▁rightmost", "▁top", "Ġright", "Ġleft"]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                                                              unk_token="▁top")))
    table = mirror_token_ids(tok)
    swapped = {words[i]: words[j] for i, j in enumerate(table.tolist()) if i != j}
    assert swapped == {"▁left": "▁right", "▁right": "▁left", "▁Left": "▁Right", "▁Right": "▁Left",
                       "▁leftmost": "▁rightmost", "▁rightmost": "▁leftmost", "Ġright": "Ġleft", "Ġleft": "Ġright"}
    # "left" without a marker has no partner in this vocabulary: kept; a BPE "▁left" + "most" swaps its piece
    assert mirror_ids(torch.tensor([4, 0, 5, 99]), table).tolist() == [4, 1, 5, 99]


def test_a_reading_of_the_mirror_maps_back_onto_the_image():
    """Cell (r, c) of the mirrored square is cell (r, g-1-c) of the image; its box x1..x2 is 1-x2..1-x1."""
    grid = 4
    scores = torch.full((1, grid * grid), -5.0)
    scores[0, 1 * grid + 0] = 5.0                                    # row 1, column 0 of the mirror
    boxes = torch.zeros(1, grid * grid, 4)
    boxes[0, 1 * grid + 0] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    back_scores, back_boxes = unmirror(scores, boxes, grid)
    assert back_scores.argmax().item() == 1 * grid + 3
    assert back_boxes[0, 1 * grid + 3].tolist() == pytest.approx([0.7, 0.2, 0.9, 0.4])
    # two readings that agree give the same best cell and box; log-probabilities add
    both, both_boxes = combine(back_scores, back_boxes, scores, boxes, grid)
    assert both.argmax().item() == 1 * grid + 3
    assert both.exp().sum().item() < 1.0
    assert both_boxes[0, 1 * grid + 3].tolist() == pytest.approx([0.7, 0.2, 0.9, 0.4])


def test_with_the_mirror_a_phrase_and_its_mirrored_twin_find_mirrored_boxes(scene):
    """Reading both the image and its mirror makes the locator exactly mirror-symmetric: "the left circle" on an
    image and "the right circle" on the image flipped left-right give mirrored boxes. Without the mirror a
    (random) locator has no such symmetry."""
    from grounding import Grounder, Query
    from grounding.presets import build_random

    image, _ = scene
    image = np.ascontiguousarray(image[:, :image.shape[0]])           # square: the padding cannot shift a pixel
    width = image.shape[1]
    model, tok = build_random("tiny", seed=3)
    model.add_addon("locator", {"kind": "fusion", "layers": 1}, tok)
    found = {}
    for mirror in (True, False):
        g = Grounder(model, tok, addons={"locator": {"mirror": mirror}})
        assert g.addon_settings["locator"]["mirror"] == mirror
        boxes = []
        for pixels, phrase in ((image, "the left circle"), (image[:, ::-1].copy(), "the right circle")):
            ask = Query(pixels, "Where is it?", answer_prefix=f"<ref>{phrase}</ref>")
            boxes.append(g.predict_batch([ask], max_new_tokens=60)[0].targets[0].box)
        (x1, y1, x2, y2), (u1, v1, u2, v2) = boxes
        found[mirror] = max(abs(x1 - (width - u2)), abs(x2 - (width - u1)), abs(y1 - v1), abs(y2 - v2))
    assert found[True] < 0.15, found              # box text rounds to thousandths of the side: < 0.04 px a number
    assert found[False] > 1.0, found


def test_a_phrase_read_before_on_the_same_image_is_not_read_again():
    """Without gradients ``locate_both`` keeps each image's readings by phrase: a phrase repeated in a call or read
    in an earlier call (every teacher-forced "[SEG]." of an image has the empty phrase; a generated answer's box is
    read again for its [SEG]) costs no locator pass, and gives what a fresh pass gives. New weights (an optimiser
    step changes them in place), another image or gradients read afresh."""
    from shapes.locator import FusionLocator, Phrases
    from shapes.locator_mirror import _read_both, locate_both

    torch.manual_seed(0)
    grid, h = 4, 16
    net = FusionLocator(hidden_size=h, grid=grid, layers=1, dim=32, image_size=8).eval()
    passes = []   # sequences per locator pass (each phrase and its mirrored twin)
    locate = net.locate
    net.locate = lambda states, image, phrases: passes.append(len(states)) or locate(states, image, phrases)
    keys, mirrored = torch.randn(grid * grid, 8), torch.randn(grid * grid, 8)
    words = torch.randn(3, h)

    def phrases(*rows):   # each row: word indices; zero-padded to the longest (as Phrases.stack pads)
        width = max(len(r) for r in rows)
        embeds, mask = torch.zeros(len(rows), width, h), torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            embeds[i, :len(r)], mask[i, :len(r)] = words[list(r)], True
        return Phrases(embeds, mask, mirrored=Phrases(-embeds, mask.clone()))

    def read(ph, image=keys):
        passes.clear()
        found = locate_both(net, torch.zeros(len(ph.mask), h), image, mirrored, ph, grid)
        fresh = _read_both(net, torch.zeros(len(ph.mask), h), image, mirrored, ph, grid)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(found, fresh))
        return passes[:-1]   # the passes of locate_both (the last one is the fresh pass's)

    with torch.no_grad():
        assert read(phrases([0, 1], [], [0, 1], [2])) == [2 * 3]   # 3 distinct phrases
        assert read(phrases([2], [0, 1, 2], [], [0, 1])) == [2 * 1]   # other widths, one new phrase
        assert read(phrases([2], [])) == []
        assert read(phrases([2]), keys.clone()) == [2]   # another image
        next(net.parameters()).add_(0.5)   # new weights, in place
        assert read(phrases([2], [])) == [2 * 2]
    passes.clear()
    locate_both(net, torch.zeros(1, h), keys, mirrored, phrases([2]), grid)   # gradients on: no memo
    assert passes == [2]
