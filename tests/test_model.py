"""GroundingModel: losses, which parameters train, and the [SEG] -> mask path."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import ANSWER, QUESTION


def test_forward_gives_three_losses_and_full_size_masks(tiny, scene):
    from grounding.data.collate import collate, make_sample
    from grounding.processor import GroundingProcessor
    model, tok = tiny
    image, mask = scene
    proc = GroundingProcessor(tok, model.config, model.vision_image_size, model.num_image_tokens)
    answer = "<ref>the red circle</ref>[SEG] and <ref>the blue square</ref>[SEG]"
    batch = collate([make_sample(proc, image, QUESTION, answer, [mask, ~mask])], proc, model)
    with torch.no_grad():
        out = model(**batch)
    assert out.mask_logits[0].shape == (2, *image.shape[:2])
    for v in (out.ce_loss, out.bce_loss, out.dice_loss):
        assert torch.isfinite(v) and v.item() > 0
    w = model.config.loss_weights
    assert out.loss.item() == pytest.approx(w.ce * out.ce_loss.item() + w.bce * out.bce_loss.item()
                                            + w.dice * out.dice_loss.item(), rel=1e-5)


def test_mask_count_must_match_seg_tokens(tiny, scene):
    from grounding.data.collate import make_sample
    from grounding.processor import GroundingProcessor
    model, tok = tiny
    image, mask = scene
    proc = GroundingProcessor(tok, model.config, model.vision_image_size, model.num_image_tokens)
    with pytest.raises(ValueError, match="1 \\[SEG\\] tokens but 2 masks"):
        make_sample(proc, image, QUESTION, ANSWER, [mask, mask])


def test_overfitting_one_example_drives_every_loss_down(overfit):
    h = overfit["history"]
    first, last = h[0], h[-1]
    assert last["ce_loss"] < 0.1 * first["ce_loss"]
    assert last["bce_loss"] < 0.5 * first["bce_loss"]
    assert last["dice_loss"] < 0.5 * first["dice_loss"]


def _groups(names):
    return {
        "lora": [n for n in names if "lora_" in n],
        "token_rows": [n for n in names if "trainable_tokens_delta" in n],
        "lm_head": [n for n in names if "lm_head.modules_to_save" in n],
        "projection": [n for n in names if n.startswith("seg_projection.")],
        "mask_decoder": [n for n in names if n.startswith("mask_decoder.") and ".mask_decoder." in n],
    }


def test_gradients_reach_every_trainable_part_and_frozen_parts_stay(overfit):
    model, before, grads = overfit["model"], overfit["before"], overfit["grads"]
    groups = _groups(list(grads))
    for part, names in groups.items():
        assert names, f"no gradient reached {part}"
        # LoRA's A matrices get no gradient on step 0 (B starts at zero), so look at the whole group.
        assert sum(grads[n] for n in names) > 0, f"zero gradient in {part}"
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    stated = _groups(sorted(trainable))
    for n in trainable:
        assert any(n in names for names in stated.values()), f"{n} trains but is not in the stated list"
    for n, p in params.items():
        if n not in trainable:
            assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    frozen = [n for n in params if n not in trainable]
    assert any("vision_tower" in n for n in frozen)
    assert any("image_encoder" in n for n in frozen)
    assert any("embed_tokens" in n for n in frozen)  # the base rows; only new rows train
    changed = [n for n in trainable if not torch.equal(params[n], before[n])]
    for part, names in _groups(changed).items():
        assert names, f"{part} did not change during training"


def test_seg_state_before_reads_the_token_preceding_seg(tiny):
    from grounding.text.tokens import SEG
    model, tok = tiny
    seg_id = tok.convert_tokens_to_ids(SEG)
    ids = torch.tensor([[5, 6, seg_id, 7, seg_id]])
    hidden = torch.arange(5, dtype=torch.float32)[None, :, None].expand(1, 5, model.llava_config.text_config.hidden_size)
    picked = {}
    for mode in ("seg", "before"):
        model.config.seg_state = mode
        captured = []
        hook = model.seg_projection.register_forward_hook(lambda m, i, o: captured.append(i[0][:, 0].tolist()))
        model.seg_embeddings(hidden, ids)
        hook.remove()
        picked[mode] = captured[0]
    model.config.seg_state = "seg"
    assert picked == {"seg": [2.0, 4.0], "before": [1.0, 3.0]}


def test_projector_norm_keeps_image_tokens_at_the_text_embeddings_scale():
    """A from-scratch tower's features are hundreds wide in norm; with the projector norm the image tokens reach
    the language model at about the text embeddings' norm (without it they were ~200x larger)."""
    from grounding.presets import build_random

    model, _ = build_random("shapes", seed=0)
    assert "projector_norm" in model.addons and hasattr(model.vlm.model.multi_modal_projector, "norm")
    size = model.vision_image_size
    with torch.no_grad():
        feats = 300 * torch.randn(2, model.num_image_tokens, model.llava_config.vision_config.hidden_size)
        tokens = model.vlm.model.multi_modal_projector(feats)
    text = model.vlm.get_input_embeddings().weight.norm(dim=-1).mean()
    assert tokens.shape == (2, model.num_image_tokens, model.llava_config.text_config.hidden_size) and size == 256
    assert 0.1 < tokens.norm(dim=-1).mean() / text < 10
