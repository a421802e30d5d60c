"""Edge refinement of decoded masks: OpenCV's GrabCut re-decides the pixels of a band around each mask's outline.

A SAM-style decoder predicts logits on a grid of ``S/4`` cells over the square it read (64 for SAM ``tiny``'s 256-px
input, 256 for the official 1024-px models) and upsamples them bilinearly, so an outline is only placed to about one
cell: corners come back rounded and straight edges wander. GrabCut fits colour models (Gaussian mixtures) of the
object and its surroundings and cuts along image edges. It is given a trimap built from the decoded mask: pixels
further than ``band`` inside the outline are object, further than ``band`` outside are background, and only the band
between is re-decided, so the refinement can move the outline by at most ``band`` pixels and cannot add or drop an
object. The band is 1.5 cells of the grid the mask was decoded on (``band_pixels``). A second pass (``interior``)
re-decides the mask's inside, where a decoder that completes shapes leaves what lies on the object.

It pays where the decoder's grid is coarse next to the object and objects differ from their surroundings in colour,
as with SAM ``tiny`` on the default model's synthetic scenes (measured in weights/shapes-tiny/MODEL_CARD.md). It
is the ``mask_refine`` add-on (grounding/addons/masks.py), off unless a model's ``groundseg.json`` names it: it is
not measured with the official SAM / SAM2 checkpoints, whose 4-px cells on real photos leave little to gain and
whose camouflaged or low-contrast objects give colour models little to hold.

Cost is bounded per mask, whatever the image's size. GrabCut's price is per pixel it reads (a k-means start and a
graph over every pixel, each pass), so it works in two steps: the colour models are fitted (GrabCut's k-means start
and 2 rounds of cut and refit) on the window around the mask sampled down to at most 128 pixels a side, then one
graph cut with those models kept runs on the window at most 384 pixels a side, cut to the box of the pixels it
decides. Where the window was shrunk, the cut is brought back to full size inside the band only, the pixels
within a working pixel of its outline taking the side whose colour model fits them. On the default model's val
split this gives the cIoU / gIoU of the former single GrabCut of 3 rounds on the 384-px window (within 0.1 point)
at under half its time, and on a 12-megapixel image about 0.1 s instead of 3-15 s (benchmarks/mask_refine.py,
benchmarks/RESULTS.md).
"""
from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

MASK_REFINERS = ("grabcut",)

# The cut reads the window at most this many pixels a side (shrunk first), and the colour models are fitted on it
# sampled down to at most _MODEL_SIDE a side, in _MODEL_ITERATIONS rounds. On the default model's val split
# (teacher-forced, cIoU / gIoU against 75.26 / 81.17 for the fitting on the 384-px window in 3 rounds): models on
# 128 px in 2 rounds 75.16 / 81.11, 1 round 75.11 / 81.00, the k-means start alone 75.04 / 80.93; on 96 px in 2
# rounds 75.05 / 81.02, on 64 px 74.87 / 80.78; the cut on 256 px 75.00 / 81.06.
_WORK_SIDE = 384
_MODEL_SIDE = 128
_MODEL_ITERATIONS = 2
_BAND_CELLS = 1.5
# GrabCut fits two 5-component Gaussian mixtures in colour (50 numbers each): a mask whose core, the band taken off,
# holds fewer pixels than this (3 per number) is kept as decoded (on the default model's 64 x 96 test clips such
# cuts lost 11-px shapes)
_MIN_CORE_PIXELS = 150
# the colour models must put this share of the known pixels on the right side (_colours_separate), judged on at
# most _SEPARATION_SAMPLES pixels of each side (an even spread of them)
_MIN_SEPARATION = 0.9
_SEPARATION_SAMPLES = 1024
# with ``interior``, the part of the mask the cut keeps and the far surroundings, judged after the cut (the default
# model's val masks re-refined: cIoU 74.9 -> 76.6 at this level as without the judgement, 76.3 at 0.9)
_MIN_KEPT_SEPARATION = 0.8
# the graph cut runs on the box of the pixels it decides grown by this many working pixels (on the default model's
# val split, teacher-forced cIoU / gIoU 76.32 / 82.52 on the whole window; 76.22 / 82.19 with 1 pixel, 76.45 /
# 82.33 with 4, 76.47 / 82.43 with 8, 76.50 / 82.55 with 16), at about half the cut's cost
_CUT_MARGIN = 16
# more colours than this to test are looked up in a table (_foreground_wins)
_LOOKUP_FROM = 16384
# GrabCut's k-means start draws from OpenCV's per-thread random generator: seeded before each cut, a mask's
# refinement depends on its inputs alone, not on what was refined before it (grouped and one-at-a-time evaluation
# then agree)
_SEED = 0


