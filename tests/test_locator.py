"""The default model's [SEG] locator add-on (shapes/locator.py, shapes/addons.py): mask <-> token-grid geometry,
and a tiny model that learns to click on its object."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from grounding.addons.base import SegRead
from shapes.locator import (FusionLocator, Phrases, cell_centres, distinct_cells, locator_loss, mask_cells,
                            peak_cells, square_boxes, square_to_pixels)


def test_cells_and_centres_follow_the_processors_square_padding():
    """A 60x120 image is padded to a 120x120 square (30 px above and below); a 4x4 grid has 30 px cells. The
    left 30 columns of the image are cells (1, 0) and (2, 0), whose centres map back onto the mask."""
    mask = torch.zeros(1, 60, 120, dtype=torch.bool)
    mask[0, :, :30] = True
    cells = mask_cells(mask, 4)
    assert cells[0].nonzero().flatten().tolist() == [4, 8]
    xy = cell_centres(torch.tensor([4, 8]), 4, (60, 120))
    assert xy.tolist() == [[15.0, 15.0], [15.0, 45.0]]
    assert all(mask[0, int(y), int(x)] for x, y in xy.tolist())
    # a padding cell maps to the nearest pixel of the image
    assert cell_centres(torch.tensor([3]), 4, (60, 120)).tolist() == [[105.0, 0.0]]
    # boxes as fractions of the square (the fusion locator's) and back to the image's pixels
    square = square_boxes(mask)
    assert square.tolist() == [[0.0, 0.25, 0.25, 0.75]]
    assert square_to_pixels(square, (60, 120)).tolist() == [[0.0, 0.0, 30.0, 60.0]]
    assert square_to_pixels(torch.tensor([[-0.1, 0.0, 0.5, 1.0]]), (60, 120)).tolist() == [[0.0, 0.0, 60.0, 60.0]]


def test_small_objects_get_their_best_cell_and_empty_masks_none():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 40:43, 20:23] = True                       # 9 px: under half of any 8x8 cell
    cells = mask_cells(masks, 8)
    assert cells[0].nonzero().flatten().tolist() == [5 * 8 + 2]
    assert not cells[1].any()
    scores = torch.zeros(2, 64)
    assert locator_loss(scores, cells).item() == pytest.approx(np.log(64), rel=1e-5)  # empty row skipped
    assert locator_loss(scores, torch.zeros_like(cells)) is None


def _spy_on_decoder(model) -> list:
    """The (points, boxes) of every ``mask_decoder.decode`` call from now on, appended to the returned list."""
    calls = []
    decode = model.mask_decoder.decode

    def spy(*args, **kwargs):
        calls.append((kwargs.get("points"), kwargs.get("boxes")))
        return decode(*args, **kwargs)

    model.mask_decoder.decode = spy
    return calls


@pytest.mark.parametrize("words,layer,fusion", [(False, -1, 0), (True, 0, 0), (False, 0, 1)])
def test_a_tiny_model_learns_to_click_on_its_object(scene, tmp_path, words, layer, fusion):
    """A tiny model with a locator (its query reading the phrase's words, or not, or a fusion locator), trained
    on one example, clicks on the disc; the click reaches the mask decoder, the locator survives a checkpoint
    round trip, and the prefix engine gives the same click and mask."""
    from grounding.checkpoint import load_checkpoint, save_checkpoint
    from grounding.data.collate import collate, make_sample
    from grounding import PrefixEngine
    from grounding import Grounder, Query
    from grounding.presets import build_random
    from grounding.processor import GroundingProcessor

    image, mask = scene
    model, tok = build_random("tiny", seed=3)
    model.add_addon("locator", {"kind": "fusion" if fusion else "seg", "layers": fusion or 4, "words": words,
                                "layer": layer}, tok)
    proc = GroundingProcessor(tok, model.config, model.vision_image_size, model.num_image_tokens)
    question, answer = "Where is the red circle?", "<ref>the red circle</ref>[SEG]"
    batch = collate([make_sample(proc, image, question, answer, [mask])], proc, model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    losses = []
    for _ in range(40):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.addon_losses["locator"].item())
    assert losses[-1] < 0.3 * losses[0]

    save_checkpoint(model, tok, tmp_path / "m")
    model, tok = load_checkpoint(tmp_path / "m")
    locator = model.addons["locator"]
    assert locator.settings.layer == layer and locator.fusion == bool(fusion)
    assert isinstance(locator.net, FusionLocator) if fusion else (locator.net.words is not None) == words
    g = Grounder(model, tok)
    calls = _spy_on_decoder(model)
    pred = g.predict_batch([Query(image, question, answer=answer)])[0]
    (x, y), = calls[0][0][0].tolist()
    assert mask[int(y), int(x)], f"the click ({x}, {y}) is off the disc"
    boxes = calls[0][1]
    assert (boxes is not None) == bool(fusion)   # a fusion locator also gives the box it reads at that cell
    if fusion:
        x0, y0, x1, y1 = boxes[0].tolist()
        assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]
    grouped = PrefixEngine(g).predict_group(image, [Query(image, question, answer=answer)])[0]
    assert torch.allclose(calls[1][0], calls[0][0])
    assert boxes is None or torch.allclose(calls[1][1], boxes)
    if fusion:   # a generated answer's box numbers are the locator's box (shapes/box_writer.py)
        from grounding.text.boxes import format_box
        ask = Query(image, question, answer_prefix="<ref>the red circle</ref><box>")
        written = g.predict_batch([ask], max_new_tokens=40)[0].answer
        assert written.startswith("<ref>the red circle</ref>" + format_box(boxes[0].tolist(), image.shape[:2])), written
        assert PrefixEngine(g).predict_group(image, [ask], max_new_tokens=40)[0].answer == written
        # a phrase the answer names always gets the box, whatever the language model would write next
        named = Query(image, question, answer_prefix="<ref>the red circle</ref>")
        assert g.predict_batch([named], max_new_tokens=40)[0].answer.startswith(written[:written.index("</box>")])
        own = Grounder(model, tok, addons={"locator": {"write_boxes": False}})
        assert own.predict_batch([ask], max_new_tokens=40)[0].answer != written   # the tiny LM's own digits
    assert (grouped.targets[0].mask == pred.targets[0].mask).mean() > 0.999


def _phrases(model, tok, text: str) -> Phrases:
    """The locator's ``Phrases`` of the [SEG]s of ``text`` (ids read as one sequence)."""
    from shapes.addons import Locator
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    seg = model.read_segs(torch.zeros(*ids.shape, 1), ids)[0]
    return Locator().phrases(model, seg.phrase_ids)


def test_each_seg_gets_the_words_of_its_own_phrase(tiny):
    """Each [SEG]'s phrase: the input embeddings of the <ref> phrase before it; none without a phrase."""
    model, tok = tiny
    phrases = _phrases(model, tok, "<ref>red disc</ref>[SEG] and <ref>the blue square</ref><box>(1,2),(3,4)</box>[SEG] [SEG]")
    embed = model.vlm.get_input_embeddings()
    words = lambda t: embed(torch.tensor(tok(t, add_special_tokens=False)["input_ids"]))
    assert phrases.mask.sum(1).tolist() == [len(words("red disc")), *[len(words("the blue square"))] * 2]
    assert torch.allclose(phrases.mean()[0], words("red disc").mean(0), atol=1e-6)
    assert torch.allclose(phrases.embeds[1, :phrases.mask[1].sum()], words("the blue square"), atol=1e-6)
    assert torch.equal(phrases.embeds[2], phrases.embeds[1])  # the last phrase before it
    empty = _phrases(model, tok, "[SEG].")
    assert not empty.mask.any() and not empty.mean().any()


def test_the_fusion_locator_reads_relations_between_words_and_cells():
    """Word order matters to a fusion locator (a mean of words cannot tell "A left of B" from "B left of A"):
    on random scenes of two tokens, "a <left-of> b" must find a's cell and "b <left-of> a" b's, where the left
    one is whichever of them lies in a smaller column. Held-out scenes, 300 steps."""
    torch.manual_seed(0)
    hidden, grid = 16, 4
    vocab = torch.randn(4, hidden)                  # words: a, b, "left of", "right of"
    look = torch.randn(2, hidden)                   # how objects a and b look in a cell

    def batch(n: int, gen: torch.Generator):
        cells = torch.stack([torch.randperm(grid * grid, generator=gen)[:2] for _ in range(n)])   # [n, 2]
        image = 0.1 * torch.randn(n, grid * grid, hidden, generator=gen)
        image[torch.arange(n), cells[:, 0]] += look[0]
        image[torch.arange(n), cells[:, 1]] += look[1]
        first = torch.randint(0, 2, (n,), generator=gen)          # the phrase names a (0) or b (1) first
        relation = torch.randint(2, 4, (n,), generator=gen)
        words = torch.stack([vocab[first], vocab[relation], vocab[1 - first]], 1)
        left_is_first = (cells.gather(1, first[:, None]) % grid < cells.gather(1, 1 - first[:, None]) % grid)[:, 0]
        target_first = torch.where(relation == 2, left_is_first, ~left_is_first)
        named = torch.where(target_first, first, 1 - first)
        same_column = cells[:, 0] % grid == cells[:, 1] % grid
        target = torch.zeros(n, grid * grid, dtype=torch.bool)
        target[torch.arange(n), cells.gather(1, named[:, None])[:, 0]] = True
        return image[~same_column], Phrases(words[~same_column], torch.ones(n, 3, dtype=torch.bool)[~same_column]), \
            target[~same_column]

    locator = FusionLocator(hidden, grid, layers=2, dim=32)
    opt = torch.optim.AdamW(locator.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        image, phrases, target = batch(64, gen)
        loss = locator_loss(locator(None, image, phrases), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    image, phrases, target = batch(500, torch.Generator().manual_seed(2))
    with torch.no_grad():
        hit = target.gather(1, locator(None, image, phrases).argmax(-1, keepdim=True)).float().mean().item()
    assert hit > 0.9, f"top-1 {hit:.2f} on held-out scenes (a mean of words could reach about 0.5)"


def test_repeated_phrases_click_on_successive_peaks():
    """ "all red shapes" answers repeat one phrase per [SEG]: the k-th repeat takes the k-th peak of the score
    map (not the best cell's neighbour, which is the same object), so each [SEG] gets its own object."""
    row, col = torch.arange(64) // 8, torch.arange(64) % 8           # two bumps on an 8x8 grid, at cells 9 and 54
    bump = lambda r, c, top: top - torch.maximum((row - r).abs(), (col - c).abs()).float()
    scores = torch.maximum(bump(1, 1, 9.0), bump(6, 6, 7.5)).expand(3, 64)
    assert scores[0].argmax() == 9 and scores[0, 10] > scores[0, 54]     # the best cell's neighbour beats the 2nd peak
    assert peak_cells(scores, 8, torch.tensor([0, 1, 5])).tolist() == [9, 54, 54]   # past the last peak: the last
    # a [SEG]'s rank counts the earlier targets with its phrase, a boxed one without a [SEG] too, as the box text
    # written for it does: "[SEG]. <ref>a</ref><box> <ref>a</ref>[SEG] <ref>b</ref>[SEG] <ref>a</ref>[SEG]"
    R, E, S, BOX, A, B = 1, 2, 3, 5, 10, 11
    ids = torch.tensor([S, R, A, E, BOX, R, A, E, S, R, B, E, S, R, A, E, S])
    seg = SegRead(torch.zeros(4, 8), ids, (ids == S).nonzero().flatten(), (R, E))
    assert seg.repeats().tolist() == [0, 1, 0, 2]   # an empty phrase is never a repeat


def test_repeated_phrases_take_successive_distinct_boxes():
    """Two objects side by side give one peak (the second object's cells are never a local maximum), but each cell
    boxes the object it lies on: the k-th repeat takes the k-th best cell whose box is a new object, so the second
    object is found; cells of an object already taken (its box again) are skipped."""
    row, col = torch.arange(64) // 8, torch.arange(64) % 8
    scores = (10.0 - (row - 2).abs() - (col - 2).abs()).float()      # one peak, at cell 18
    left, right = torch.tensor([0.1, 0.1, 0.35, 0.35]), torch.tensor([0.4, 0.1, 0.6, 0.35])
    box_map = torch.where((col <= 2)[:, None], left, right).expand(2, 64, 4)
    scores = scores.expand(2, 64)
    assert peak_cells(scores, 8, torch.tensor([1, 1])).tolist() == [18, 18]   # the only peak, again
    cells = distinct_cells(scores, box_map, torch.tensor([0, 1]))
    assert cells[0] == 18 and col[cells[1]] == 3 and torch.equal(box_map[1, cells[1]], right)
    # past the last distinct box: the last one found
    assert torch.equal(box_map[0, distinct_cells(scores[:1], box_map[:1], torch.tensor([4]))[0]], right)


def test_a_deepened_locator_scores_as_before_and_its_new_layers_learn():
    """``train-locator --layers 4`` on a model whose locator has 2 trained layers keeps them: the new layers start
    as the identity, so the deeper locator begins where the trained one is instead of from scratch."""
    torch.manual_seed(0)
    hidden, grid = 24, 4
    trained = FusionLocator(hidden, grid, layers=2, dim=32)
    for p in trained.parameters():   # stands in for trained weights (nothing left at its initial value)
        p.data.add_(0.1 * torch.randn_like(p))
    deeper = trained.deepened(4)
    assert len(deeper.encoder.layers) == 4
    image = torch.randn(3, grid * grid, hidden)
    words = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    phrases = Phrases(torch.randn(3, 5, hidden), words)
    for before, after in zip(trained.locate(None, image, phrases), deeper.locate(None, image, phrases)):
        torch.testing.assert_close(after, before)
    target = torch.zeros(3, grid * grid, dtype=torch.bool)
    target[:, 5] = True
    locator_loss(deeper(None, image, phrases), target).backward()
    assert deeper.encoder.layers[3].linear2.weight.grad.abs().sum() > 0   # the new layers are not stuck at zero
    with pytest.raises(ValueError, match="cannot be deepened"):
        deeper.deepened(3)


def test_without_the_locator_click_the_decoder_gets_the_box_alone(scene):
    """The locator's ``click: false``: a fusion locator's box goes to the mask decoder without the click (at inference,
    and in training, where the loss still flows); a locator without boxes keeps its click."""
    from grounding.data.collate import collate, make_sample
    from grounding import Grounder, Query
    from grounding.presets import build_random
    from grounding.processor import GroundingProcessor

    image, mask = scene
    question, answer = "Where is the red circle?", "<ref>the red circle</ref>[SEG]"
    for fusion, click_expected in ((1, False), (0, True)):
        model, tok = build_random("tiny", seed=3)
        model.add_addon("locator", {"kind": "fusion" if fusion else "seg", "layers": fusion or 4, "click": False}, tok)
        calls = _spy_on_decoder(model)
        Grounder(model, tok).predict_batch([Query(image, question, answer=answer)])
        points, boxes = calls[0]
        assert (points is not None) == click_expected and (boxes is not None) == bool(fusion)
        proc = GroundingProcessor(tok, model.config, model.vision_image_size, model.num_image_tokens)
        model.train()
        out = model(**collate([make_sample(proc, image, question, answer, [mask])], proc, model))
        out.loss.backward()
        assert out.dice_loss.item() > 0 and model.seg_projection.net[0].weight.grad.abs().sum() > 0
