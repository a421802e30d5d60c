"""Shared fixtures: tiny random models, small synthetic images, and one model overfitted on one example."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch


def draw_scene(h: int = 72, w: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A small scene: grey background, a red disc (the target) and a blue square. -> (image, disc mask)."""
    img = np.full((h, w, 3), 90, np.uint8)
    cv2.rectangle(img, (w - 36, 10), (w - 10, 36), (40, 60, 230), -1)
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (28, 40), 16, 1, -1)
    img[mask.astype(bool)] = (220, 30, 30)
    return img, mask.astype(bool)


def tiny_with_grey_addon(name: str, weights: str):
    """A tiny random (model, tokenizer) given add-on ``name`` (``grey_encoder`` or ``grey_tower``), its copied
    weights (``addon.<weights>``) moved off the colour ones so that the two read an image differently."""
    from grounding.presets import build_random

    model, tok = build_random("tiny", seed=4)
    addon = model.add_addon(name, {}, tok)
    with torch.no_grad():
        for p in getattr(addon, weights).parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), tok


@pytest.fixture(scope="session")
def scene():
    return draw_scene()


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) with random weights; do not train it (session-wide)."""
    from grounding.presets import build_random
    model, tok = build_random("tiny", seed=0)
    return model.eval(), tok


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from grounding.presets import init_tiny
    return init_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


QUESTION = "Where is the red circle?"
ANSWER = "<ref>the red circle</ref>[SEG]"


@pytest.fixture(scope="session")
def overfit(scene):
    """A tiny model with LoRA trained on ONE example until it answers it: the history of its losses, the
    parameters before training, and the model. Shared by the training, predictor and checkpoint tests."""
    from grounding.config import LoraSettings
    from grounding.data.collate import collate, make_sample
    from grounding.lora import apply_lora, new_token_ids
    from grounding.presets import build_random
    from grounding.processor import GroundingProcessor

    image, mask = scene
    model, tok = build_random("tiny", seed=1)
    apply_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0), new_token_ids(model, tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    proc = GroundingProcessor(tok, model.config, model.vision_image_size, model.num_image_tokens)
    batch = collate([make_sample(proc, image, QUESTION, ANSWER, [mask])], proc, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    torch.manual_seed(0)
    model.train()
    history = []
    grads = {}
    for step in range(60):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            grads = {n: p.grad.detach().abs().sum().item() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        history.append({k: getattr(out, k).item() for k in ("loss", "ce_loss", "bce_loss", "dice_loss")})
    model.eval()
    return {"model": model, "tokenizer": tok, "before": before, "history": history, "grads": grads,
            "image": image, "mask": mask}