def band_pixels(region_side: float, grid: int) -> int:
    """Band half-width in pixels for a mask decoded from a region ``region_side`` pixels across (its longest
    side) on a ``grid`` x ``grid`` logit grid: 1.5 grid cells, at least 2 pixels."""
    return max(2, int(round(_BAND_CELLS * region_side / grid)))


def refine_mask(pixels: np.ndarray, mask: np.ndarray, band: int, interior: bool = False) -> np.ndarray:
    """GrabCut on the ``band``-pixel strip either side of ``mask``'s outline; then, with ``interior``, on the whole
    mask and a ring of one working pixel around it.

    ``pixels``: uint8 ``H x W x 3`` RGB; ``mask``: bool ``H x W``. Returns a new bool ``H x W`` mask that equals
    ``mask`` outside the strip. A mask whose core (the strip taken off) is under ``_MIN_CORE_PIXELS``, or that leaves
    no surroundings, is returned unchanged. With ``interior`` the mask's inside is re-decided: what lies on the
    object in another colour (an occluding object, what shows through a ring's hole) goes to the background when
    the surroundings' colours explain it better than the object's; the outline moves by one working pixel at most,
    and a cut that keeps none of the mask, or whose kept part its colour models cannot tell from the far
    surroundings, returns it unchanged. The outline wants the wide strip and the inside a narrow ring (the inside
    re-decided together with the strip gained half as much: weights/shapes-tiny/MODEL_CARD.md, v12.1), hence
    two passes, on one window shrunk once.

    Cost: GrabCut reads the window around the mask shrunk to at most ``_WORK_SIDE`` pixels a side; only resizing
    and a per-pixel colour test on the strip's pixels grow with the image.
    """
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return mask
    H, W = mask.shape
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    # the window: the mask's box, grown by the band and by half the box side, which gives GrabCut's background
    # model a ring of surroundings (both passes read it: the outline moves by at most ``band``)
    pad = 2 * band + max(x1 - x0, y1 - y0) // 2
    left, top = max(0, x0 - pad), max(0, y0 - pad)
    right, bottom = min(W, x1 + 1 + pad), min(H, y1 + 1 + pad)
    window = pixels[top:bottom, left:right]
    scale = min(1.0, _WORK_SIDE / max(window.shape[:2]))
    size = (max(1, round(window.shape[1] * scale)), max(1, round(window.shape[0] * scale)))   # (w, h) GrabCut reads
    image = np.ascontiguousarray((window if scale == 1.0 else cv2.resize(window, size, interpolation=cv2.INTER_AREA))
                                 [..., ::-1])   # OpenCV's BGR, shrunk once for both passes
    out = mask.copy()
    for inside in (False, True) if interior else (False,):
        _refine_pass(image, window, out[top:bottom, left:right], scale, band, inside)
    return out


