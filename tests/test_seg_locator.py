"""The [SEG] locator: mask <-> token-grid geometry, and a tiny model that learns to click on its object."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from grounding.seg_locator import cell_centres, locator_loss, mask_cells


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


def test_small_objects_get_their_best_cell_and_empty_masks_none():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 40:43, 20:23] = True                       # 9 px: under half of any 8x8 cell
    cells = mask_cells(masks, 8)
    assert cells[0].nonzero().flatten().tolist() == [5 * 8 + 2]
    assert not cells[1].any()
    scores = torch.zeros(2, 64)
    assert locator_loss(scores, cells).item() == pytest.approx(np.log(64), rel=1e-5)  # empty row skipped
    assert locator_loss(scores, torch.zeros_like(cells)) is None


@pytest.mark.parametrize("words,layer", [(False, -1), (True, 0)])
def test_a_tiny_model_learns_to_click_on_its_object(scene, tmp_path, words, layer):
    """A tiny model with a locator (its query reading the phrase's words, or not), trained on one example,
    clicks on the disc; the click reaches the mask decoder, the locator survives a checkpoint round trip, and
    the prefix engine gives the same click and mask."""
    from grounding.checkpoint import load_checkpoint, save_checkpoint
    from grounding.data.collate import collate, make_sample
    from grounding.engine import PrefixEngine
    from grounding.predictor import Grounder, Query
    from grounding.presets import build_random
    from grounding.processor import GroundingProcessor

    image, mask = scene
    model, tok = build_random("tiny", seed=3)
    model.add_seg_locator(words=words)
    model.config.seg_locator_layer = layer
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
        losses.append(out.locate_loss.item())
    assert losses[-1] < 0.3 * losses[0]

    save_checkpoint(model, tok, tmp_path / "m")
    model, tok = load_checkpoint(tmp_path / "m")
    assert (model.seg_locator.words is not None) == words and model.config.seg_locator_layer == layer
    g = Grounder(model, tok)
    calls = []
    decode = model.mask_decoder.decode

    def spy(*args, **kwargs):
        calls.append(kwargs.get("points"))
        return decode(*args, **kwargs)

    model.mask_decoder.decode = spy
    pred = g.predict_batch([Query(image, question, answer=answer)])[0]
    (x, y), = calls[0][0].tolist()
    assert mask[int(y), int(x)], f"the click ({x}, {y}) is off the disc"
    grouped = PrefixEngine(g).predict_group(image, [Query(image, question, answer=answer)])[0]
    assert torch.allclose(calls[1], calls[0])
    assert (grouped.targets[0].mask == pred.targets[0].mask).mean() > 0.999


def test_each_seg_gets_the_words_of_its_own_phrase(tiny):
    """seg_phrases: the mean input embedding of the <ref> phrase before each [SEG]; zeros without a phrase."""
    model, tok = tiny
    text = "<ref>red disc</ref>[SEG] and <ref>the blue square</ref><box>(1,2),(3,4)</box>[SEG] [SEG]"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    phrases = model.seg_phrases(ids)[0]
    embed = model.vlm.get_input_embeddings()
    words = lambda t: embed(torch.tensor(tok(t, add_special_tokens=False)["input_ids"])).mean(0)
    assert phrases.shape == (3, embed.weight.shape[1])
    assert torch.allclose(phrases[0], words("red disc"), atol=1e-6)
    assert torch.allclose(phrases[1], words("the blue square"), atol=1e-6)
    assert torch.allclose(phrases[2], words("the blue square"), atol=1e-6)  # the last phrase before it
    assert not model.seg_phrases(torch.tensor([tok("[SEG].", add_special_tokens=False)["input_ids"]]))[0].any()
