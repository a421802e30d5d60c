"""The grey_tower add-on (shapes/grey_tower.py): grayscale images, and only they, enter the vision tower through a
patch embedding of their own, which saves and loads with the checkpoint and is trained by distillation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import tiny_with_grey_addon


def _processor(model, tok):
    from grounding.processor import GroundingProcessor

    return GroundingProcessor(tok, model.config, model.vision_image_size, model.num_image_tokens)


def test_grey_images_are_told_from_colour_ones_on_the_towers_input():
    """The test runs on the padded, resized, normalised input: grey images of any shape (the fill colour around
    them) are grey, in fp32 and bf16; one coloured line makes an image colour."""
    from shapes.grey_tower import grey_images

    model, tok = tiny_with_grey_addon("grey_tower", "stem")
    processor = _processor(model, tok)
    mean, std = model.config.image_mean, model.config.image_std
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.integers(0, 256, (300, 500, 1), dtype=np.uint8), 3, axis=2)
    lined = grey.copy()
    lined[:, 40] = (200, 30, 30)
    images = [grey, grey[:37, :91], grey[:, :23], rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), lined]
    pixels = torch.stack([processor.vision_pixels(im) for im in images])
    expected = [True, True, True, False, False]
    assert grey_images(pixels, mean, std).tolist() == expected
    assert grey_images(pixels.bfloat16(), mean, std).tolist() == expected


def test_grey_images_and_only_they_are_embedded_by_the_grey_stem(tmp_path):
    from grounding.checkpoint import load_checkpoint, save_checkpoint

    model, tok = tiny_with_grey_addon("grey_tower", "stem")
    processor = _processor(model, tok)
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    grey = np.repeat(colour[..., :1], 3, axis=2)
    stem = model.vlm.model.vision_tower.embeddings.patch_embedding
    pixels = torch.stack([processor.vision_pixels(im) for im in (colour, grey, colour)])
    with torch.no_grad():
        mixed = stem(pixels)                                    # mixed in one call: order kept
        colour_stem = type(stem).forward(stem, pixels)          # the colour stem's own reading
        grey_stem = model.addons["grey_tower"].stem(pixels)
        features = model.vision_features(pixels)
    torch.testing.assert_close(mixed[0], colour_stem[0])
    torch.testing.assert_close(mixed[2], colour_stem[2])
    torch.testing.assert_close(mixed[1], grey_stem[1])
    assert not torch.allclose(grey_stem[1], colour_stem[1], atol=1e-3)
    # colour-only batches are read as without the add-on, bit for bit
    with torch.no_grad():
        assert torch.equal(stem(pixels[[0, 2]]), type(stem).forward(stem, pixels[[0, 2]]))

    save_checkpoint(model, tok, tmp_path / "m")
    loaded, _ = load_checkpoint(tmp_path / "m")
    loaded.float().eval()
    with torch.no_grad():
        again = loaded.vision_features(pixels)
    torch.testing.assert_close(again, features)


def test_the_grey_tower_cannot_be_turned_off_for_one_predictor():
    from grounding import Grounder
    from grounding.errors import CheckpointError

    model, tok = tiny_with_grey_addon("grey_tower", "stem")
    with pytest.raises(CheckpointError, match="grey_tower"):
        Grounder(model, tok, torch.device("cpu"), torch.float32, addons={"grey_tower": None})


def test_training_moves_the_grey_stem_towards_the_colour_towers_features(tmp_path):
    """A few steps from the colour stem, on new scenes: only the grey stem changes, and the tower's features of grey
    views come closer to its features of the colour scenes (the distillation loss on val falls)."""
    from grounding.checkpoint import load_checkpoint, save_checkpoint
    from shapes.grey_tower import train_grey_tower, tower_of
    from shapes.scenes.synthetic import generate_dataset

    start, tok = load_checkpoint("weights/shapes-tiny")
    stem = start.addons["grey_tower"].stem
    stem.load_state_dict(tower_of(start.vlm).embeddings.patch_embedding.state_dict())   # grey as colour
    save_checkpoint(start, tok, tmp_path / "start")
    data = generate_dataset(tmp_path / "synth", 24, seed=3, progress=False)
    report = train_grey_tower(tmp_path / "start", data, tmp_path / "out", steps=40, batch_size=4, lr=2e-4, augment=0.0, camouflage=0.0,
                              eval_scenes=8, seed=0, progress=False)
    assert report["after"]["distill"] < report["before"]["distill"]
    assert report["after"]["colour views"] == report["before"]["colour views"]   # colour images read as before
    trained, _ = load_checkpoint(tmp_path / "out" / "model")
    assert all(torch.equal(a, b) for a, b in zip(trained.vlm.state_dict().values(), start.vlm.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(trained.addons["grey_tower"].stem.state_dict().values(),
                                                     stem.state_dict().values()))


def test_a_marked_object_in_a_grayscale_image_is_named_by_its_kind_and_brightness():
    """A grey copy of examples/shapes.png: "What is in this region?" on each object names its kind, and no colour
    a grey image cannot show (the grey stem's features are distilled from colour ones, so the head would guess one):
    black, grey or white by the object's brightness."""
    from apps.demo import EXAMPLES_DIR
    from grounding import Grounder
    from grounding.images import load_image
    from shapes.scenes.figures import COLOURS

    image = load_image(EXAMPLES_DIR / "shapes.png")
    grey = np.repeat(np.round(image @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None], 3, axis=2)
    grounder = Grounder.from_pretrained("weights/shapes-tiny", device="cpu")
    chromatic = set(COLOURS) - {"black", "grey", "white"}
    for kind, box in (("square", (92, 32, 188, 128)), ("circle", (170, 108, 249, 188)), ("square", (200, 173, 287, 262))):
        words = grounder.predict(grey, "What is in this region?", boxes=[list(box)]).answer.split()
        assert kind in words and not chromatic & set(words), (box, words)
        assert {"black", "grey", "white"} & set(words), words


def test_brightness_names_the_colour_of_a_grey_object():
    from shapes.region_head import brightness_word

    assert [brightness_word(np.full(50, v, np.uint8)) for v in (10, 70, 128, 180, 240)] == \
        ["black", "black", "grey", "grey", "white"]