def _refine_pass(image: np.ndarray, window: np.ndarray, view: np.ndarray, scale: float, band: int,
                 inside: bool) -> None:
    """One GrabCut pass of ``refine_mask`` on its window (``window`` uint8 RGB at full size, ``image`` the same as
    GrabCut reads it: BGR, shrunk by ``scale``), writing into ``view`` (bool, the mask's window, changed in place):
    the ``band`` strip along the outline, or (``inside``) the whole mask and a ring of one working pixel. A pass
    that cannot be made leaves ``view`` as it was."""
    if scale == 1.0:
        work, radius = view.astype(np.uint8), 1 if inside else band
    else:
        # the mask at the working size by area (rounded: a pixel half covered is in), and a band one working
        # pixel and a half narrower, so that what the strip brings back to full size stays within ``band`` of
        # the outline
        work = cv2.resize(view.view(np.uint8), image.shape[1::-1], interpolation=cv2.INTER_AREA)
        radius = 1 if inside else int(band * scale - 1.5)
    if radius < 1:
        return   # the band is under a working pixel: nothing GrabCut could move
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    inner = cv2.erode(work, kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)
    outer = cv2.dilate(work, kernel).astype(bool)
    if inner.sum() / scale ** 2 < _MIN_CORE_PIXELS or outer.all():
        return
    decoded = work.astype(bool)
    trimap = np.full(work.shape, cv2.GC_BGD, np.uint8)
    trimap[outer] = cv2.GC_PR_BGD
    trimap[decoded] = cv2.GC_PR_FGD
    if not inside:
        trimap[inner] = cv2.GC_FGD
    # 1. the colour models: GrabCut's own fitting (a k-means start, then cuts and refits) on the window shrunk
    #    to at most _MODEL_SIDE pixels a side by taking every k-th pixel, which keeps the colours as they are
    #    (averaging would blend textures and edges into colours the image does not have)
    model_scale = min(1.0, _MODEL_SIDE / max(work.shape))
    if model_scale == 1.0:
        small_image, small_trimap, core = image, trimap.copy(), inner
    else:
        small_size = (max(1, round(work.shape[1] * model_scale)), max(1, round(work.shape[0] * model_scale)))
        small_image = cv2.resize(image, small_size, interpolation=cv2.INTER_NEAREST)
        small_trimap = cv2.resize(trimap, small_size, interpolation=cv2.INTER_NEAREST)
        core = cv2.resize(inner.view(np.uint8), small_size, interpolation=cv2.INTER_NEAREST).view(bool)
    far = small_trimap == cv2.GC_BGD
    if not core.any() or not far.any():
        return   # too small once shrunk, or no surroundings to learn the background from
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(_SEED)
    cv2.grabCut(small_image, small_trimap, None, background, foreground, _MODEL_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    # (the inside of a mask holds what lies on the object too: there the part the cut keeps is judged instead)
    if not inside and not _colours_separate(small_image, core, far, foreground, background):
        return
    # 2. the cut, with the models as fitted: one graph cut at the working size, on the part of the window around
    #    the pixels it decides
    surroundings = trimap == cv2.GC_BGD
    _cut(image, trimap, outer, foreground, background)
    cut = (trimap == cv2.GC_FGD) | (trimap == cv2.GC_PR_FGD)
    if inside:
        kept, changed = cut & decoded, cut != decoded
        if not (changed.any() and kept.any() and
                _colours_separate(image, kept, surroundings, foreground, background, _MIN_KEPT_SEPARATION)):
            return
        # only where the cut changed something (and a working pixel around it) is brought back to full size
        strip = cv2.dilate(changed.view(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & outer
    else:
        strip = outer & ~inner
    # the strip takes GrabCut's answer; the object's core and the far surroundings stay as they were
    if scale == 1.0:
        np.copyto(view, cut, where=strip)
    else:
        _upsample_cut(cut, strip, window, foreground, background, view)


def _cut(image: np.ndarray, trimap: np.ndarray, decided: np.ndarray, foreground: np.ndarray,
         background: np.ndarray) -> None:
    """GrabCut's graph cut with its colour models kept, written into ``trimap`` (uint8 ``h x w``, GrabCut's labels),
    on ``image`` (BGR ``h x w x 3``) cut to the box of ``decided`` (bool ``h x w``: where the trimap is not sure)
    grown by ``_CUT_MARGIN``. The pixels beyond are sure background or object either way (GrabCut ties a sure
    pixel to its side more strongly than its neighbours can pull it), so the cut decides the same pixels for a
    fraction of the graph; only its contrast scale (the mean colour step between neighbours) is measured on the
    smaller part."""
    x, y, w, h = cv2.boundingRect(decided.view(np.uint8))
    top, left = max(0, y - _CUT_MARGIN), max(0, x - _CUT_MARGIN)
    bottom, right = min(trimap.shape[0], y + h + _CUT_MARGIN), min(trimap.shape[1], x + w + _CUT_MARGIN)
    part = np.ascontiguousarray(trimap[top:bottom, left:right])
    cv2.grabCut(np.ascontiguousarray(image[top:bottom, left:right]), part, None, background, foreground, 1,
                cv2.GC_EVAL_FREEZE_MODEL)
    trimap[top:bottom, left:right] = part


def _upsample_cut(cut: np.ndarray, strip: np.ndarray, window: np.ndarray, foreground: np.ndarray,
                  background: np.ndarray, out: np.ndarray) -> None:
    """Write GrabCut's answer on a shrunk window (bool ``cut``, in the ``strip``; ``h x w``) into ``out``, the mask
    at the size of ``window`` (uint8 ``H x W x 3`` RGB). Pixels more than a working pixel from the cut's outline
    take its side; those closer, where the shrunk cut cannot say, take the side whose colour model (GrabCut's
    fitted ``foreground`` / ``background``) explains their full-size colour better. Only the strip's box is
    brought to full size and only those pixels are tested, so that cost grows with the strip, not the window."""
    H, W = window.shape[:2]
    h, w = cut.shape
    x, y, bw, bh = cv2.boundingRect(strip.view(np.uint8))
    if not bw:
        return
    # the full-size pixels of the strip's box: working pixel j covers full-size pixels j * W / w .. (j + 1) * W / w
    left, right = x * W // w, min(W, -(-(x + bw) * W // w))
    top, bottom = y * H // h, min(H, -(-(y + bh) * H // h))
    # as cv2.resize would scale the whole window: bilinear reads working coordinate (X + 0.5) * w / W - 0.5 for
    # full-size column X, nearest reads working column floor(X * w / W)
    to_working = np.float64([[w / W, 0, (left + 0.5) * w / W - 0.5], [0, h / H, (top + 0.5) * h / H - 0.5]])
    soft = cv2.warpAffine(cut.view(np.uint8) * np.uint8(255), to_working, (right - left, bottom - top),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    big_strip = strip[np.ix_(np.arange(top, bottom) * h // H, np.arange(left, right) * w // W)]
    region = out[top:bottom, left:right]
    np.copyto(region, soft >= 128, where=big_strip)
    unsure = cv2.findNonZero(cv2.inRange(soft, 1, 254) & big_strip.view(np.uint8))   # xy per pixel, or None
    if unsure is not None:
        xs, ys = unsure.reshape(-1, 2).T
        region[ys, xs] = _foreground_wins(foreground, background, window[top + ys, left + xs][:, ::-1])


def _foreground_wins(foreground: np.ndarray, background: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Bool ``[P]``: whether GrabCut's ``foreground`` colour model explains each of ``colours`` (uint8 ``[P, 3]``
    BGR) better than its ``background`` one. Many colours are binned on a 32 x 32 x 32 grid of colours (8 levels a
    cell) and the models compared once per occupied cell, at its centre."""
    if len(colours) < _LOOKUP_FROM:
        c = colours.astype(np.float64)
        return _gmm_log_likelihood(foreground, c) > _gmm_log_likelihood(background, c)
    cells = colours >> 3
    codes = (cells[:, 0].astype(np.int32) << 10) | (cells[:, 1].astype(np.int32) << 5) | cells[:, 2]
    occupied = np.flatnonzero(np.bincount(codes, minlength=1 << 15))
    centres = np.stack([occupied >> 10, (occupied >> 5) & 31, occupied & 31], 1) * 8.0 + 4.0
    table = np.zeros(1 << 15, bool)
    table[occupied] = _gmm_log_likelihood(foreground, centres) > _gmm_log_likelihood(background, centres)
    return table[codes]


def _gmm_log_likelihood(model: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Log-likelihood of ``colours`` ``[P, 3]`` under one of GrabCut's fitted colour models: OpenCV stores a
    5-component Gaussian mixture as 65 numbers, the 5 weights, then the 5 means (3 each), then the 5 covariances
    (3 x 3 each, row-major)."""
    k = 5
    weights, means, covs = model[0, :k], model[0, k:4 * k].reshape(k, 3), model[0, 4 * k:].reshape(k, 3, 3)
    covs = covs + 1e-2 * np.eye(3)   # as OpenCV regularises a singular covariance
    # the five inverses and determinants in one call each (the same LAPACK work per matrix as one by one)
    inverses, log_dets = np.linalg.inv(covs), np.log(np.linalg.det(covs))
    out = np.full(len(colours), -np.inf)
    for w, mu, inverse, log_det in zip(weights, means, inverses, log_dets):
        if w <= 0:
            continue
        d = colours - mu
        maha = ((d @ inverse) * d).sum(1)
        out = np.logaddexp(out, np.log(w) - 0.5 * (maha + log_det + 3 * np.log(2 * np.pi)))
    return out


def _colours_separate(image: np.ndarray, core: np.ndarray, far: np.ndarray, foreground: np.ndarray,
                      background: np.ndarray, level: float = _MIN_SEPARATION) -> bool:
    """Whether GrabCut's fitted colour models tell the mask's core (``core``) from its far surroundings (``far``):
    the mean of the two shares of pixels the models put on the right side must reach ``level``. When
    they do not (an object the colour of what is around it: a grey image, camouflage), the cut follows the
    shortest outline rather than the object, and the decoded mask is kept."""
    flat = image.reshape(-1, 3)

    def fg_wins(where: np.ndarray) -> np.ndarray:
        index = np.flatnonzero(where)
        colours = flat[index[::-(-len(index) // _SEPARATION_SAMPLES)]].astype(np.float64)
        return _gmm_log_likelihood(foreground, colours) > _gmm_log_likelihood(background, colours)
    return (fg_wins(core).mean() + (~fg_wins(far)).mean()) / 2 >= level


def is_grey(image: np.ndarray) -> bool:
    """Whether the uint8 ``H x W x 3`` ``image`` is grayscale: its three channels are equal everywhere (as
    groundseg's loader makes a 1-channel or 16-bit grey file). A strided sample is tested first, so that a colour
    image is told apart at once."""
    sample = image[::7, ::7]
    if not (np.array_equal(sample[..., 0], sample[..., 1]) and np.array_equal(sample[..., 1], sample[..., 2])):
        return False
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]))


def refine_masks(pixels: np.ndarray, masks: np.ndarray, region_sides: np.ndarray, grid: int,
                 interior: bool = False) -> np.ndarray:
    """``refine_mask`` (with ``interior``, unless ``pixels`` is grayscale) on each of ``masks`` (bool ``[N, H, W]``),
    mask ``i`` decoded from a region ``region_sides[i]`` pixels across on a ``grid``-cell logit grid. Returns a new
    ``[N, H, W]`` array.

    A mask is refined once however often it occurs with the same band: an image's questions often decode to the same
    mask (the locator gives every teacher-forced "[SEG]." of an image the same box), and the refinement depends on
    the mask, the band and the image alone. The distinct masks are refined on a pool of threads, one per CPU core
    (OpenCV and NumPy let go of Python's lock while they work; each mask's result is the same as alone)."""
    if not len(masks):
        return masks.copy()
    # the inside pass tells what lies on an object from the object by colour; in a grayscale image, where objects and
    # their surroundings share grey levels, it took a light disc's own fill for what lies on it (keeping only its
    # dark outline), and on the phrasing suite's grey scenes it gained nothing
    interior = interior and not is_grey(pixels)
    bands = [band_pixels(s, grid) for s in region_sides]
    # ``first``: where each distinct (band, mask) first occurs; ``which[i]``: the distinct one mask i is
    seen: dict[tuple[int, bytes], int] = {}
    first: list[int] = []
    which: list[int] = []
    for i, (m, b) in enumerate(zip(masks, bands)):
        key = (b, m.tobytes())
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        which.append(seen[key])
    todo, todo_bands = masks[first], [bands[i] for i in first]
    if len(todo) == 1 or _WORKERS < 2:
        refined = np.stack([refine_mask(pixels, m, b, interior) for m, b in zip(todo, todo_bands)])
    else:
        refined = np.stack(list(_pool().map(refine_mask, itertools.repeat(pixels), todo, todo_bands,
                                            itertools.repeat(interior))))
    return refined[which] if len(first) < len(masks) else refined


_WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_WORKERS, thread_name_prefix="refine")
    return _POOL


__all__ = ["MASK_REFINERS", "band_pixels", "is_grey", "refine_mask", "refine_masks"]
