"""The model-family seam: a checkpoint names its family, the family builds, prompts and reads it; a family whose
answers carry boxes and no [SEG] gets each target's mask from its box."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from grounding.families import get_family, register_family
from grounding.families.native import GroundsegFamily


@register_family
class _BoxSpeakingFamily(GroundsegFamily):
    """The native family, read as a VLM whose answers carry boxes and no [SEG] (as LLaVA-1.5 or Qwen2-VL's)."""
    name = "test-box-speaking"
    masks_from_boxes = True


def test_a_checkpoint_names_its_family_and_an_unknown_one_is_a_clear_error(tiny_dir, tmp_path):
    from grounding.checkpoint import load_checkpoint
    from grounding.config import GroundingConfig
    from grounding.errors import CheckpointError

    model, _ = load_checkpoint(tiny_dir)
    assert model.family is get_family("groundseg")
    config = GroundingConfig.load(tiny_dir)
    config.family = "lisa-9000"
    (tmp_path / "m").mkdir()
    config.save(tmp_path / "m")
    with pytest.raises(CheckpointError, match="unknown model family 'lisa-9000'"):
        load_checkpoint(tmp_path / "m")


def test_a_box_speaking_family_gets_each_targets_mask_from_its_box(tiny, scene):
    from grounding import Grounder

    model, tok = tiny
    image, _ = scene
    model.config.family = "test-box-speaking"
    try:
        calls = []
        decode = model.mask_decoder.decode
        model.mask_decoder.decode = lambda *a, **k: calls.append(k) or decode(*a, **k)
        answer = "<ref>the red circle</ref><box>(120,333),(463,777)</box> and <ref>a square</ref>"
        pred = Grounder(model, tok).predict(image, "Where is the red circle?", answer=answer)
    finally:
        model.config.family = "groundseg"
        del model.mask_decoder.decode
    (target, *rest) = pred.targets
    assert not rest   # the phrase without a box and without a [SEG] is dropped, with a note
    assert any("'a square'" in n for n in pred.notes)
    h, w = image.shape[:2]
    expected = [120 / 999 * w, 333 / 999 * h, 463 / 999 * w, 777 / 999 * h]
    assert target.box == pytest.approx(expected, abs=1e-3)
    assert len(calls) == 1 and "seg_embeddings" not in calls[0]   # a box prompt alone
    torch.testing.assert_close(calls[0]["boxes"][0].double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-3, rtol=0)
    assert target.mask is not None and target.mask.shape == image.shape[:2] and target.score is not None
    assert np.array_equal(target.mask, decode(model.mask_decoder.encode([image])[0], boxes=calls[0]["boxes"]).masks[0])
