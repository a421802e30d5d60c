"""Tests of apps.overlay: drawing stays where the targets are, colours move towards the target
colour, labels scale with the image, and saved files round-trip."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from apps.overlay import PALETTE, draw_overlay, save_image, target_colour
from grounding.errors import ImageError, PromptError
from grounding.result import Prediction, Target


def grey(h=96, w=128) -> np.ndarray:
    return np.full((h, w, 3), 100, np.uint8)


def square_mask(h, w, top, left, size) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[top:top + size, left:left + size] = True
    return mask


def test_palette_is_distinct_and_cycles():
    assert len(set(PALETTE)) == len(PALETTE) >= 8
    assert target_colour(0) == PALETTE[0]
    assert target_colour(len(PALETTE) + 1) == PALETTE[1]
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)


def test_mask_pixels_move_towards_target_colour_and_far_pixels_do_not_change():
    image = grey()
    mask = square_mask(96, 128, 60, 70, 20)
    prediction = Prediction("a [SEG]", [Target("the thing", (70, 60, 90, 80), mask, 0.9, 0)], (96, 128))
    out = draw_overlay(image, prediction, alpha=0.45)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(image, grey())  # the input is not modified
    colour = np.array(target_colour(0))
    centre = out[70, 80].astype(int)
    assert np.all(np.abs(centre - colour) < np.abs(image[70, 80].astype(int) - colour))
    expected = np.rint(0.55 * 100 + 0.45 * colour)
    assert np.abs(centre - expected).max() <= 1
    # Far from the mask, the box and the label (top-left quadrant): untouched.
    assert np.array_equal(out[:25, :40], image[:25, :40])
    assert np.array_equal(out[90:, :40], image[90:, :40])


def test_each_target_gets_its_own_colour():
    h, w = 80, 160
    targets = [Target(None, None, square_mask(h, w, 30, 10 + 50 * i, 20), None, i) for i in range(3)]
    out = draw_overlay(np.zeros((h, w, 3), np.uint8), Prediction("", targets, (h, w)), alpha=1.0)
    for i in range(3):
        assert tuple(out[40, 20 + 50 * i]) == target_colour(i)


def test_label_is_drawn_and_scales_with_the_image():
    def changed_rows(size):
        image = grey(size, size)
        box = (size * 0.3, size * 0.5, size * 0.7, size * 0.9)
        out = draw_overlay(image, Prediction("", [Target("cup", box)], (size, size)))
        above_box = np.any(out[: int(size * 0.5) - 2] != image[: int(size * 0.5) - 2], axis=(1, 2))
        return above_box.sum()  # label height, in rows above the box

    small, large = changed_rows(64), changed_rows(2000)
    assert small >= 5         # readable on a thumbnail
    assert large > 5 * small  # and grows with the image


def test_label_without_room_above_stays_inside_the_image():
    image = grey(64, 64)
    out = draw_overlay(image, Prediction("", [Target("a very long phrase indeed", (40, 0, 64, 20))], (64, 64)))
    assert out.shape == image.shape
    assert np.any(out[:20, :] != image[:20, :])


def test_non_ascii_phrase_and_mask_only_label():
    image = grey()
    mask = square_mask(96, 128, 40, 40, 10)
    out = draw_overlay(image, Prediction("", [Target("tasse à café", None, mask)], (96, 128)))
    assert np.any(out[25:40, 40:80] != image[25:40, 40:80])  # label above the mask's box


def test_points_and_prompt_boxes():
    image = grey()
    empty = Prediction("", [], (96, 128))
    out = draw_overlay(image, empty, points=[[20, 20], [100, 70]], point_labels=[1, 0],
                       boxes=[[50, 10, 90, 40]])
    green, red = out[20, 20].astype(int), out[70, 100].astype(int)
    assert green[1] > 150 and green[0] < 100          # + is green
    assert red[0] > 150 and red[1] < 100              # - is red
    assert tuple(out[10, 70]) == (255, 255, 255)      # prompt box edge
    assert np.array_equal(out[60:64, 5:10], image[60:64, 5:10])
    # A background click is a horizontal bar: nothing drawn straight above it.
    assert np.array_equal(out[55:60, 100], image[55:60, 100])


@pytest.mark.parametrize("kwargs, match", [
    ({"points": [[1, 2, 3]]}, "N x 2"),
    ({"points": [[1, 2]], "point_labels": [1, 0]}, "labels"),
    ({"points": [[1, 2]], "point_labels": [5]}, "1 \\(foreground\\)"),
    ({"boxes": [[1, 2, 3]]}, "M x 4"),
])
def test_bad_prompts(kwargs, match):
    with pytest.raises(PromptError, match=match):
        draw_overlay(grey(), Prediction("", [], (96, 128)), **kwargs)


def test_image_must_match_prediction():
    with pytest.raises(ValueError, match="prediction is for"):
        draw_overlay(grey(10, 10), Prediction("", [], (96, 128)))
    with pytest.raises(ValueError, match="RGB uint8"):
        draw_overlay(np.zeros((96, 128), np.uint8), Prediction("", [], (96, 128)))


def test_save_image_png_exact_jpeg_close(tmp_path):
    rgb = np.zeros((12, 16, 3), np.uint8)
    rgb[..., 0] = 200  # red: catches an RGB/BGR swap
    rgb[3:6, 4:8] = (10, 220, 30)
    png = save_image(tmp_path / "a" / "b" / "o.png", rgb)
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), rgb)
    jpg = save_image(tmp_path / "o.JPG", rgb)
    back = np.asarray(Image.open(jpg).convert("RGB")).astype(int)
    assert Image.open(jpg).format == "JPEG"
    assert np.abs(back[10, 14] - [200, 0, 0]).max() <= 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "o.JPG"]  # no temporary files


def test_save_image_rejects_unknown_extension(tmp_path):
    with pytest.raises(ImageError, match=".png, .jpg"):
        save_image(tmp_path / "o.gif", np.zeros((2, 2, 3), np.uint8))
