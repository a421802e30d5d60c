"""Mask refinement (segdecoder/refine.py): GrabCut in a band around the outline moves a coarse mask onto the
object's edges, never further than the band, and leaves what it cannot refine as it was."""
from __future__ import annotations


import cv2
import numpy as np
import pytest
import torch

from segdecoder import MaskPrediction
from segdecoder.refine import band_pixels, refine_mask

def _scene(h=240, w=320, grey=False, colour=(200, 40, 40)):
    """A noisy two-tone background with a star (sharp corners, which a coarse grid rounds off) of ``colour``."""
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2] = (70, 110, 60)
    pixels[:, w // 2:] = (150, 140, 120)
    pts = []
    cx, cy = w * 0.45, h * 0.5
    for k in range(10):
        r = (0.25 if k % 2 else 0.1) * min(h, w)
        a = k * np.pi / 5
        pts.append((cx + r * np.cos(a), cy + r * np.sin(a)))
    truth = np.zeros((h, w), np.uint8)
    cv2.fillPoly(truth, [np.round(pts).astype(np.int32)], 1)
    pixels[truth.astype(bool)] = colour
    noise = np.random.default_rng(0).integers(-12, 13, pixels.shape)
    pixels = np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    if grey:
        pixels = np.repeat(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    return pixels, truth.astype(bool)


def _coarse(truth, cell=8):
    """What a decoder with ``cell``-pixel logits gives: the mask averaged over cells, upsampled bilinearly."""
    h, w = truth.shape
    small = cv2.resize(truth.astype(np.float32), (w // cell, h // cell), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("grey", [False, True])
def test_a_coarse_mask_moves_onto_the_objects_edges(grey):
    pixels, truth = _scene(grey=grey, colour=(240, 230, 60))    # light yellow: also stands out in grey
    coarse = _coarse(truth, cell=12)
    band = band_pixels(320, 320 // 12)     # a 320-px region on a 26-cell grid: an 18-px band
    refined = refine_mask(pixels, coarse, band)
    assert _iou(coarse, truth) < 0.9
    assert _iou(refined, truth) > 0.97
    # nothing further than the band from the decoded outline changed
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    core = cv2.erode(coarse.astype(np.uint8), k, borderType=cv2.BORDER_REPLICATE).astype(bool)
    far = ~cv2.dilate(coarse.astype(np.uint8), k).astype(bool)
    assert refined[core].all() and not refined[far].any()


def test_an_object_the_colour_of_its_surroundings_keeps_its_decoded_mask():
    # in grey, the red star is the grey of the left half of the background: colour cannot tell them apart there
    pixels, truth = _scene(grey=True, colour=(200, 40, 40))
    coarse = _coarse(truth)
    assert np.array_equal(refine_mask(pixels, coarse, band_pixels(320, 40)), coarse)


def test_a_huge_image_is_refined_on_a_shrunk_window():
    pixels, truth = _scene(h=1800, w=2400)
    coarse = _coarse(truth, cell=80)
    refined = refine_mask(pixels, coarse, band_pixels(2400, 2400 // 80))   # GrabCut reads 384 x 288 pixels
    assert _iou(coarse, truth) < 0.9 and _iou(refined, truth) > 0.95


def test_what_cannot_be_refined_is_returned_as_is():
    pixels, _ = _scene()
    empty = np.zeros(pixels.shape[:2], bool)
    assert not refine_mask(pixels, empty, 4).any()
    speck = empty.copy()
    speck[100:103, 100:103] = True                 # no interior once the band is taken off
    assert np.array_equal(refine_mask(pixels, speck, 4), speck)
    everything = ~empty                            # no surroundings to learn the background from
    assert refine_mask(pixels, everything, 4).all()


def test_the_band_is_one_and_a_half_cells_of_the_decoders_grid():
    assert band_pixels(256, 64) == 6 and band_pixels(1024, 256) == 6 and band_pixels(100, 64) == 2


class _CoarseDecoder:
    """A stand-in decoder that answers every prompt with the coarse mask of ``truth`` (8-px cells)."""

    def __init__(self, truth):
        self.truth = truth

    def decode(self, embedding, boxes=None, **_):
        n = len(boxes)
        return MaskPrediction(np.repeat(_coarse(self.truth)[None], n, 0), np.ones(n, np.float32),
                              torch.zeros(n, 40, 40))


def test_the_refine_add_on_refines_the_decoded_masks():
    from grounding.addons import MaskContext, build_addons

    pixels, truth = _scene()
    dec = _CoarseDecoder(truth)
    box = torch.tensor([[0.0, 0.0, 320.0, 240.0]])
    plain = dec.decode(None, boxes=box)
    step, = build_addons({"mask_refine": {"method": "grabcut"}})
    refined = step.refine(plain, MaskContext(dec, None, pixels, {"boxes": box}, "answer", {}))
    assert np.array_equal(plain.masks[0], _coarse(truth))
    assert _iou(refined.masks[0], truth) > 0.95


def test_the_setting_is_checked():
    from grounding.addons import build_addons
    from grounding.errors import CheckpointError

    with pytest.raises(CheckpointError, match="mask_refine"):
        build_addons({"mask_refine": {"method": "sharpen"}})


def test_grabcut_reads_a_bounded_window_however_large_the_image(monkeypatch):
    """A 12-megapixel image's mask is refined with GrabCut reading at most _WORK_SIDE pixels a side, and the cut,
    brought back to full size along the object's edges, still lands on them."""
    import segdecoder.refine as refine

    read = []
    grabcut = cv2.grabCut

    def spy(image, *args):
        read.append(image.shape[:2])
        return grabcut(image, *args)
    monkeypatch.setattr(refine.cv2, "grabCut", spy)
    pixels, truth = _scene(h=3000, w=4000)
    coarse = _coarse(truth, cell=128)
    band = band_pixels(4000, 4000 // 128)                  # 194 px
    refined = refine_mask(pixels, coarse, band)
    assert read and max(max(shape) for shape in read) <= refine._WORK_SIDE
    assert _iou(coarse, truth) < 0.92 and _iou(refined, truth) > 0.97
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    core = cv2.erode(coarse.astype(np.uint8), k, borderType=cv2.BORDER_REPLICATE).astype(bool)
    far = ~cv2.dilate(coarse.astype(np.uint8), k).astype(bool)
    assert refined[core].all() and not refined[far].any()


def test_a_masks_refinement_depends_on_it_alone():
    """GrabCut's random start is seeded per mask: refining other masks first (as a grouped evaluation does) does
    not change a mask's result, and several masks refined together (on a thread pool) equal each refined alone."""
    from segdecoder.refine import refine_masks

    pixels, truth = _scene()
    masks = np.stack([_coarse(truth, cell=c) for c in (6, 8, 12)])
    sides, grid = np.array([320.0, 320.0, 320.0]), 40
    alone = [refine_mask(pixels, m, band_pixels(320, grid)) for m in masks]
    together = refine_masks(pixels, masks, sides, grid)
    again = refine_mask(pixels, masks[0], band_pixels(320, grid))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))
    assert np.array_equal(again, alone[0])
    assert not np.array_equal(alone[0], masks[0])      # it did refine


def test_a_mask_that_occurs_again_with_the_same_band_is_refined_once(monkeypatch):
    """An image's questions often decode to the same mask: each distinct (mask, band) is refined once, every copy
    gets its result, and a mask decoded from a region of another size (another band) is refined on its own."""
    import segdecoder.refine as refine

    pixels, truth = _scene()
    a, b = _coarse(truth, cell=6), _coarse(truth, cell=12)
    masks = np.stack([a, b, a, a, b, a])
    sides, grid = np.array([320.0, 320.0, 320.0, 320.0, 320.0, 160.0]), 40
    calls = []
    monkeypatch.setattr(refine, "refine_mask",
                        lambda p, m, band, interior: calls.append(band) or refine_mask(p, m, band, interior))
    together = refine.refine_masks(pixels, masks, sides, grid)
    assert len(calls) == 3 and sorted(calls) == sorted([band_pixels(320, grid)] * 2 + [band_pixels(160, grid)])
    for mask, side, out in zip(masks, sides, together):
        assert np.array_equal(out, refine_mask(pixels, mask, band_pixels(side, grid)))
    assert not np.array_equal(together[0], together[5])   # the narrower band moved the outline less
    together[0][:] = False
    assert together[2].any()                              # copies, not views of one another


def _covered_scene(h=240, w=320):
    """A red square on a noisy two-tone ground, partly under a disc of the ground's right-hand colour that lies on
    it and reaches past it, and holding a hole that shows the left-hand ground. Returns (pixels, what shows of the
    square, the whole square: what a decoder that completes the shape gives)."""
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2], pixels[:, w // 2:] = (70, 110, 60), (150, 140, 120)
    square = np.zeros((h, w), bool)
    square[h // 4: 3 * h // 4, w // 4: w // 4 + h // 2] = True
    disc = np.zeros((h, w), np.uint8)
    cv2.circle(disc, (w // 4 + h // 2, h // 2), h // 6, 1, -1)
    hole = np.zeros((h, w), np.uint8)
    cv2.circle(hole, (w // 4 + h // 8, h // 2), h // 12, 1, -1)
    shows = square & ~disc.astype(bool) & ~hole.astype(bool)
    pixels[shows] = (200, 40, 40)
    pixels[disc.astype(bool)] = (150, 140, 120)
    noise = np.random.default_rng(0).integers(-12, 13, pixels.shape)
    return np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8), shows, square


@pytest.mark.parametrize("h, w", [(240, 320), (1800, 2400)])
def test_the_inside_pass_takes_off_what_lies_on_the_object(h, w):
    """The band pass cannot touch a mask's core, so a mask that covers an occluder or a hole keeps them; the inside
    pass gives them to the background (also on a large image, read on a shrunk window) and moves the outline by
    about a working pixel at most."""
    pixels, shows, square = _covered_scene(h, w)
    band = band_pixels(w, 64)
    edges_only = refine_mask(pixels, square, band)
    inside = refine_mask(pixels, square, band, interior=True)
    assert _iou(edges_only, shows) < 0.85
    assert _iou(inside, shows) > 0.97
    grown = cv2.dilate(square.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert not inside[~grown].any()


def test_the_inside_pass_keeps_an_object_the_colour_of_its_surroundings():
    pixels, truth = _scene(grey=True, colour=(200, 40, 40))
    coarse = _coarse(truth)
    assert np.array_equal(refine_mask(pixels, coarse, band_pixels(320, 40), interior=True), coarse)


def test_the_refine_add_on_reads_the_inside_where_its_setting_says():
    from grounding.addons import MaskContext, build_addons

    pixels, shows, square = _covered_scene()
    box = torch.tensor([[0.0, 0.0, 320.0, 240.0]])
    decoded = MaskPrediction(square[None].copy(), np.ones(1, np.float32), torch.zeros(1, 64, 64))
    ctx = MaskContext(None, None, pixels, {"boxes": box}, "answer", {})
    for interior, low, high in ((False, 0.0, 0.85), (True, 0.97, 1.0)):
        step, = build_addons({"mask_refine": {"method": "grabcut", "interior": interior}})
        assert low < _iou(step.refine(decoded, ctx).masks[0], shows) <= high


def _fitted_trimap(pixels, mask, radius=6):
    """GrabCut's trimap for ``mask`` (sure core, a ``radius``-px strip to decide, sure surroundings) on ``pixels``
    (as GrabCut reads them: BGR) and colour models fitted on it."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    outer = cv2.dilate(mask.view(np.uint8), k).astype(bool)
    trimap = np.full(mask.shape, cv2.GC_BGD, np.uint8)
    trimap[outer] = cv2.GC_PR_BGD
    trimap[mask] = cv2.GC_PR_FGD
    trimap[cv2.erode(mask.view(np.uint8), k).astype(bool)] = cv2.GC_FGD
    background, foreground = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)
    cv2.grabCut(pixels, trimap.copy(), None, background, foreground, 2, cv2.GC_INIT_WITH_MASK)
    return trimap, outer, foreground, background


def test_the_cut_on_the_box_of_the_undecided_pixels_decides_them_as_on_the_whole_window(monkeypatch):
    """The graph cut reads only the box around the strip it decides (grown by _CUT_MARGIN) and decides that strip
    as a cut over the whole window does (only the contrast scale, measured on fewer pixels, differs)."""
    import segdecoder.refine as refine

    pixels, truth = _scene(h=400, w=560)
    pixels = np.ascontiguousarray(pixels[..., ::-1])
    coarse = _coarse(truth, cell=12)
    trimap, outer, foreground, background = _fitted_trimap(pixels, coarse)
    whole = trimap.copy()
    cv2.grabCut(pixels, whole, None, background.copy(), foreground.copy(), 1, cv2.GC_EVAL_FREEZE_MODEL)
    read = []
    grabcut = cv2.grabCut
    monkeypatch.setattr(refine.cv2, "grabCut", lambda image, *a: read.append(image.shape[:2]) or grabcut(image, *a))
    part = trimap.copy()
    refine._cut(pixels, part, outer, foreground, background)
    x, y, w, h = cv2.boundingRect(outer.view(np.uint8))
    assert read == [(h + 2 * refine._CUT_MARGIN, w + 2 * refine._CUT_MARGIN)]
    assert read[0][0] * read[0][1] < 0.5 * pixels.shape[0] * pixels.shape[1]
    side = lambda t: (t == cv2.GC_FGD) | (t == cv2.GC_PR_FGD)
    assert (side(part) != side(whole))[outer].mean() < 0.01
    assert _iou(side(part), truth) > 0.95
    assert np.array_equal(part[~outer], trimap[~outer])    # sure pixels keep their labels


def test_the_cut_is_brought_to_full_size_as_a_whole_window_resize_would():
    """Only the strip's box is scaled up, with the coordinates a resize of the whole window uses: the pixels it
    writes are those a whole-window resize writes (up to interpolation rounding), and nothing outside the strip."""
    from segdecoder.refine import _upsample_cut

    pixels, truth = _scene(h=1500, w=2000)
    work_size = (384, 288)
    small = np.ascontiguousarray(cv2.resize(pixels, work_size, interpolation=cv2.INTER_AREA)[..., ::-1])
    small_truth = cv2.resize(truth.view(np.uint8), work_size, interpolation=cv2.INTER_NEAREST).astype(bool)
    trimap, outer, foreground, background = _fitted_trimap(small, _coarse(small_truth, cell=6), radius=4)
    cut = cv2.dilate(small_truth.view(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)   # a cut to scale up
    strip = outer & ~cv2.erode(outer.view(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    out = np.zeros(truth.shape, bool)
    _upsample_cut(cut, strip, pixels, foreground, background, out)
    # the whole-window way
    soft = cv2.resize(cut.view(np.uint8) * np.uint8(255), (2000, 1500), interpolation=cv2.INTER_LINEAR)
    big_strip = cv2.resize(strip.view(np.uint8), (2000, 1500), interpolation=cv2.INTER_NEAREST).astype(bool)
    expected = np.zeros(truth.shape, bool)
    np.copyto(expected, soft >= 128, where=big_strip)
    sure = big_strip & ((soft == 0) | (soft == 255))
    assert (out != expected)[sure].mean() < 1e-3
    assert not out[~big_strip].any()


def test_many_colours_are_judged_by_their_cell_of_the_colour_grid():
    """Past _LOOKUP_FROM colours, each is judged at the centre of its 8-level cell: the same answer as judging the
    centres one by one."""
    import segdecoder.refine as refine

    pixels, truth = _scene()
    trimap, outer, foreground, background = _fitted_trimap(np.ascontiguousarray(pixels[..., ::-1]), _coarse(truth))
    colours = np.random.default_rng(1).integers(0, 256, (refine._LOOKUP_FROM + 5000, 3)).astype(np.uint8)
    centres = (colours >> 3).astype(np.float64) * 8 + 4
    expected = (refine._gmm_log_likelihood(foreground, centres) > refine._gmm_log_likelihood(background, centres))
    assert np.array_equal(refine._foreground_wins(foreground, background, colours), expected)
    assert 0.05 < expected.mean() < 0.95


def test_a_grayscale_image_gets_no_inside_pass():
    """The yellow disc of examples/shapes.png in its black outline, next to a square of its grey level once the image
    is grey, with a mask a little larger than both: the inside pass would take the disc's fill for what lies on it
    and keep about a tenth of the mask. Grey images get the outline pass only; their colour original gets both."""
    from segdecoder.refine import refine_masks
    from grounding.images import load_image

    colour = load_image("examples/shapes.png")
    grey = np.repeat(np.round(colour @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None], 3, axis=2)
    disc = np.zeros(colour.shape[:2], np.uint8)
    cv2.circle(disc, (209, 148), 46, 1, -1)
    masks = disc.astype(bool)[None]
    both = refine_masks(grey, masks, np.array([80.0]), 64, interior=True)
    outline = refine_masks(grey, masks, np.array([80.0]), 64, interior=False)
    assert np.array_equal(both, outline) and both.sum() > 0.8 * masks.sum()
    assert not np.array_equal(refine_masks(colour, masks, np.array([80.0]), 64, interior=True),
                              refine_masks(colour, masks, np.array([80.0]), 64, interior=False))
