"""SAM's image encoder trained on corrupted and zoomed views (shapes/mask_robust.py, `groundseg train-mask-encoder`):
only the image encoder changes, so every prompt the decoder knew ([SEG] embeddings included) keeps its path."""
from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from shapes.augment import camouflage, corrupt_regions, grey


def test_corrupt_regions_treats_the_background_and_each_object_apart():
    """Over many draws, a flat object on a flat ground comes out both ways round: a noisy object on a smoother
    ground, and a smooth object on a noisier ground."""
    image = np.full((64, 64, 3), 120, np.uint8)
    square = np.zeros((64, 64), bool)
    square[16:48, 16:48] = True
    image[square] = (200, 40, 40)
    rng = np.random.default_rng(0)
    ways = set()
    for _ in range(40):
        out = corrupt_regions(image, [square], rng).astype(np.float32)
        inner, ground = out[20:44, 20:44].std((0, 1)).mean(), out[:12].std((0, 1)).mean()
        if max(inner, ground) > 2 * min(inner, ground) + 2:
            ways.add("object" if inner > ground else "ground")
    assert ways == {"object", "ground"}


def test_grey_mixes_the_channels_as_a_grayscale_camera_does():
    """Each pixel becomes one value, between its darkest and brightest channel, in all three channels; the mix of
    the channels varies from draw to draw (a red and a green of equal luma do not always come out equal)."""
    image = np.zeros((8, 8, 3), np.uint8)
    image[:4] = (200, 0, 0)
    image[4:] = (0, 102, 0)          # about the luma of the red above (0.299 * 200 ~ 0.587 * 102)
    rng = np.random.default_rng(0)
    outs = [grey(image, rng) for _ in range(20)]
    for out in outs:
        assert out.shape == image.shape and out.dtype == np.uint8
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        assert (out[..., 0] >= image.min(2)).all() and (out[..., 0] <= image.max(2)).all()
    gaps = [int(out[0, 0, 0]) - int(out[7, 0, 0]) for out in outs]
    assert min(gaps) < -5 and max(gaps) > 5


def test_camouflage_brings_objects_to_their_grounds_brightness_and_keeps_grey_grey():
    """A bright square on a dark grey ground: over many draws, the square's mean level usually ends within a few
    levels of the ground around it, the ground gets a texture it lacked, and every pixel stays grey."""
    image = np.full((96, 96, 3), 60, np.uint8)
    square = np.zeros((96, 96), bool)
    square[30:66, 30:66] = True
    image[square] = 200
    ring = np.zeros_like(square)
    ring[23:73, 23:73] = True
    ring &= ~square
    rng = np.random.default_rng(0)
    gaps, textures = [], []
    for _ in range(30):
        out = camouflage(image, [square], rng)
        assert out.dtype == np.uint8 and (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        level = out[..., 0].astype(np.float32)
        gaps.append(abs(level[square].mean() - level[ring].mean()))
        textures.append(level[:20, :20].std())
    moved = np.mean(np.array(gaps) < 0.4 * 140)
    assert 0.5 < moved < 0.95         # most objects moved (probability 0.7), some left as they were
    assert min(gaps) < 0.4 * 140 and max(gaps) > 100
    assert np.median(textures) > 3    # the flat ground is textured now


def test_train_mask_encoder_changes_only_the_image_encoder(tmp_path, scene):
    from grounding import Grounder
    from grounding.checkpoint import save_checkpoint
    from grounding.presets import build_random
    from shapes.mask_robust import train_mask_encoder
    from shapes.scenes.synthetic import generate_dataset

    model, tok = build_random("tiny", seed=4)
    save_checkpoint(model, tok, tmp_path / "base")
    data = generate_dataset(tmp_path / "synth", 12, seed=6, progress=False)
    report = train_mask_encoder(tmp_path / "base", data, tmp_path / "out", steps=6, batch_size=4, eval_views=3,
                                camouflage=0.5, progress=False)
    assert set(report["before"]) == set(report["after"]) == {"clean", "seen", "grey", "camouflaged"}
    assert json.loads((tmp_path / "out" / "mask_robust.json").read_text())["steps"] == 6

    before = load_file(str(tmp_path / "base" / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".image_encoder." in k for k in changed), sorted(changed)[:5]

    image, _ = scene
    pred = Grounder.from_pretrained(tmp_path / "out" / "model", device="cpu").segment(image, boxes=[[10, 10, 40, 40]])
    assert len(pred.targets) == 1 and pred.targets[0].mask.shape == image.shape[:2]


def test_train_mask_encoder_into_the_grey_encoder_keeps_the_colour_encoder(tmp_path):
    """``grey_encoder=True``: SAM's own image encoder is kept bit for bit, the trained weights are the
    ``grey_encoder`` add-on's, and they load with the checkpoint."""
    from grounding.checkpoint import save_checkpoint
    from grounding.presets import build_random
    from shapes.mask_robust import train_mask_encoder
    from shapes.scenes.synthetic import generate_dataset

    model, tok = build_random("tiny", seed=4)
    save_checkpoint(model, tok, tmp_path / "base")
    data = generate_dataset(tmp_path / "synth", 12, seed=6, progress=False)
    train_mask_encoder(tmp_path / "base", data, tmp_path / "out", steps=4, batch_size=4, eval_views=2,
                       grey=0.5, camouflage=0.5, grey_encoder=True, progress=False)
    before = load_file(str(tmp_path / "base" / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    grey = {k.split("addons.grey_encoder.encoder.")[1]: v for k, v in after.items() if ".grey_encoder.encoder." in k}
    colour = {k.split(".image_encoder.")[1]: v for k, v in before.items() if ".image_encoder." in k}
    assert grey.keys() == colour.keys()
    assert any(not torch.equal(grey[k], colour[k]) for k in grey)
    assert "grey_encoder" in json.loads((tmp_path / "out" / "model" / "groundseg.json").read_text())["addons"]
