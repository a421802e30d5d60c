"""Zoomed decoding (segdecoder/zoom.py): the crop window, and that prompts and masks cross between image and crop
coordinates without a pixel's shift."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from segdecoder import ImageEmbedding, MaskPrediction
from segdecoder.zoom import decode_zoomed, zoom_window


class _RectDecoder:
    """A stand-in decoder that segments exactly its box prompt, or a 9x9 square around its first click, in the
    coordinates of the image it encoded; it records the shapes of the images it encodes."""

    def __init__(self):
        self.encoded: list[tuple[int, int]] = []
        self.decoded: list[int] = []    # prompts per decode call

    def encode(self, images):
        self.encoded += [im.shape[:2] for im in images]
        return [ImageEmbedding(torch.zeros(1, 1, 1, 1), im.shape[:2], im.shape[:2]) for im in images]

    def decode(self, embedding, seg_embeddings=None, points=None, point_labels=None, boxes=None, multimask=False,
               threshold=0.0):
        H, W = embedding.original_size
        n = len(boxes) if boxes is not None else len(points)
        self.decoded.append(n)
        masks = np.zeros((n, H, W), bool)
        for i in range(n):
            if boxes is not None:
                x1, y1, x2, y2 = (int(round(v)) for v in boxes[i].tolist())
            else:
                x, y = (int(v) for v in points[i, 0].tolist())
                x1, y1, x2, y2 = x - 4, y - 4, x + 5, y + 5
            masks[i, max(0, y1):y2, max(0, x1):x2] = True
        return MaskPrediction(masks, np.full(n, 0.5 if embedding.original_size == (300, 400) else 0.9, np.float32),
                              torch.zeros(n, 4, 4))


def test_window_is_a_square_of_context_times_the_box_side_clipped_to_the_image():
    assert zoom_window([100, 120, 130, 140], (300, 400), 3.0) == (70, 85, 160, 175)   # side 90 around (115, 130)
    assert zoom_window([0, 0, 20, 10], (300, 400), 3.0) == (0, 0, 40, 35)             # clipped at the corner
    assert zoom_window([50, 50, 350, 250], (300, 400), 3.0) is None                   # would be the whole image


def test_box_and_click_masks_land_on_the_same_pixels_as_without_zoom():
    pixels = np.zeros((300, 400, 3), np.uint8)
    dec = _RectDecoder()
    whole = dec.encode([pixels])[0]
    boxes = torch.tensor([[100.0, 120.0, 130.0, 140.0], [10.0, 20.0, 390.0, 290.0]])
    first = dec.decode(whole, boxes=boxes)
    zoomed, crops = decode_zoomed(dec, pixels, first, 3.0, boxes=boxes)
    assert crops == 1 and np.array_equal(zoomed.masks, first.masks)
    assert dec.encoded[1:] == [(90, 90)]                  # only the small box got a crop; the large one kept its mask
    assert zoomed.scores.tolist() == pytest.approx([0.9, 0.5])
    assert zoomed.region_sides.tolist() == [90, 400]    # what each mask was decoded from: the crop, the image

    points = torch.tensor([[[200.0, 150.0]]])
    first = dec.decode(whole, points=points, point_labels=torch.ones(1, 1, dtype=torch.long))
    zoomed, _ = decode_zoomed(dec, pixels, first, 3.0, points=points, point_labels=torch.ones(1, 1, dtype=torch.long))
    assert dec.encoded[-1] == (27, 27)                    # the window comes from the first mask's 9x9 box
    assert np.array_equal(zoomed.masks, first.masks)


def test_a_click_off_its_first_mask_stays_inside_the_crop():
    """A background click far from the mask (the default model's demo clicks did this) widens the window instead of
    falling outside the crop ("a point lies outside the image" before)."""
    pixels = np.zeros((300, 400, 3), np.uint8)
    dec = _RectDecoder()
    first = MaskPrediction(np.zeros((1, 300, 400), bool), np.ones(1, np.float32), torch.zeros(1, 4, 4))
    first.masks[0, 100:109, 100:109] = True                       # the mask lies away from the click at (160, 130)
    points = torch.tensor([[[160.0, 130.0]]])
    zoomed, crops = decode_zoomed(dec, pixels, first, 3.0, points=points, point_labels=torch.ones(1, 1, dtype=torch.long))
    assert crops == 1 and dec.encoded[-1] == (180, 180)           # box (100, 100, 160, 130) grown: side 3 x 60
    assert zoomed.masks[0, 126:135, 156:165].all() and zoomed.masks[0].sum() == 81   # the click's square, pasted back


def test_prompts_that_share_a_crop_are_decoded_together():
    """Several [SEG]s of one image on the same object (one window): one crop encoded, one decoder call for all of
    them, each mask pasted where it belongs; a prompt on another object gets its own crop and call."""
    pixels = np.zeros((300, 400, 3), np.uint8)
    dec = _RectDecoder()
    whole = dec.encode([pixels])[0]
    boxes = torch.tensor([[100.0, 120.0, 130.0, 140.0], [250.0, 30.0, 270.0, 60.0], [100.0, 120.0, 130.0, 140.0]])
    first = dec.decode(whole, boxes=boxes)
    dec.decoded.clear()
    zoomed, crops = decode_zoomed(dec, pixels, first, 3.0, boxes=boxes)
    assert crops == 2 and sorted(dec.decoded) == [1, 2]
    assert np.array_equal(zoomed.masks, first.masks)
    assert zoomed.region_sides.tolist() == [90, 90, 90]


def test_an_empty_first_mask_is_kept_without_encoding():
    pixels = np.zeros((300, 400, 3), np.uint8)
    dec = _RectDecoder()
    first = MaskPrediction(np.zeros((1, 300, 400), bool), np.zeros(1, np.float32), torch.zeros(1, 4, 4))
    out, crops = decode_zoomed(dec, pixels, first, 3.0, points=torch.tensor([[[5.0, 5.0]]]))
    assert out is first and crops == 0 and dec.encoded == []


def test_the_setting_is_checked():
    from grounding.addons import build_addons
    from grounding.errors import CheckpointError

    with pytest.raises(CheckpointError, match="mask_zoom"):
        build_addons({"mask_zoom": {"context": 0.5}})
    assert build_addons({"mask_zoom": {"context": 3.0}})[0].settings.context == 3.0
